"""Fixtures that run real `eddy serve` processes for the SDK tests.

The binary is taken from EDDY_BIN, or target/release/eddy, or
target/debug/eddy. Every node gets its own temporary data directory and
free loopback ports, and is killed at the end.
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def eddy_binary():
    for candidate in (
        os.environ.get("EDDY_BIN"),
        os.path.join(ROOT, "target", "release", "eddy"),
        os.path.join(ROOT, "target", "debug", "eddy"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    raise RuntimeError("no eddy binary: build with `cargo build --release` or set EDDY_BIN")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=15.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class Node:
    """One `eddy serve` process."""

    def __init__(self, data_dir, node_id=1, peers=None, extra=None, http_port=None, raft_port=None):
        self.data_dir = data_dir
        self.node_id = node_id
        self.http_port = http_port or free_port()
        self.raft_port = raft_port or free_port()
        self.peers = peers or []
        self.extra = extra or []
        self.proc = None
        self.log_path = os.path.join(data_dir, f"node-{node_id}.log")

    @property
    def endpoint(self):
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self):
        return f"http://{self.endpoint}"

    def start(self):
        cmd = [
            eddy_binary(), "serve",
            "--id", str(self.node_id),
            "--data-dir", os.path.join(self.data_dir, f"node-{self.node_id}"),
            "--listen", f"127.0.0.1:{self.http_port}",
            "--raft-listen", f"127.0.0.1:{self.raft_port}",
            "--service", "",
        ] + (["--peers", ",".join(self.peers)] if self.peers else []) + self.extra
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_until(self.ready, what=f"node {self.node_id} ready")
        return self

    def ready(self):
        with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
            return r.status == 200

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def admin(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def create_service(self, name=None, **settings):
        name = name or "svc-" + uuid.uuid4().hex[:8]
        body = {"name": name, **settings}
        self.admin("POST", "/admin/services", body)
        return name


@pytest.fixture(scope="session")
def node():
    with tempfile.TemporaryDirectory(prefix="eddy-sdk-") as d:
        n = Node(d).start()
        yield n
        n.kill(signal.SIGTERM)


@pytest.fixture
def tmpdir_factory_path():
    with tempfile.TemporaryDirectory(prefix="eddy-test-") as d:
        yield d
