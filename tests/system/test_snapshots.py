"""Snapshots against live nodes: kill -9 while a node builds a snapshot and
while a follower installs one, then restart and find every acknowledged put;
and a follower paused through a backlog larger than one gRPC message (256 MiB)
catches up once resumed."""

import base64
import hashlib
import json
import os
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from eddy_harness import Cluster, Node, wait_until

TOKEN = "snapshot-token"


def put(node, svc, data, timeout=30):
    req = urllib.request.Request(f"{node.url}/api/predict/{svc}", data=data, method="POST",
                                 headers={"Authorization": TOKEN})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return int(r.read()), r.headers["X-Eas-Queueservice-Request-Id"]


def get(node, svc, index):
    req = urllib.request.Request(
        f"{node.url}/api/predict/{svc}?_index_={index}&_length_=1&_auto_delete_=false&_raw_=false",
        headers={"Authorization": TOKEN})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())[0]


def payload(tag, i, size):
    head = f"{tag}-{i}-".encode()
    return head + os.urandom(16) + b"x" * (size - len(head) - 16)


def temp_files(state_dir):
    try:
        return [n for n in os.listdir(state_dir) if n.endswith(".tmp")]
    except FileNotFoundError:
        return []


def state_dir(node):
    return os.path.join(node.data_dir, f"node-{node.node_id}", "state")


def missing_puts(node, svc, acked):
    """Acknowledged puts that `node` does not have with the same request id
    and data."""
    lost = []
    for index, (rid, digest) in sorted(acked.items()):
        frame = get(node, svc, index)
        data = base64.b64decode(frame["data"])
        if frame["index"] != index or frame["tags"]["requestId"] != rid \
                or hashlib.sha256(data).hexdigest() != digest:
            lost.append(index)
    return lost


def kill_when_temp_appears(node, timeout):
    """kill -9 `node` as soon as a snapshot temp file shows in its state
    directory. Returns the temp files seen then (empty: timed out)."""
    deadline = time.monotonic() + timeout
    directory = state_dir(node)
    while time.monotonic() < deadline and node.proc.poll() is None:
        seen = temp_files(directory)
        if seen:
            node.kill(signal.SIGKILL)
            return seen
        time.sleep(0.001)
    return []


def status(node):
    return node.admin("GET", "/admin/cluster")


@pytest.mark.timeout(90)
def test_kill_9_while_building_a_snapshot(tmpdir_factory_path):
    node = Node(tmpdir_factory_path, extra=["--snapshot-every", "30"]).start()
    svc = node.create_service(name="build", token=TOKEN)
    acked = {}
    lock = threading.Lock()
    stop = threading.Event()

    def producer(p):
        i = 0
        while not stop.is_set():
            data = payload(f"p{p}", i, 512 * 1024)
            try:
                index, rid = put(node, svc, data)
            except (urllib.error.URLError, ConnectionError, OSError):
                return
            with lock:
                acked[index] = (rid, hashlib.sha256(data).hexdigest())
            i += 1

    threads = [threading.Thread(target=producer, args=(p,)) for p in range(3)]
    for t in threads:
        t.start()
    # Let the state grow so that a build takes a while, then kill -9 in the
    # middle of the next one.
    wait_until(lambda: len(acked) >= 120, timeout=30, what="120 puts")
    seen = kill_when_temp_appears(node, timeout=20)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert seen, "no snapshot build observed"
    left = temp_files(state_dir(node))
    print(f"killed during a build after {len(acked)} puts; temp files then {seen}, after the kill {left}")

    restarted = Node(tmpdir_factory_path, http_port=node.http_port, raft_port=node.raft_port).start()
    try:
        assert temp_files(state_dir(restarted)) == [], "leftover temp files not removed on start"
        lost = missing_puts(restarted, svc, acked)
        assert not lost, f"{len(lost)} acknowledged puts lost, e.g. {lost[:5]}"
        index, _ = put(restarted, svc, b"after")
        assert index > max(acked)
    finally:
        restarted.kill()


@pytest.mark.timeout(120)
def test_kill_9_while_a_follower_installs_a_snapshot():
    with tempfile.TemporaryDirectory(prefix="eddy-snap-") as d:
        cluster = Cluster(d, extra=["--snapshot-every", "30"]).start()
        try:
            leader = cluster.leader()
            follower = next(n for n in cluster.nodes if n is not leader)
            svc = leader.create_service(name="install", token=TOKEN)
            follower.kill(signal.SIGKILL)

            # Enough that the leader purges its log past the follower (it
            # purges in batches of 256 entries) and the snapshot takes a
            # moment to transfer.
            acked = {}
            for i in range(400):
                data = payload("i", i, 256 * 1024)
                index, rid = put(leader, svc, data)
                acked[index] = (rid, hashlib.sha256(data).hexdigest())
            wait_until(lambda: (status(leader)["purged"] or 0) > 200, timeout=20,
                       what="the leader to purge its log")

            follower.start_background()
            seen = kill_when_temp_appears(follower, timeout=20)
            assert seen, "no snapshot install observed"
            print(f"killed during an install; temp files then {seen}, "
                  f"after the kill {temp_files(state_dir(follower))}")

            follower.start_background()
            wait_until(follower.ready, timeout=30, what="the follower ready again")
            assert temp_files(state_dir(follower)) == [], "leftover temp files not removed on start"
            last = status(leader)["last_log_index"]
            wait_until(lambda: (status(follower)["applied"] or 0) >= last, timeout=30,
                       what="the follower to catch up")
            lost = missing_puts(follower, svc, acked)
            assert not lost, f"{len(lost)} acknowledged puts missing on the follower, e.g. {lost[:5]}"
            assert not missing_puts(leader, svc, acked)
        finally:
            cluster.kill_all()


@pytest.mark.timeout(150)
def test_a_follower_paused_through_a_backlog_larger_than_one_grpc_message_catches_up():
    with tempfile.TemporaryDirectory(prefix="eddy-backlog-") as d:
        cluster = Cluster(d).start()
        try:
            leader = cluster.leader()
            follower = next(n for n in cluster.nodes if n is not leader)
            svc = leader.create_service(name="backlog", token=TOKEN)
            follower.proc.send_signal(signal.SIGSTOP)
            try:
                # 38 x 8 MiB (the default payload limit) = 304 MiB > 256 MiB.
                for i in range(38):
                    put(leader, svc, payload("b", i, 8 * 1024 * 1024), timeout=60)
            finally:
                follower.proc.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            target = status(leader)["last_log_index"]
            fid = str(follower.node_id)

            unanswered = []

            def matched():
                # The follower keeps answering HTTP while it catches up.
                try:
                    with urllib.request.urlopen(follower.url + "/healthz", timeout=2) as r:
                        assert r.status == 200
                except Exception as e:
                    unanswered.append(repr(e))
                return status(leader)["replication"].get(fid) or 0

            try:
                wait_until(lambda: matched() >= target, timeout=40, interval=0.2,
                           what=f"follower {fid} to match index {target}")
            except AssertionError:
                with open(leader.log_path, errors="replace") as f:
                    no_answer = f.read().count("stream append: no answer")
                raise AssertionError(
                    f"follower {fid} matched {matched()} of {target} 40 s after resuming; "
                    f"the leader logged 'stream append: no answer' {no_answer} times")
            took = time.monotonic() - resumed
            assert not unanswered, f"/healthz unanswered while catching up: {unanswered[:3]}"
            print(f"follower caught up a 304 MiB backlog in {took:.1f} s")
        finally:
            if follower.proc.poll() is None:
                follower.proc.send_signal(signal.SIGCONT)
            cluster.kill_all()
