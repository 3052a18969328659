"""The official SDK against a three-node cluster of real processes: any node
serves everything, and a dead node's watchers' items move to the others."""

import signal
import threading
import time
import uuid

from eas_prediction import QueueClient

from eddy_harness import Cluster, wait_until

TOKEN = "cluster-token"


def client(node, service, uid=None, sink=False):
    c = QueueClient(node.endpoint, service + ("/sink" if sink else ""))
    c.set_token(TOKEN)
    c.init(uid=uid)
    return c


def test_every_node_serves_every_operation(cluster):
    n1, n2, n3 = cluster.nodes
    svc = n2.create_service(token=TOKEN)
    q1, q2, q3 = client(n1, svc), client(n2, svc), client(n3, svc)
    index, rid = q1.put("hello")
    # Reads are linearizable: another node sees the put at once.
    [df] = q3.get(index=int(index), auto_delete=False, timeout="0s")
    assert df.data == b"hello" and df.tags["requestId"] == rid
    assert q2.attributes()["stream.length"] == "1"
    w = q2.watch(0, 5).run()
    got = next(w)
    assert got.index == int(index)
    q3.commit(got.index)  # commit through yet another node
    wait_until(lambda: q1.attributes()["stream.length"] == "0", what="commit visible everywhere")
    sink = client(n3, svc, sink=True)
    _, srid = sink.put("result")
    [res] = client(n1, svc, sink=True).get(request_id=srid)
    assert res.data == b"result"


def receive_in_thread(gen, out):
    def run():
        try:
            out.append((next(gen), time.monotonic()))
        except Exception as e:  # noqa: BLE001
            out.append((e, time.monotonic()))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def failover(tmpdir, kill_leader):
    c = Cluster(tmpdir).start()
    try:
        leader = c.leader()
        followers = [n for n in c.nodes if n is not leader]
        victim = leader if kill_leader else followers[0]
        survivor = followers[1] if kill_leader else followers[1]
        svc = survivor.create_service(token=TOKEN)
        holder = client(victim, svc)
        w1 = holder.watch(0, 1).run()
        index, _ = client(survivor, svc).put("in-flight")
        first = next(w1)
        assert first.index == int(index)
        other = client(survivor, svc)
        got = []
        t = receive_in_thread(other.watch(0, 1).run(), got)
        wait_until(lambda: sum(k.startswith("consumers.list") for k in other.attributes()) == 2,
                   what="second consumer attached")
        killed_at = time.monotonic()
        victim.kill(signal.SIGKILL)
        t.join(timeout=20)
        assert got, "the dead node's item was never redelivered"
        frame, at = got[0]
        assert frame.index == int(index) and frame.data == b"in-flight"
        other.commit(frame.index)
        return at - killed_at
    finally:
        c.kill_all()


def test_items_of_a_killed_follower_move_to_a_live_consumer(tmpdir_factory_path):
    seconds = failover(tmpdir_factory_path, kill_leader=False)
    print(f"follower kill -9 -> redelivery in {seconds:.2f} s")
    assert seconds < 5


def test_items_of_a_killed_leader_move_to_a_live_consumer(tmpdir_factory_path):
    seconds = failover(tmpdir_factory_path, kill_leader=True)
    print(f"leader kill -9 -> redelivery in {seconds:.2f} s")
    assert seconds < 6
