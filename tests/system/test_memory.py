"""Memory of a live node: it tracks what is held, and a byte limit refuses
puts before memory runs out.

- A flood of 1 MiB puts against a node with a small --max-memory-bytes is
  answered 429 before its RSS passes the limit plus a margin, and every put
  answered 200 is still there.
- A soak of many puts and deletes leaves the node's RSS within a bound of the
  RSS of the same node restarted with the same items (it was ~10 KiB per
  item ever put, and never given back).
"""

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from eddy_harness import Node, eddy_binary, wait_until

MIB = 1024 * 1024


def rss_bytes(node, field="VmRSS"):
    with open(f"/proc/{node.proc.pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {node.proc.pid}")


def settled_rss(node, timeout=45.0):
    """RSS once freed memory went back to the system: the allocator returns
    it over seconds, so wait until two samples a few seconds apart agree."""
    deadline = time.monotonic() + timeout
    last = rss_bytes(node)
    while time.monotonic() < deadline:
        time.sleep(3)
        now = rss_bytes(node)
        if abs(now - last) <= max(2 * MIB, last // 50):
            return now
        last = now
    return rss_bytes(node)


def put(node, service, body):
    req = urllib.request.Request(f"{node.url}/api/predict/{service}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get_raw(node, service, index):
    url = f"{node.url}/api/predict/{service}?_index_={index}&_length_=1&_raw_=true"
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


def length(node, service):
    import json
    with urllib.request.urlopen(f"{node.url}/api/predict/{service}?_attrs_=true", timeout=10) as r:
        return int(json.loads(r.read())["stream.length"])


def test_flood_of_large_puts_is_refused_before_memory_runs_out(tmpdir_factory_path):
    limit = 64 * MIB
    node = Node(tmpdir_factory_path, extra=["--max-memory-bytes", str(limit)]).start()
    try:
        service = node.create_service(max_length=100_000, max_payload_bytes=2 * MIB)
        body = os.urandom(MIB)
        acked, refused, other = [], [], []
        lock = threading.Lock()
        peak = [rss_bytes(node)]
        attempts = iter(range(300))

        def producer():
            for _ in attempts:
                status, text = put(node, service, body)
                with lock:
                    if status == 200:
                        acked.append(int(text))
                    elif status == 429:
                        refused.append(text)
                    else:
                        other.append((status, text))
                    peak[0] = max(peak[0], rss_bytes(node))

        threads = [threading.Thread(target=producer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=100)
        assert not other, other[:3]
        assert refused, "no put was refused"
        assert "memory limit" in refused[0], refused[0]
        # The node held close to its limit, not far past it.
        assert limit // MIB - 8 <= len(acked) <= limit // MIB, len(acked)
        hwm = rss_bytes(node, "VmHWM")
        print(f"acked {len(acked)}, refused {len(refused)}, peak RSS {hwm / MIB:.0f} MiB")
        assert hwm <= limit + 150 * MIB, f"peak RSS {hwm / MIB:.0f} MiB"
        # Nothing acknowledged was lost.
        assert length(node, service) == len(acked)
        for index in acked:
            status, data = get_raw(node, service, index)
            assert status == 200 and data == body, index
        # Room made, puts are accepted again.
        req = urllib.request.Request(f"{node.url}/api/predict/{service}?_index_={max(acked) + 1}&_trunc_=true",
                                     method="DELETE")
        urllib.request.urlopen(req, timeout=10).read()
        assert put(node, service, body)[0] == 200
    finally:
        node.kill(signal.SIGTERM)


# Puts per bench round; every round's items are deleted (truncated) at its end.
SOAK_ROUND = 50_000
SOAK_ROUNDS = int(os.environ.get("EDDY_SOAK_ROUNDS", "10"))
HELD_AT_END = 5_000


@pytest.mark.timeout(400)
def test_soak_rss_tracks_what_is_held(tmpdir_factory_path):
    node = Node(tmpdir_factory_path).start()
    try:
        service = node.create_service(max_length=2_000_000)
        baseline = rss_bytes(node)
        for _ in range(SOAK_ROUNDS):
            subprocess.run(
                [eddy_binary(), "bench", service, "-e", node.endpoint, "-p", "64",
                 "-n", str(SOAK_ROUND), "-s", "256"],
                check=True, capture_output=True, timeout=150)
            assert length(node, service) == 0
        # Some items held at the end, so the comparison is not with an empty node.
        body = b"x" * 256
        errors = []

        def producer(n):
            for _ in range(n):
                status, _ = put(node, service, body)
                if status != 200:
                    errors.append(status)

        threads = [threading.Thread(target=producer, args=(HELD_AT_END // 8,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=100)
        assert not errors, errors[:5]
        held = length(node, service)
        assert held == HELD_AT_END
        soaked_peak = rss_bytes(node, "VmHWM")
        soaked = settled_rss(node)

        # The same node, restarted: the same items, none of the past.
        node.kill(signal.SIGTERM)
        node.start()
        wait_until(lambda: length(node, service) == held, what="restarted node holds the items")
        restarted = settled_rss(node)
        bound = 1.5 * restarted + 64 * MIB
        print(f"baseline {baseline / MIB:.0f} MiB, soak peak {soaked_peak / MIB:.0f} MiB, "
              f"after soak {soaked / MIB:.0f} MiB, restarted {restarted / MIB:.0f} MiB, "
              f"bound {bound / MIB:.0f} MiB")
        assert soaked <= bound, (
            f"RSS after the soak {soaked / MIB:.0f} MiB > bound {bound / MIB:.0f} MiB "
            f"(restarted with the same items: {restarted / MIB:.0f} MiB)")
    finally:
        node.kill(signal.SIGTERM)
