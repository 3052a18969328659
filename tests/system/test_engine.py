"""The inference engine end to end, driven by the official SDK: puts on the
input queue, an `eddy engine` beside `eddy demo-model`, results on the sink."""

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import pytest
from eas_prediction import QueueClient

from eddy_harness import eddy_binary, free_port, wait_until

TOKEN = "engine-token"


class Proc:
    def __init__(self, args, log):
        self.log = open(log, "ab")
        self.p = subprocess.Popen([eddy_binary()] + args, stdout=self.log, stderr=self.log)

    def signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout=30):
        return self.p.wait(timeout=timeout)

    def stop(self):
        self.signal(signal.SIGKILL)
        self.p.wait(timeout=30)


def model(tmp, *flags):
    port = free_port()
    proc = Proc(["demo-model", "--listen", f"127.0.0.1:{port}", *flags], os.path.join(tmp, f"model-{port}.log"))
    import urllib.request
    wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200,
               what="demo model up")
    return proc, f"http://127.0.0.1:{port}"


def engine(tmp, node, service, model_url, *flags, concurrency=8):
    return Proc(["engine", "-e", node.endpoint, "--service", service, "-t", TOKEN, "--model", model_url,
                 "--concurrency", str(concurrency), *flags],
                os.path.join(tmp, f"engine-{uuid.uuid4().hex[:6]}.log"))


def clients(node, service):
    inq = QueueClient(node.endpoint, service)
    inq.set_token(TOKEN)
    inq.init()
    sink = QueueClient(node.endpoint, service + "/sink")
    sink.set_token(TOKEN)
    sink.init()
    return inq, sink


def put_many(q, n, threads=8):
    ids = []
    lock = threading.Lock()

    def work(k):
        for i in range(k, n, threads):
            _, rid = q.put(f'[{{"i": {i}}}]')
            with lock:
                ids.append(rid)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return ids


def drain_sink(sink, expected, timeout=120):
    """Watch the sink with auto-commit until `expected` results arrived."""
    seen = []
    watcher = sink.watch(0, 64, auto_commit=True)
    deadline = time.monotonic() + timeout
    for df in watcher.run():
        seen.append(df)
        if len(seen) >= expected or time.monotonic() > deadline:
            break
    watcher.close()
    return seen


def length(q):
    return int(q.attributes()["stream.length"])


def test_2000_requests_round_trip(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN)
    m, url = model(tmpdir_factory_path)
    e = engine(tmpdir_factory_path, node, svc, url)
    try:
        inq, sink = clients(node, svc)
        ids = put_many(inq, 2000)
        results = drain_sink(sink, 2000)
        got = [df.tags["requestId"] for df in results]
        assert len(got) == len(set(got)), "a request id appeared twice in the sink"
        assert set(got) == set(ids)
        assert all(b"p_0" in df.data and "lastCode" not in df.tags for df in results)
        wait_until(lambda: length(inq) == 0, what="input queue empty")
    finally:
        e.stop()
        m.stop()


def test_engine_killed_mid_way_loses_nothing_and_writes_nothing_twice(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN, consumer_grace_ms=500)
    m, url = model(tmpdir_factory_path, "--delay-ms", "5")
    e1 = engine(tmpdir_factory_path, node, svc, url)
    e2 = engine(tmpdir_factory_path, node, svc, url)
    try:
        inq, sink = clients(node, svc)
        ids = put_many(inq, 2000)
        wait_until(lambda: length(sink) >= 300, what="results flowing")
        e1.stop()  # kill -9 with items in flight
        results = drain_sink(sink, 2000)
        got = [df.tags["requestId"] for df in results]
        assert len(got) == len(set(got)), "a request id appeared twice in the sink"
        assert set(got) == set(ids)
        wait_until(lambda: length(inq) == 0, what="input queue empty")
    finally:
        e1.stop()
        e2.stop()
        m.stop()


def test_failing_model_sets_last_code(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN)
    m, url = model(tmpdir_factory_path, "--fail-every", "1", "--fail-status", "500")
    e = engine(tmpdir_factory_path, node, svc, url)
    try:
        inq, sink = clients(node, svc)
        _, rid = inq.put('[{"a": 1}]')
        [df] = sink.get(request_id=rid, timeout="20s")
        assert df.tags["lastCode"] == "500"
    finally:
        e.stop()
        m.stop()


def test_empty_body_writes_nothing(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN)
    m, url = model(tmpdir_factory_path, "--empty")
    e = engine(tmpdir_factory_path, node, svc, url)
    try:
        inq, sink = clients(node, svc)
        for _ in range(5):
            inq.put('[{"a": 1}]')
        wait_until(lambda: length(inq) == 0, what="inputs consumed")
        assert length(sink) == 0
    finally:
        e.stop()
        m.stop()


def test_full_sink_holds_the_engine_back(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN, sink_max_length=2)
    m, url = model(tmpdir_factory_path)
    e = engine(tmpdir_factory_path, node, svc, url, concurrency=2)
    try:
        inq, sink = clients(node, svc)
        for i in range(10):
            inq.put(f'[{{"i": {i}}}]')
        wait_until(lambda: length(sink) == 2, what="sink full")
        # The engine holds its two slots: two items in flight, the rest waits.
        wait_until(lambda: int(inq.attributes()["stream.inFlight"]) == 2, what="engine holding its window")
        assert length(inq) == 8
        # Reading the sink makes room and the work resumes.
        results = drain_sink(sink, 10)
        assert len({df.tags["requestId"] for df in results}) == 10
        wait_until(lambda: length(inq) == 0, what="inputs consumed")
    finally:
        e.stop()
        m.stop()


def test_unreachable_model_dead_letters_after_max_deliveries(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN, max_delivery=3)
    dead_port = free_port()  # nothing listens here
    e = engine(tmpdir_factory_path, node, svc, f"http://127.0.0.1:{dead_port}")
    try:
        inq, sink = clients(node, svc)
        inq.put('[{"a": 1}]')
        wait_until(lambda: inq.attributes()["stream.deadLetters"] == "1", timeout=30, what="dead letter")
        assert length(inq) == 0 and length(sink) == 0
    finally:
        e.stop()


def test_dead_letters_are_capped_and_purged_from_the_admin_api(node, tmpdir_factory_path):
    import urllib.error
    import urllib.request
    svc = node.create_service(token=TOKEN, max_delivery=1, max_dead_letters=2)
    dead_port = free_port()  # nothing listens here
    e = engine(tmpdir_factory_path, node, svc, f"http://127.0.0.1:{dead_port}")

    def dropped():
        with urllib.request.urlopen(node.url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f'eddy_queue_dead_letters_dropped_total{{service="{svc}",queue="input"}}'):
                    return int(line.split()[-1])
        return None

    try:
        inq, _ = clients(node, svc)
        for i in range(3):
            inq.put(f'[{{"a": {i}}}]')
        wait_until(lambda: dropped() == 1, timeout=30, what="oldest dead letter dropped")
        assert inq.attributes()["stream.deadLetters"] == "2"
        req = urllib.request.Request(node.url + f"/admin/services/{svc}/dead-letters?queue=bogus", method="DELETE")
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("a bogus queue was accepted")
        except urllib.error.HTTPError as err:
            assert err.code == 400
        req = urllib.request.Request(node.url + f"/admin/services/{svc}/dead-letters?queue=input", method="DELETE")
        assert urllib.request.urlopen(req, timeout=5).status == 200
        assert inq.attributes()["stream.deadLetters"] == "0"
        assert dropped() == 3
    finally:
        e.stop()


def test_graceful_shutdown_finishes_work_in_progress(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN)
    m, url = model(tmpdir_factory_path, "--delay-ms", "1500")
    e = engine(tmpdir_factory_path, node, svc, url, concurrency=2)
    try:
        inq, sink = clients(node, svc)
        ids = [inq.put(f'[{{"i": {i}}}]')[1] for i in range(4)]
        wait_until(lambda: int(inq.attributes()["stream.inFlight"]) == 2, what="two items in progress")
        # Delivered is not yet started: wait until the model has both calls.
        import urllib.request
        wait_until(lambda: json.loads(urllib.request.urlopen(url + "/stats", timeout=1).read())["served"] == 2,
                   what="the model serving two requests")
        e.signal(signal.SIGTERM)
        assert e.wait(timeout=30) == 0
        # The two in progress were finished; the others are still queued.
        assert length(sink) == 2
        assert length(inq) == 2
        assert int(inq.attributes()["stream.inFlight"]) == 0
    finally:
        e.stop()
        m.stop()


def test_sync_endpoint_calls_the_model(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN)
    m, url = model(tmpdir_factory_path)
    port = free_port()
    e = engine(tmpdir_factory_path, node, svc, url, "--listen", f"127.0.0.1:{port}")
    try:
        import json
        import urllib.request
        def call(token=TOKEN):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/predict/{svc}", data=b'[{"a": 1}, {"b": 2}]',
                                         method="POST", headers={"Authorization": token})
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())
        wait_until(lambda: len(call()) == 2, what="sync endpoint")
        out = call()
        assert all(abs(o["p_0"] + o["p_1"] - 1) < 1e-9 for o in out)
        # The synchronous endpoint checks the service token like the queue.
        import urllib.error
        with pytest.raises(urllib.error.HTTPError) as refused:
            call(token="wrong")
        assert refused.value.code == 401
    finally:
        e.stop()
        m.stop()


def test_engine_metrics_count_model_answers_and_results(node, tmpdir_factory_path):
    import re
    import urllib.request
    svc = node.create_service(token=TOKEN)
    m, url = model(tmpdir_factory_path, "--fail-every", "2", "--fail-status", "503")
    port = free_port()
    e = engine(tmpdir_factory_path, node, svc, url, "--listen", f"127.0.0.1:{port}", concurrency=1)

    def metrics():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {k: float(v) for k, v in re.findall(r"^(eddy_engine_\S+) (\S+)$", text, re.M)}
    try:
        wait_until(lambda: "eddy_engine_in_flight" in metrics(), what="engine metrics")
        inq, sink = clients(node, svc)
        for i in range(6):
            inq.put(f'[{{"i": {i}}}]')
        results = drain_sink(sink, 6)
        assert sorted(df.tags.get("lastCode", "200") for df in results) == ["200"] * 3 + ["503"] * 3
        wait_until(lambda: metrics()["eddy_engine_results_written_total"] == 6, what="six results counted")
        got = metrics()
        assert got['eddy_engine_model_responses_total{status="200"}'] == 3
        assert got['eddy_engine_model_responses_total{status="503"}'] == 3
        assert got["eddy_engine_model_seconds_count"] == 6
        assert got['eddy_engine_model_seconds_bucket{le="+Inf"}'] == 6
        assert got["eddy_engine_in_flight"] == 0 and got["eddy_engine_concurrency"] == 1
        assert got["eddy_engine_model_failures_total"] == 0
        assert got["eddy_engine_duplicates_total"] == 0 and got["eddy_engine_empty_answers_total"] == 0
    finally:
        e.stop()
        m.stop()


def test_sync_endpoint_bounds_its_callers(node, tmpdir_factory_path):
    svc = node.create_service(token=TOKEN)
    m, url = model(tmpdir_factory_path, "--delay-ms", "1500")
    port = free_port()
    e = engine(tmpdir_factory_path, node, svc, url, "--listen", f"127.0.0.1:{port}", concurrency=1)
    try:
        import urllib.error
        import urllib.request

        def call():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/predict/{svc}", data=b'[{"a": 1}]',
                                         method="POST", headers={"Authorization": TOKEN})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200,
                   what="sync endpoint up")
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("status", call()))
        t.start()
        wait_until(lambda: json.loads(urllib.request.urlopen(url + "/stats", timeout=1).read())["served"] >= 1,
                   what="the first call at the model")
        assert call() == 429, "a second caller beyond the engine's concurrency is refused at once"
        t.join(timeout=10)
        assert first["status"] == 200
    finally:
        e.stop()
        m.stop()


def test_engine_moves_past_a_black_hole_endpoint(node, tmpdir_factory_path):
    import socket
    svc = node.create_service(token=TOKEN)
    m, url = model(tmpdir_factory_path)
    # A node that accepts connections and never answers.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    accepted = []
    stop = threading.Event()

    def swallow():
        hole.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(hole.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=swallow, daemon=True)
    t.start()
    black_hole = f"127.0.0.1:{hole.getsockname()[1]}"
    e = Proc(["engine", "-e", f"{black_hole},{node.endpoint}", "--service", svc, "-t", TOKEN, "--model", url,
              "--concurrency", "2", "--eddy-timeout-ms", "2000"],
             os.path.join(tmpdir_factory_path, "engine-black-hole.log"))
    try:
        inq, sink = clients(node, svc)
        _, rid = inq.put('[{"a": 1}]')
        # Old engine: hung on the black hole's WebSocket handshake for good.
        [df] = sink.get(request_id=rid, timeout="20s")
        assert df.tags["requestId"] == rid
        assert accepted, "the engine never tried the black hole"
        assert e.p.poll() is None
    finally:
        e.stop()
        m.stop()
        stop.set()
        t.join(timeout=5)
        for c in accepted:
            c.close()
        hole.close()


def test_a_trace_context_travels_from_put_to_model_to_result(node, tmpdir_factory_path):
    """A W3C traceparent given on a put reaches the model (same trace, the
    engine's own parent id) and comes back on the result; a malformed one
    is dropped, not refused."""
    import http.server
    import urllib.request

    seen = []

    class Model(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(self.headers.get("traceparent"))
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Model)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    svc = node.create_service(token=TOKEN)
    e = engine(tmpdir_factory_path, node, svc, f"http://127.0.0.1:{server.server_address[1]}")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = f"00-{trace}-00f067aa0ba902b7-01"
    try:
        def put(traceparent):
            req = urllib.request.Request(f"{node.url}/api/predict/{svc}", data=b"[1]", method="POST",
                                         headers={"Authorization": TOKEN, "traceparent": traceparent})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
                return r.headers["X-Eas-Queueservice-Request-Id"]
        traced = put(sent)
        untraced = put("00-not-a-trace-context")
        _, sink = clients(node, svc)
        [result] = sink.get(request_id=traced, timeout="20s")
        assert result.tags["traceparent"] == sent
        [plain] = sink.get(request_id=untraced, timeout="20s")
        assert "traceparent" not in plain.tags
        wait_until(lambda: len(seen) == 2, what="two model calls")
        [child] = [t for t in seen if t]
        version, trace_id, parent, flags = child.split("-")
        assert (version, trace_id, flags) == ("00", trace, "01")
        assert parent != "00f067aa0ba902b7" and len(parent) == 16
        assert seen.count(None) == 1
    finally:
        e.stop()
        server.shutdown()
