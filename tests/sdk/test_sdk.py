"""The official `eas-prediction` SDK (0.36) against a live `eddy serve`."""

import queue as stdqueue
import threading
import time
import uuid

import pytest
from eas_prediction import QueueClient
from eas_prediction.exception import PredictException

from eddy_harness import wait_until

TOKEN = "sdk-token"


def client(node, service, sink=False, uid=None, gid="eas", token=TOKEN):
    c = QueueClient(node.endpoint, service + ("/sink" if sink else ""))
    c.set_token(token)
    c.init(uid=uid, gid=gid)
    c.set_retry_count(0) if hasattr(c, "set_retry_count") else None
    return c


@pytest.fixture
def service(node):
    return node.create_service(token=TOKEN, consumer_grace_ms=500)


class Reader:
    """A watcher consumed the way the SDK's own tests do: frames are pulled
    in the test's thread, so a closed watcher is never resumed (the SDK's
    generator reconnects by itself if it is resumed after a close)."""

    def __init__(self, q, **watch_args):
        self.client = q
        self.watcher = q.watch(0, **watch_args)
        self.frames = self.watcher.run()

    def take(self, n):
        return [next(self.frames) for _ in range(n)]

    def close(self):
        self.watcher.close()


def consumer_lines(q):
    return [v for k, v in sorted(q.attributes().items()) if k.startswith("consumers.list")]


def length(q):
    return int(q.attributes()["stream.length"])


def test_put_and_get_by_index_and_request_id(node, service):
    q = client(node, service)
    index, request_id = q.put("abc")
    assert index.isdigit() and int(index) > 0
    assert len(request_id) == 36
    [df] = q.get(index=int(index), auto_delete=False)
    assert df.data == b"abc"
    assert df.index == int(index)
    assert df.tags["requestId"] == request_id
    [df] = q.get(request_id=request_id)
    assert df.data == b"abc"
    # get deletes by default: a second read finds nothing
    assert q.get(request_id=request_id, timeout="0s") == []


def test_indexes_increase_and_tags_are_kept(node, service):
    q = client(node, service, sink=True)
    a, _ = q.put("a", tags={"model": "m1"})
    b, rid = q.put("b")
    assert int(b) > int(a) > 0
    [df] = q.get(index=int(a), auto_delete=False)
    assert df.tags["model"] == "m1"


def test_truncate_via_last_entry(node, service):
    q = client(node, service)
    for i in range(10):
        q.put(f"x{i}")
    attrs = q.attributes()
    assert int(attrs["stream.length"]) == 10
    q.truncate(int(attrs["stream.lastEntry"]) + 1)
    assert length(q) == 0


def test_attributes_have_the_keys_sdks_read(node, service):
    q = client(node, service)
    attrs = q.attributes()
    for key in ("meta.name", "meta.maxPayloadBytes", "stream.length", "stream.approxMaxLength"):
        assert key in attrs
    assert attrs["meta.header.user"] == "X-EAS-QueueService-Redis-Uid"
    assert attrs["meta.header.group"] == "X-EAS-QueueService-Redis-Gid"
    assert "stream.lastEntry" not in attrs


def test_watch_manual_commit_in_order(node, service):
    q = client(node, service)
    for i in range(10):
        q.put(str(i))
    r = Reader(q, window=5)
    got = []
    for _ in range(10):
        [df] = r.take(1)
        got.append(df.data.decode())
        q.commit(df.index)
    r.close()
    assert got == [str(i) for i in range(10)]
    assert length(q) == 0


def test_watch_auto_commit(node, service):
    q = client(node, service)
    for i in range(10):
        q.put(str(i))
    r = Reader(q, window=5, auto_commit=True)
    frames = r.take(10)
    r.close()
    assert sorted(int(f.data) for f in frames) == list(range(10))
    wait_until(lambda: length(q) == 0, timeout=5, what="auto-committed queue to drain")


def test_window_limits_uncommitted_items(node, service):
    q = client(node, service)
    for i in range(10):
        q.put(str(i))
    r = Reader(q, window=5)
    first = r.take(5)
    # The server holds exactly five out and keeps the sixth waiting.
    [line] = consumer_lines(q)
    assert "Pending: 5" in line and "Window: 5" in line and "Slots: 0" in line
    assert q.search(first[-1].index + 1) == {"IsPending": False, "WaitCount": 0}
    q.commit(first[0].index)
    [sixth] = r.take(1)
    assert sixth.data == b"5"
    [line] = consumer_lines(q)
    assert "Pending: 5" in line
    assert q.search(sixth.index + 1)["IsPending"] is False
    r.close()


def test_reconnect_with_same_uid_gets_uncommitted_items_again(node, service):
    uid = str(uuid.uuid4())
    q = client(node, service, uid=uid)
    for i in range(6):
        q.put(str(i))
    r = Reader(q, window=3)
    first = [f.index for f in r.take(3)]
    r.close()
    q2 = client(node, service, uid=uid)
    r2 = Reader(q2, window=3)
    again = [f.index for f in r2.take(3)]
    assert again == first
    received = set(again)
    for idx in again:
        q2.commit(idx)
    for f in r2.take(3):
        received.add(f.index)
        q2.commit(f.index)
    r2.close()
    assert len(received) == 6
    assert length(q2) == 0


def test_failover_of_a_disconnected_consumer(node, service):
    q = client(node, service)
    index, _ = q.put("job")
    c1 = client(node, service)
    r1 = Reader(c1, window=1)
    [df] = r1.take(1)
    assert df.index == int(index)
    c2 = client(node, service)
    r2 = Reader(c2, window=1)
    got = []
    waiter = threading.Thread(target=lambda: got.extend(r2.take(1)), daemon=True)
    waiter.start()
    wait_until(lambda: len(consumer_lines(q)) == 2, what="second consumer attached")
    assert q.search(int(index)) == {"IsPending": True, "WaitCount": 0}  # c1 still holds it
    assert not got
    r1.close()  # abrupt close, no commit
    waiter.join(timeout=15)
    [moved] = got
    assert moved.index == int(index) and moved.data == b"job"
    c2.commit(moved.index)
    r2.close()
    assert length(q) == 0


def test_two_groups_each_receive_every_item(node, service):
    a = client(node, service, gid="g1")
    b = client(node, service, gid="g2")
    ra, rb = Reader(a, window=10), Reader(b, window=10)
    idx, _ = a.put("fan-out")
    fa, fb = ra.take(1)[0], rb.take(1)[0]
    assert fa.index == fb.index == int(idx)
    a.commit(fa.index)
    assert length(a) == 1
    b.commit(fb.index)
    wait_until(lambda: length(a) == 0, timeout=5, what="item consumed by both groups")
    ra.close()
    rb.close()


def test_sink_round_trip(node, service):
    sink = client(node, service, sink=True)
    index, rid = sink.put("result")
    [df] = sink.get(request_id=rid)
    assert df.data == b"result"


def test_bad_token_is_refused(node, service):
    q = client(node, service, token="wrong")
    q.set_retry_count(0)
    with pytest.raises(PredictException) as e:
        q.put("x")
    assert "401" in str(e.value)
    assert length(client(node, service)) == 0


def test_search(node, service):
    q = client(node, service)
    indexes = [int(q.put(str(i))[0]) for i in range(3)]
    assert q.search(indexes[2]) == {"IsPending": False, "WaitCount": 2}
    r = Reader(q, window=3)
    r.take(3)
    assert q.search(indexes[2]) == {"IsPending": True, "WaitCount": 0}
    r.close()
