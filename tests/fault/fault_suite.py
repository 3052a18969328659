#!/usr/bin/env python3
"""Fault suite: the Compose cluster under continuous puts and watches while
nodes are killed, paused, partitioned (the leader, then a follower) and the whole
cluster restarted.

Every operation is recorded; a checker then asserts over the history:
- no acknowledged put is lost (each is delivered to a consumer);
- no item is delivered after its commit was acknowledged;
- no consumer connection ever holds more than its window;
and prints the figures: faults, puts acknowledged, items lost, duplicate
deliveries, the worst time from a node loss to the redelivery of the items
its consumers held.

Usage: fault_suite.py [--image eddy:dev] [--rounds 1]
Needs the image (deploy/build-image.sh) and docker-compose.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import websocket
from eas_prediction.queue_types.queueservice_pb2 import DataFrameProto

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROJECT = "eddyfault"
NODES = ["eddy-1", "eddy-2", "eddy-3"]
PORTS = {"eddy-1": 8081, "eddy-2": 8082, "eddy-3": 8083}
SERVICE = "demo"
WINDOW = 8
GID = "eas"
HOLD_S = 0.02  # how long a consumer works on an item before committing it


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def compose(*args, check=True):
    cmd = ["docker-compose", "-p", PROJECT, "-f", os.path.join(ROOT, "docker-compose.yml"), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def docker(*args, check=True):
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True)


def container(node):
    return compose("ps", "-q", node).stdout.strip()


def http(node, method, path, body=None, timeout=3):
    req = urllib.request.Request(f"http://127.0.0.1:{PORTS[node]}{path}", data=body, method=method,
                                 headers={"X-EAS-QueueService-Redis-Gid": GID,
                                          "X-EAS-QueueService-Redis-Uid": "checker"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read(), r.headers


def cluster_status(node):
    try:
        return json.loads(http(node, "GET", "/admin/cluster", timeout=1)[1])
    except Exception:
        return None


def leader():
    for n in NODES:
        s = cluster_status(n)
        if s and s.get("leader"):
            return f"eddy-{s['leader']}"
    return None


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


class History:
    def __init__(self):
        self.lock = threading.Lock()
        self.acked = {}          # index -> (payload, ack time)
        self.deliveries = []     # (index, consumer, connection, time)
        self.commit_acked = {}   # index -> time of first acknowledged commit
        self.window_violations = []
        self.faults = []         # (kind, node, time)
        self.put_errors = 0

    def record(self, attr, value):
        with self.lock:
            getattr(self, attr).append(value)


class Producer(threading.Thread):
    def __init__(self, pid, history, stop):
        super().__init__(daemon=True)
        self.pid, self.h, self.stop = pid, history, stop

    def run(self):
        i, node_i = 0, self.pid
        while not self.stop.is_set():
            node = NODES[node_i % len(NODES)]
            payload = f"{self.pid}-{i}-{uuid.uuid4().hex[:8]}".encode()
            try:
                status, body, _ = http(node, "POST", f"/api/predict/{SERVICE}", payload)
                with self.h.lock:
                    self.h.acked[int(body)] = (payload, time.monotonic())
                i += 1
                time.sleep(0.01)
            except Exception:
                # Unknown outcome; the payload is never counted as acknowledged.
                self.h.put_errors += 1
                node_i += 1
                time.sleep(0.2)


class Consumer(threading.Thread):
    """Watches with a window and commits from a separate thread, a little
    later, so the window is actually used up."""

    def __init__(self, cid, history, stop):
        super().__init__(daemon=True)
        self.cid, self.h, self.stop = cid, history, stop
        self.node_i = cid
        # Items this consumer received and has not yet tried to commit, over
        # all its connections (a takeover moves its items to the new one).
        self.outstanding = set()
        # Items whose commit this consumer already sent. A node that was
        # paused may apply such a commit late, after the item came back on a
        # new connection, so a redelivered item is not counted again.
        self.attempted = set()
        self.lock = threading.Lock()
        self.last_frame = time.monotonic()

    def commit(self, node, index):
        """Commit through the node this consumer is attached to, as a worker
        with one endpoint would; if that node is gone the item stays in
        flight and must be redelivered elsewhere."""
        for _ in range(3):
            try:
                status, _, _ = http(node, "PUT", f"/api/predict/{SERVICE}?_indexes_={index}")
                if status == 200:
                    with self.h.lock:
                        self.h.commit_acked.setdefault(index, time.monotonic())
                    return
            except Exception:
                time.sleep(0.2)

    def run(self):
        while not self.stop.is_set():
            node = NODES[self.node_i % len(NODES)]
            conn = uuid.uuid4().hex[:6]
            try:
                ws = websocket.create_connection(
                    f"ws://127.0.0.1:{PORTS[node]}/api/predict/{SERVICE}?_watch_=true&_index_=0&_window_={WINDOW}",
                    header=[f"X-EAS-QueueService-Redis-Uid: c{self.cid}", f"X-EAS-QueueService-Redis-Gid: {GID}"],
                    timeout=2)
            except Exception:
                self.node_i += 1
                time.sleep(0.5)
                continue
            outstanding, lock = self.outstanding, self.lock

            def commit_later(index, node=node):
                time.sleep(HOLD_S)
                with lock:
                    outstanding.discard(index)
                    self.attempted.add(index)
                self.commit(node, index)

            try:
                # Like the SDKs: ping every second, and give the connection up
                # when nothing at all came back for a few seconds.
                heard, pinged = time.monotonic(), 0.0
                while not self.stop.is_set():
                    now = time.monotonic()
                    if now - pinged > 1:
                        ws.ping("ping")
                        pinged = now
                    if now - heard > 5:
                        raise ConnectionError("silent connection")
                    ws.settimeout(1)
                    try:
                        opcode, data = ws.recv_data(control_frame=True)
                    except websocket.WebSocketTimeoutException:
                        continue
                    heard = time.monotonic()
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        raise ConnectionError("closed")
                    if opcode != websocket.ABNF.OPCODE_BINARY:
                        continue
                    frame = DataFrameProto.FromString(data)
                    self.last_frame = time.monotonic()
                    self.h.record("deliveries", (frame.index, self.cid, conn, time.monotonic()))
                    with lock:
                        if frame.index not in self.attempted:
                            outstanding.add(frame.index)
                        if len(outstanding) > WINDOW:
                            self.h.record("window_violations", (self.cid, conn, sorted(outstanding)))
                    threading.Thread(target=commit_later, args=(frame.index,), daemon=True).start()
            except Exception:
                pass
            finally:
                try:
                    ws.close()
                except Exception:
                    pass
            self.node_i += 1
            time.sleep(0.3)


def inject(history, kind, node, action, undo, hold):
    log(f"fault: {kind} {node}")
    history.record("faults", (kind, node, time.monotonic()))
    action()
    time.sleep(hold)
    undo()
    wait_for(lambda: leader() is not None and all(cluster_status(n) for n in NODES), 60, "cluster healthy again")
    time.sleep(2)


def network_of(node):
    nets = json.loads(docker("inspect", container(node)).stdout)[0]["NetworkSettings"]["Networks"]
    return next(iter(nets))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = ap.parse_args()
    h = History()
    stop_producers, stop_consumers = threading.Event(), threading.Event()
    compose("down", "-v", check=False)
    compose("up", "-d", *NODES)
    ok = False
    try:
        wait_for(lambda: leader() is not None and all(cluster_status(n) for n in NODES), 90, "cluster up")
        wait_for(lambda: http("eddy-1", "GET", f"/api/predict/{SERVICE}?_attrs_=true")[0] == 200, 30, "service")
        producers = [Producer(p, h, stop_producers) for p in range(4)]
        consumers = [Consumer(c, h, stop_consumers) for c in range(3)]
        for t in producers + consumers:
            t.start()
        time.sleep(3)
        for _ in range(args.rounds):
            ld = leader()
            inject(h, "kill -9 leader", ld, lambda: docker("kill", "-s", "KILL", container(ld)),
                   lambda: compose("start", ld), 4)
            fl = next(n for n in NODES if n != leader())
            inject(h, "kill -9 follower", fl, lambda: docker("kill", "-s", "KILL", container(fl)),
                   lambda: compose("start", fl), 4)
            ld = leader()
            inject(h, "SIGSTOP leader", ld, lambda: docker("kill", "-s", "STOP", container(ld)),
                   lambda: docker("kill", "-s", "CONT", container(ld)), 5)
            ld = leader()
            net = network_of(ld)
            inject(h, "partition leader", ld, lambda: docker("network", "disconnect", net, container(ld)),
                   lambda: docker("network", "connect", "--alias", ld, net, container(ld)), 8)
            fl = next(n for n in NODES if n != leader())
            net = network_of(fl)
            inject(h, "partition follower", fl, lambda: docker("network", "disconnect", net, container(fl)),
                   lambda: docker("network", "connect", "--alias", fl, net, container(fl)), 8)
            inject(h, "full restart", "all", lambda: [docker("kill", "-s", "KILL", container(n)) for n in NODES],
                   lambda: compose("start", *NODES), 1)
        time.sleep(3)
        log("faults done; stopping producers and draining")
        stop_producers.set()
        for t in producers:
            t.join(timeout=10)
        with h.lock:
            acked = dict(h.acked)

        def drained():
            with h.lock:
                delivered = {d[0] for d in h.deliveries}
            return set(acked) <= delivered

        deadline = time.monotonic() + 180
        while not drained() and time.monotonic() < deadline:
            time.sleep(5)
            try:
                ld = leader()
                a = json.loads(http(ld, "GET", f"/api/predict/{SERVICE}?_attrs_=true")[1])
                log("draining:", a.get("stream.length"), "left,", a.get("stream.inFlight"), "in flight;",
                    [v.split(", Idle")[0] for k, v in sorted(a.items()) if k.startswith("consumers.list")],
                    [(c.cid, NODES[c.node_i % 3], round(time.monotonic() - c.last_frame, 1)) for c in consumers])
            except Exception as e:
                log("draining: status unavailable", e)
        stop_consumers.set()
        for t in consumers:
            t.join(timeout=10)
        ok = check(h, acked)
        if not ok:
            for n in NODES:
                try:
                    a = json.loads(http(n, "GET", f"/api/predict/{SERVICE}?_attrs_=true&_local_=true")[1])
                    print(n, {k: v for k, v in a.items() if k.startswith(("stream.", "consumers."))})
                    print(n, cluster_status(n))
                except Exception as e:
                    print(n, "unreachable:", e)
    finally:
        if not args.keep:
            logs = compose("logs", "--no-color", "--tail", "200", check=False).stdout
            with open(os.path.join(ROOT, "target", "fault-suite-cluster.log"), "w") as f:
                f.write(logs)
            compose("down", "-v", check=False)
    sys.exit(0 if ok else 1)


def check(h, acked):
    first_delivery = {}
    per_index = {}
    for index, cid, conn, t in h.deliveries:
        per_index.setdefault(index, []).append((t, cid, conn))
        first_delivery.setdefault(index, t)
    lost = sorted(set(acked) - set(per_index))
    duplicates = sum(len(v) - 1 for v in per_index.values())
    # Delivered after the commit was acknowledged (with 500 ms for frames
    # already on the wire when the commit was applied).
    late = [(i, t - h.commit_acked[i]) for i, ds in per_index.items() if i in h.commit_acked
            for t, _, _ in ds if t > h.commit_acked[i] + 0.5]
    # Redelivery after a fault: an item delivered, then (its holder's node
    # killed, paused or cut off) delivered again; time from the fault to the
    # redelivery.
    redelivery = []
    for index, ds in per_index.items():
        ds = sorted(ds)
        for (t1, _, _), (t2, _, _) in zip(ds, ds[1:]):
            # (a frame may still arrive shortly after its node failed)
            between = [(ft, kind) for kind, _, ft in h.faults if t1 - 1.0 <= ft <= t2]
            if between:
                ft, kind = max(between)
                redelivery.append((round(t2 - ft, 2), kind))
    worst = max((r for r, _ in redelivery), default=0.0)
    # Time from each fault to the redelivery, per fault kind: p50 and max.
    per_kind = {}
    for r, kind in redelivery:
        per_kind.setdefault(kind, []).append(r)
    redelivery_by_fault = {
        kind: {"n": len(rs), "p50_s": round(sorted(rs)[len(rs) // 2], 2), "max_s": round(max(rs), 2)}
        for kind, rs in sorted(per_kind.items())
    }
    if redelivery:
        print("redeliveries after faults (seconds, fault):", sorted(redelivery, reverse=True)[:10])
    figures = {
        "faults_injected": len(h.faults),
        "fault_kinds": sorted({f[0] for f in h.faults}),
        "puts_acknowledged": len(acked),
        "puts_with_unknown_outcome": h.put_errors,
        "deliveries": len(h.deliveries),
        "items_lost": len(lost),
        "duplicate_deliveries": duplicates,
        "delivered_after_commit_ack": len(late),
        "window_violations": len(h.window_violations),
        "redeliveries_after_faults": len(redelivery),
        "worst_redelivery_after_fault_s": round(worst, 2),
        "redelivery_after_fault_by_kind": redelivery_by_fault,
    }
    print("FAULT SUITE " + json.dumps(figures, indent=1), flush=True)
    if lost:
        print("lost indexes (first 20):", lost[:20])
    if late:
        print("delivered after commit ack (first 10):", late[:10])
    if h.window_violations:
        print("window violations (first 5):", h.window_violations[:5])
    return not lost and not late and not h.window_violations and len(acked) > 0


if __name__ == "__main__":
    main()
