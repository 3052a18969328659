"""Protocol details beyond what the Python SDK exercises, spoken raw:
status codes for bad input, priority, count, tag filters, negative commit,
the HTTP-streaming watch, the bare `/` paths, and a garbage feed."""

import base64
import json
import random
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import websocket
from eas_prediction.queue_types.queueservice_pb2 import DataFrameListProto, DataFrameProto

from eddy_harness import wait_until

TOKEN = "proto-token"
PB = "application/vnd.google.protobuf"


def call(node, method, path, body=None, headers=None, timeout=10):
    h = {"Authorization": TOKEN, "X-EAS-QueueService-Redis-Uid": "u1", "X-EAS-QueueService-Redis-Gid": "eas"}
    h.update(headers or {})
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(node.url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.fixture
def svc(node):
    return node.create_service(token=TOKEN, max_length=5, max_payload_bytes=16, consumer_grace_ms=300, max_delivery=2)


def put(node, svc, data="x", query=""):
    status, body, headers = call(node, "POST", f"/api/predict/{svc}{query}", data)
    assert status == 200, body
    assert body.decode().isdigit(), body
    return int(body), headers["X-Eas-Queueservice-Request-Id"]


def attrs(node, svc, sink=False):
    status, body, _ = call(node, "GET", f"/api/predict/{svc}{'/sink' if sink else ''}?_attrs_=true")
    assert status == 200
    return json.loads(body)


def test_put_body_is_bare_index_and_json_get(node, svc):
    status, body, headers = call(node, "POST", f"/api/predict/{svc}", "abc")
    assert status == 200 and body.isdigit() and not body.endswith(b"\n")
    rid = headers["X-Eas-Queueservice-Request-Id"]
    status, body, _ = call(node, "GET", f"/api/predict/{svc}?_index_={int(body)}&_length_=1&_timeout_=0s&_raw_=false&_auto_delete_=false")
    assert status == 200
    [frame] = json.loads(body)
    assert frame["data"] == base64.b64encode(b"abc").decode()
    assert frame["tags"]["requestId"] == rid


def test_bad_input_gets_clear_status_and_changes_nothing(node, svc):
    put(node, svc, "keep")
    before = attrs(node, svc)["stream.length"]
    cases = [
        ("POST", f"/api/predict/{svc}", "x" * 17, {}, 413),
        ("POST", f"/api/predict/{svc}", "x", {"Authorization": "nope"}, 401),
        ("POST", "/api/predict/no-such-service", "x", {}, 404),
        ("GET", f"/api/predict/{svc}?_index_=abc", None, {}, 400),
        ("GET", f"/api/predict/{svc}?_length_=-3", None, {}, 400),
        ("GET", f"/api/predict/{svc}?_timeout_=forever", None, {}, 400),
        ("PUT", f"/api/predict/{svc}?_indexes_=1,x", None, {}, 400),
        ("PUT", f"/api/predict/{svc}", None, {}, 400),
        ("DELETE", f"/api/predict/{svc}?_indexes_=-1", None, {}, 400),
        ("GET", f"/api/predict/{svc}?_watch_=true&_window_=0", None, {}, 400),
        ("POST", f"/api/predict/{svc}?_priority_=high", "x", {}, 400),
    ]
    for method, path, body, headers, expected in cases:
        status, text, _ = call(node, method, path, body, headers)
        assert status == expected, (method, path, status, text)
        assert text.strip(), "an error has a short text body"
    assert attrs(node, svc)["stream.length"] == before
    # unknown control parameters are ignored
    status, _, _ = call(node, "POST", f"/api/predict/{svc}?_bogus_=1", "y")
    assert status == 200


def test_full_queue_is_429_or_evicts(node, svc):
    for i in range(5):
        put(node, svc, str(i))
    status, body, _ = call(node, "POST", f"/api/predict/{svc}", "overflow")
    assert status == 429, body
    assert attrs(node, svc)["stream.length"] == "5"
    ev = node.create_service(token=TOKEN, max_length=2, evict_oldest=True)
    first, _ = put(node, ev, "a")
    put(node, ev, "b")
    put(node, ev, "c")
    a = attrs(node, ev)
    assert a["stream.length"] == "2" and int(a["stream.firstEntry"]) > first


def test_priority_and_count(node, svc):
    put(node, svc, "n1")
    put(node, svc, "n2")
    p, _ = put(node, svc, "p1", "?_priority_=1")
    status, body, _ = call(node, "GET", f"/api/predict/{svc}?_count_=true&_priority_=1")
    assert (status, body) == (200, b"1")
    status, body, _ = call(node, "GET", f"/api/predict/{svc}?_count_=true")
    assert body == b"3"
    ws = watch(node, svc, "_window_=10")
    first = DataFrameProto.FromString(ws.recv())
    assert first.index == p and first.data == b"p1"
    ws.close()


def watch(node, svc, query, uid=None, sink=False):
    url = f"ws://{node.endpoint}/api/predict/{svc}{'/sink' if sink else ''}?_watch_=true&_index_=0&{query}"
    return websocket.create_connection(url, header=[
        f"Authorization: {TOKEN}",
        f"X-EAS-QueueService-Redis-Uid: {uid or uuid.uuid4()}",
        "X-EAS-QueueService-Redis-Gid: eas",
        f"Accept: {PB}",
    ], timeout=10)


def test_tag_filter_and_index_only(node, svc):
    x, _ = put(node, svc, "x", "?foo=bar")
    put(node, svc, "y")
    ws = watch(node, svc, "_window_=5&_index_only_=true&foo=bar")
    opcode, payload = ws.recv_data()
    assert opcode == websocket.ABNF.OPCODE_BINARY
    frame = DataFrameProto.FromString(payload)
    assert frame.index == x and frame.data == b"" and frame.tags["foo"] == "bar"
    lines = [v for k, v in attrs(node, svc).items() if k.startswith("consumers.list")]
    assert any("Tags: tags[foo=bar]" in l for l in lines)
    ws.settimeout(0.5)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv()
    ws.close()


def test_ping_gets_pong(node, svc):
    ws = watch(node, svc, "_window_=1")
    for payload in (b"ping", b""):
        ws.ping(payload)
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_PONG and data == payload
    ws.close()


def test_negative_commit_redelivers_then_dead_letters(node, svc):
    idx, _ = put(node, svc, "job")
    ws = watch(node, svc, "_window_=1")
    assert DataFrameProto.FromString(ws.recv()).index == idx
    status, body, _ = call(node, "PUT", f"/api/predict/{svc}?_indexes_={idx}&_negative_=true",
                           "_code_=Shutdown&_reason_=bye", {"Content-Type": "application/x-www-form-urlencoded"})
    assert (status, body) == (200, b"OK")
    again = DataFrameProto.FromString(ws.recv())
    assert again.index == idx and again.message == "Shutdown: bye"
    call(node, "PUT", f"/api/predict/{svc}?_indexes_={idx}&_negative_=true", "_code_=Error")
    wait_until(lambda: attrs(node, svc)["stream.deadLetters"] == "1", what="dead letter")
    assert attrs(node, svc)["stream.length"] == "0"
    status, body, _ = call(node, "GET", f"/api/predict/{svc}?_dead_=true")
    assert status == 200 and json.loads(body)[0]["index"] == idx
    ws.close()


def test_http_streaming_watch(node, svc):
    put(node, svc, "s1")
    url = node.url + f"/api/predict/{svc}?_watch_=true&_index_=0&_window_=5&_index_only_=false&_auto_commit_=true"
    req = urllib.request.Request(url, headers={"Authorization": TOKEN, "Accept": PB})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        (n,) = struct.unpack(">I", r.read(4))
        frame = DataFrameProto.FromString(r.read(n))
    assert frame.data == b"s1"
    wait_until(lambda: attrs(node, svc)["stream.length"] == "0", what="auto-commit")


def test_long_poll_returns_on_put_and_times_out_with_204(node, svc):
    start = time.monotonic()
    status, _, _ = call(node, "GET", f"/api/predict/{svc}?_index_=0&_length_=1&_timeout_=500ms")
    assert status == 204 and 0.4 < time.monotonic() - start < 3
    import threading
    threading.Timer(0.3, lambda: put(node, svc, "late")).start()
    start = time.monotonic()
    status, body, _ = call(node, "GET", f"/api/predict/{svc}?_index_=0&_length_=1&_timeout_=1m0s&_auto_delete_=true",
                           headers={"Accept": PB})
    assert status == 200 and time.monotonic() - start < 5
    assert DataFrameListProto.FromString(body).index[0].data == b"late"


def test_attributes_protobuf_without_identity(node, svc):
    from eas_prediction.queue_types.queueservice_pb2 import AttributesProto
    req = urllib.request.Request(node.url + f"/api/predict/{svc}?_attrs_=true", headers={"Authorization": TOKEN, "Accept": PB})
    with urllib.request.urlopen(req, timeout=10) as r:
        a = AttributesProto.FromString(r.read()).attributes
    assert a["meta.header.user"] == "X-EAS-QueueService-Redis-Uid"


def test_sub_path_put_lands_on_input_queue(node, svc):
    status, body, _ = call(node, "POST", f"/api/predict/{svc}/videox_fun/infer_forward", "{}")
    assert status == 200
    assert attrs(node, svc)["stream.length"] == "1"


def test_garbage_never_breaks_the_server(node, svc):
    # Random requests may be valid destructive ones (truncate, delete), so
    # the item that must survive lives in another service.
    other = node.create_service(token=TOKEN)
    kept, rid = put(node, other, "kept")
    rng = random.Random(7)
    alphabet = "_=&%?/+-,.:;\\\"'<>[]{}\x00\xff azAZ09" + "é中"
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    for _ in range(300):
        q = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for key in ("_index_", "_indexes_", "_timeout_", "_window_", "_length_", "_trunc_", "_priority_"):
            if rng.random() < 0.3:
                # long polls are legitimate waits, so timeouts stay short here
                values = ['x', '-1', '0s', '', '%zz', '5x', '0'] if key == "_timeout_" else \
                    ['-1', '0', '9' * 30, 'x', '1,,2', '1e9', '', '%zz', '5s']
                q += f"&{key}={rng.choice(values)}"
        path = f"/api/predict/{svc}" + rng.choice(["", "/sink", "/a/b"]) + "?" + urllib.parse.quote(q, safe="=&_,")
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 32)))
        status, _, _ = call(node, rng.choice(methods), path, body, timeout=10)
        assert status < 500, (path, status)
    for _ in range(30):
        try:
            ws = watch(node, svc, "_window_=1")
            ws.send_binary(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))))
            ws.send(rng.choice(["hello", "", "{}"]))
            ws.close()
        except Exception:
            pass
    status, body, _ = call(node, "GET", f"/healthz")
    assert status == 200
    status, body, _ = call(node, "GET", f"/api/predict/{other}?requestId={rid}&_raw_=true")
    assert status == 200 and body == b"kept"


def test_bare_root_paths_serve_the_default_service(tmpdir_factory_path):
    from eddy_harness import Node
    n = Node(tmpdir_factory_path, extra=["--service", "bare:tk"]).start()
    try:
        status, body, headers = call(n, "POST", "/", "root", {"Authorization": "tk"})
        assert status == 200
        status, body, _ = call(n, "POST", "/sink", "s", {"Authorization": "tk"})
        assert status == 200
        status, body, _ = call(n, "GET", "/sink?_attrs_=true", headers={"Authorization": "tk"})
        assert json.loads(body)["meta.name"] == "bare/sink"
    finally:
        n.kill()


def test_finding4_result_written_under_a_request_id_is_fetched_by_it(node, svc):
    _, rid = put(node, svc, "job")
    status, body, headers = call(node, "POST", f"/api/predict/{svc}/sink?requestId={rid}", "res")
    assert status == 200, body
    assert headers["X-Eas-Queueservice-Request-Id"] == rid
    status, body, _ = call(node, "GET", f"/api/predict/{svc}/sink?requestId={rid}&_raw_=false&_timeout_=0s")
    assert status == 200, body
    [frame] = json.loads(body)
    assert base64.b64decode(frame["data"]) == b"res" and frame["tags"]["requestId"] == rid


def test_finding4_input_put_with_a_request_id_is_idempotent_and_checked(node, svc):
    first = put(node, svc, "a", "?requestId=client-42")
    assert first[1] == "client-42"
    # a retry after a lost reply (or a 503) answers the same item
    assert put(node, svc, "a", "?requestId=client-42") == first
    assert attrs(node, svc)["stream.length"] == "1"
    for bad in ["has%20space", "x" * 129, "", "new%0Aline", "%C3%A9"]:
        status, text, _ = call(node, "POST", f"/api/predict/{svc}?requestId={bad}", "b")
        assert status == 400 and text.strip(), (bad, status, text)
    assert attrs(node, svc)["stream.length"] == "1"


def test_finding5_raw_take_deletes_one_item_only(node, svc):
    for d in "abcde":
        put(node, svc, d)
    status, body, _ = call(node, "GET", f"/api/predict/{svc}?_length_=5&_auto_delete_=true&_raw_=true")
    assert (status, body) == (200, b"a")
    assert attrs(node, svc)["stream.length"] == "4"
    # without _raw_ (a bare payload as well) it is one item too
    status, body, _ = call(node, "GET", f"/api/predict/{svc}?_length_=5&_auto_delete_=true")
    assert (status, body) == (200, b"b")
    assert attrs(node, svc)["stream.length"] == "3"


def test_finding6_complete_checks_the_request_id_and_tells_gone_from_duplicate(node, svc):
    a, ra = put(node, svc, "a")
    b, rb = put(node, svc, "b")
    sink = f"/api/predict/{svc}/sink"

    def lengths():
        return attrs(node, svc)["stream.length"], attrs(node, svc, sink=True)["stream.length"]

    # not a header value: refused before anything is written or committed
    status, text, _ = call(node, "POST", f"{sink}?_complete_={a}&requestId=bad%0Aid", "r")
    assert status == 400, text
    assert lengths() == ("2", "0")
    # another request's id
    status, text, _ = call(node, "POST", f"{sink}?_complete_={a}&requestId={rb}", "r")
    assert status == 409 and rb in text.decode(), text
    status, text, _ = call(node, "POST", f"{sink}?_complete_={a}&requestId={rb}", "")
    assert status == 409, text
    assert lengths() == ("2", "0")
    # the input is gone and no result exists: the result is not written
    call(node, "DELETE", f"/api/predict/{svc}?_indexes_={b}")
    status, text, _ = call(node, "POST", f"{sink}?_complete_={b}&requestId={rb}", "r")
    assert status == 410 and b"not written" in text, text
    assert lengths() == ("1", "0")
    # done once, then a duplicate
    status, body, headers = call(node, "POST", f"{sink}?_complete_={a}&requestId={ra}", "r")
    assert status == 200 and body.isdigit() and headers["x-eddy-duplicate"] == "false"
    status, body, headers = call(node, "POST", f"{sink}?_complete_={a}&requestId={ra}", "r")
    assert status == 200 and headers["x-eddy-duplicate"] == "true"
    assert lengths() == ("0", "1")


def test_finding9_plain_get_answers_the_payload_like_the_eas_documentation(node, svc):
    idx, rid = put(node, svc, "[{}]")
    plain = {"Authorization": TOKEN}
    req = urllib.request.Request(node.url + f"/api/predict/{svc}?_index_={idx}&_auto_delete_=false", headers=plain)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert r.headers["Content-Length"] == "4"
        assert r.read() == b"[{}]"
    result = '[{"p_0":0.52}]'
    status, _, _ = call(node, "POST", f"/api/predict/{svc}/sink?requestId={rid}", result)
    assert status == 200
    req = urllib.request.Request(node.url + f"/api/predict/{svc}/sink?requestId={rid}", headers=plain)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert r.read() == result.encode()
    # what the SDKs send keeps the list: _raw_=false (JSON), or a protobuf Accept
    status, body, headers = call(node, "GET", f"/api/predict/{svc}?_index_={idx}&_auto_delete_=false&_raw_=false")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [f["index"] for f in json.loads(body)] == [idx]
    status, body, _ = call(node, "GET", f"/api/predict/{svc}?_index_={idx}&_auto_delete_=false", headers={"Accept": PB})
    assert [f.index for f in DataFrameListProto.FromString(body).index] == [idx]
