"""Storage faults against a live node: a data volume that runs full, and a
write that fails inside the log.

Both use a small tmpfs as the data volume (needs root, as CI runs).
"""

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request

import pytest

from eddy_harness import Node, wait_until

TOKEN = "storage-token"
MiB = 1024 * 1024


@contextlib.contextmanager
def tmpfs(size_mib):
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    d = tempfile.mkdtemp(prefix="eddy-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def request(node, method, path, data=None, timeout=10):
    req = urllib.request.Request(node.url + path, data=data, method=method,
                                 headers={"Authorization": TOKEN})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def put(node, svc, data):
    status, body, headers = request(node, "POST", f"/api/predict/{svc}", data)
    if status == 200:
        return status, (int(body), headers["X-Eas-Queueservice-Request-Id"])
    return status, body


def stored(node, svc, index):
    status, body, _ = request(
        node, "GET", f"/api/predict/{svc}?_index_={index}&_length_=1&_auto_delete_=false&_raw_=false")
    assert status == 200, (status, body)
    frames = json.loads(body)
    return frames[0] if frames and frames[0]["index"] == index else None


def start_or_show_log(node):
    try:
        node.start()
    except AssertionError:
        with open(node.log_path, "rb") as f:
            tail = f.read()[-3000:].decode(errors="replace")
        raise AssertionError(f"node did not restart; its log ends with:\n{tail}")


def status_of(node, path):
    return request(node, "GET", path, timeout=2)[:2]


def test_full_data_volume_refuses_puts_with_507_and_recovers_without_restart():
    with tmpfs(96) as volume:
        node = Node(volume, extra=["--min-free-disk-bytes", str(16 * MiB)])
        node.log_path = os.path.join(tempfile.gettempdir(), f"eddy-full-{os.getpid()}.log")
        node.start()
        try:
            svc = node.create_service(name="full", token=TOKEN)
            payload = os.urandom(256 * 1024)
            acked = {}
            for _ in range(20):
                status, ack = put(node, svc, payload)
                assert status == 200, ack
                acked[ack[0]] = ack[1]

            # Leave less than the reserve free.
            filler = os.path.join(volume, "filler")
            with open(filler, "wb") as f:
                f.write(b"\0" * (free_bytes(volume) - 8 * MiB))

            refused = {}

            def refused_with_507():
                status, body = put(node, svc, payload)
                if status == 200:
                    acked[body[0]] = body[1]
                    return False
                refused["status"], refused["body"] = status, body
                return True

            wait_until(refused_with_507, timeout=10, what="a put refused for lack of space")
            assert refused["status"] == 507, refused
            text = refused["body"].decode()
            assert "insufficient storage" in text and len(text) < 300, text
            assert "Os {" not in text and "code:" not in text, "no raw io::Error text"

            # Unready with the reason, but alive; reads still work.
            status, body = status_of(node, "/readyz")
            assert status == 503 and b"insufficient storage" in body, (status, body)
            assert status_of(node, "/healthz")[0] == 200
            first = min(acked)
            assert stored(node, svc, first)["tags"]["requestId"] == acked[first]

            os.remove(filler)
            wait_until(lambda: put(node, svc, payload)[0] == 200, timeout=10,
                       what="puts admitted again once space is freed")
            wait_until(lambda: status_of(node, "/readyz")[0] == 200, timeout=10, what="ready again")
            assert node.proc.poll() is None, "the node was not restarted"
            for index, rid in acked.items():
                frame = stored(node, svc, index)
                assert frame is not None and frame["tags"]["requestId"] == rid, index
        finally:
            node.kill()


def test_a_failed_log_write_stops_the_node_and_a_restart_recovers_every_acknowledged_put():
    with tmpfs(24) as volume:
        # The free-space guard is off, so the volume really runs full inside
        # the log: the node must stop acknowledging and exit for recovery.
        node = Node(volume, extra=["--min-free-disk-bytes", "0"])
        # The log must not live on the volume that runs full.
        node.log_path = os.path.join(tempfile.gettempdir(), f"eddy-failstop-{os.getpid()}.log")
        node.start()
        try:
            svc = node.create_service(name="failstop", token=TOKEN)
            payload = os.urandom(512 * 1024)
            acked = {}
            lock = threading.Lock()
            stop = threading.Event()

            def producer():
                while not stop.is_set():
                    try:
                        status, ack = put(node, svc, payload)
                    except Exception:
                        return
                    if status == 200:
                        with lock:
                            acked[ack[0]] = ack[1]

            threads = [threading.Thread(target=producer) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                code = node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                code = None
            stop.set()
            for t in threads:
                t.join(timeout=30)
            assert code == 3, f"the node should exit with status 3 after a failed write, got {code}"
            assert acked, "some puts were acknowledged before the volume ran full"
            print(f"fail-stop: {len(acked)} puts acknowledged before the node stopped with status {code}")
            with open(node.log_path, "rb") as f:
                assert b"storage failed" in f.read()

            # Give the volume room, restart on the same data: everything
            # acknowledged is there.
            subprocess.run(["mount", "-o", "remount,size=128m", volume], check=True)
            start_or_show_log(node)
            for index, rid in acked.items():
                frame = stored(node, svc, index)
                assert frame is not None and frame["tags"]["requestId"] == rid, index
            status, _ = put(node, svc, b"after recovery")
            assert status == 200
        finally:
            node.kill()


def test_kill_9_right_after_log_compaction_loses_nothing_acknowledged(tmpdir_factory_path):
    """Mixed large and tiny puts with frequent snapshots make the log compact
    often; the node is killed the moment it reports a compaction, then
    restarted: it must start, and no acknowledged index may be handed out
    again (which is what a lost acknowledged entry looks like)."""
    extra = ["--snapshot-every", "200", "--min-free-disk-bytes", "0"]
    node = Node(tmpdir_factory_path, extra=extra).start()
    svc = node.create_service(name="compact", token=TOKEN,
                              max_length=20, evict_oldest=True)
    big, tiny = os.urandom(48 * 1024), b"x"
    rounds = 3
    try:
        for round_no in range(rounds):
            acked = []
            lock = threading.Lock()
            stop = threading.Event()

            def producer(payload):
                while not stop.is_set():
                    try:
                        status, ack = put(node, svc, payload)
                    except Exception:
                        continue
                    if status == 200:
                        with lock:
                            acked.append(ack[0])

            threads = [threading.Thread(target=producer, args=(big,)) for _ in range(16)]
            threads += [threading.Thread(target=producer, args=(tiny,)) for _ in range(24)]
            with open(node.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                for t in threads:
                    t.start()
                try:
                    def compacted():
                        return b"raft log compacted" in f.read()
                    wait_until(compacted, timeout=60, interval=0.005,
                               what=f"a log compaction (round {round_no})")
                    node.kill(signal.SIGKILL)
                finally:
                    stop.set()
                    for t in threads:
                        t.join(timeout=30)
            assert acked, "puts were acknowledged before the kill"
            highest = max(acked)
            start_or_show_log(node)
            status, ack = put(node, svc, tiny)
            assert status == 200, ack
            assert ack[0] > highest, (
                f"round {round_no}: index {ack[0]} handed out again after the restart; "
                f"acknowledged entries up to {highest} were lost")
            print(f"round {round_no}: {len(acked)} acknowledged, highest {highest}, next {ack[0]}")
    finally:
        node.kill()
