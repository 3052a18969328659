"""Durability: kill -9 a node under load, restart it on the same data
directory, and find every acknowledged put with its index and request id."""

import signal
import threading
import time
import urllib.error
import urllib.request

from eddy_harness import Node

TOKEN = "restart-token"


def put(node, svc, data):
    req = urllib.request.Request(f"{node.url}/api/predict/{svc}", data=data, method="POST",
                                 headers={"Authorization": TOKEN})
    with urllib.request.urlopen(req, timeout=5) as r:
        return int(r.read()), r.headers["X-Eas-Queueservice-Request-Id"]


def get(node, svc, index):
    req = urllib.request.Request(
        f"{node.url}/api/predict/{svc}?_index_={index}&_length_=1&_auto_delete_=false&_raw_=false",
        headers={"Authorization": TOKEN})
    with urllib.request.urlopen(req, timeout=5) as r:
        import json
        return json.loads(r.read())[0]


def test_acknowledged_puts_survive_kill_9(tmpdir_factory_path):
    # Small snapshot interval: recovery goes through snapshot + log replay.
    node = Node(tmpdir_factory_path, extra=["--snapshot-every", "300"]).start()
    svc = node.create_service(name="durable", token=TOKEN)
    acked = {}
    lock = threading.Lock()
    stop = threading.Event()

    def producer(p):
        i = 0
        while not stop.is_set():
            payload = f"p{p}-{i}".encode()
            try:
                index, rid = put(node, svc, payload)
            except (urllib.error.URLError, ConnectionError, OSError):
                return
            with lock:
                acked[index] = (rid, payload)
            i += 1

    threads = [threading.Thread(target=producer, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 1500 and time.monotonic() < deadline:
        time.sleep(0.05)
    node.kill(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert len(acked) >= 300, f"only {len(acked)} puts acknowledged before the kill"

    restarted = Node(tmpdir_factory_path, http_port=node.http_port, raft_port=node.raft_port).start()
    try:
        import base64
        lost = []
        for index, (rid, payload) in sorted(acked.items()):
            frame = get(restarted, svc, index)
            if frame["index"] != index or frame["tags"]["requestId"] != rid or base64.b64decode(frame["data"]) != payload:
                lost.append(index)
        assert not lost, f"{len(lost)} acknowledged puts lost or changed, e.g. {lost[:5]}"
        # The index counter continues past everything acknowledged.
        index, _ = put(restarted, svc, b"after")
        assert index > max(acked)
        print(f"kill -9 after {len(acked)} acknowledged puts: 0 lost")
    finally:
        restarted.kill()
