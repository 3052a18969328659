"""Real `eddy serve` processes for the Python tests (tests/sdk, tests/system,
tests/deploy); the fixtures built on them are in tests/conftest.py.

The binary is taken from EDDY_BIN, or target/release/eddy, or
target/debug/eddy. Every node gets its own temporary data directory and
free loopback ports, and is killed at the end.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


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


def wait_until(predicate, timeout=15.0, interval=0.05, what="condition", on_timeout=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    seen = f": {on_timeout()}" if on_timeout else ""
    raise AssertionError(f"timed out waiting for {what}{seen}")


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
        # Sent with admin calls when set (a cluster member needs one).
        self.admin_token = None
        self.log_path = os.path.join(data_dir, f"node-{node_id}.log")

    @property
    def endpoint(self):
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self):
        return f"http://{self.endpoint}"

    def start(self):
        self.start_background()
        wait_until(self.ready, what=f"node {self.node_id} ready")
        return self

    def start_background(self):
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

    def ready(self):
        with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
            return r.status == 200

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def admin(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"}
        if self.admin_token:
            headers["authorization"] = self.admin_token
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def create_service(self, name=None, **settings):
        name = name or "svc-" + uuid.uuid4().hex[:8]
        body = {"name": name, **settings}
        self.admin("POST", "/admin/services", body)
        return name


class Cluster:
    """Three `eddy serve` processes on loopback forming one cluster."""

    def __init__(self, data_dir, size=3, extra=None):
        ports = [(free_port(), free_port()) for _ in range(size)]
        peers = [f"{i + 1}@127.0.0.1:{r}@127.0.0.1:{h}" for i, (h, r) in enumerate(ports)]
        # A cluster member refuses to start without a cluster secret and an
        # admin token (the same on every node).
        self.admin_token = uuid.uuid4().hex
        extra = ["--cluster-secret", uuid.uuid4().hex, "--admin-token", self.admin_token] + (extra or [])
        self.nodes = [Node(data_dir, node_id=i + 1, peers=peers, extra=extra, http_port=h, raft_port=r)
                      for i, (h, r) in enumerate(ports)]
        for n in self.nodes:
            n.admin_token = self.admin_token

    def start(self):
        procs = []
        for n in self.nodes:
            cmd_node = n
            procs.append(cmd_node)
        # Start all before waiting: a node is ready only once there is a leader.
        for n in self.nodes:
            n.start_background()
        for n in self.nodes:
            wait_until(n.ready, timeout=30, what=f"node {n.node_id} ready")
        return self

    def status(self, node):
        return node.admin("GET", "/admin/cluster")

    def leader(self):
        for n in self.nodes:
            if n.proc and n.proc.poll() is None:
                try:
                    s = self.status(n)
                except Exception:
                    continue
                if s["leader"] is not None:
                    return next(x for x in self.nodes if x.node_id == s["leader"])
        return None

    def kill_all(self):
        for n in self.nodes:
            n.kill()
