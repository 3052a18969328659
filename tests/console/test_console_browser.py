"""The web console driven in headless Chromium against a live three-node
cluster with a backlog, two consumer groups and a dead letter: each page
shows the right figures, an action without the admin token is refused,
requeueing a dead letter works, and the cluster page names the new leader
after the leader is killed. Screenshots go to target/console-screenshots/.

Needs Debian's `chromium` and `chromium-driver` and `selenium` from PyPI
(tests/run.sh installs them)."""

import json
import os
import shutil
import signal
import threading
import urllib.error
import urllib.request
import uuid

import pytest
import websocket
from eas_prediction.queue_types.queueservice_pb2 import DataFrameProto
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from eddy_harness import ROOT, wait_until

TOKEN = "console-token"
SHOTS = os.path.join(ROOT, "target", "console-screenshots")


def call(node, method, path, body=None, headers=None):
    h = {"Authorization": TOKEN}
    h.update(headers or {})
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(node.url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def attrs(node, svc):
    status, body = call(node, "GET", f"/api/predict/{svc}?_attrs_=true")
    assert status == 200, body
    return json.loads(body)


def watch(node, svc, group, window):
    url = f"ws://{node.endpoint}/api/predict/{svc}?_watch_=true&_index_=0&_window_={window}"
    return websocket.create_connection(url, header=[
        f"Authorization: {TOKEN}",
        f"X-EAS-QueueService-Redis-Uid: {group}-{uuid.uuid4().hex[:6]}",
        f"X-EAS-QueueService-Redis-Gid: {group}",
        "Accept: application/vnd.google.protobuf",
    ], timeout=10)


def drain_socket(ws):
    try:
        while True:
            ws.recv()
    except Exception:
        pass


def chromium_driver(javascript=True):
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "chromium and chromium-driver are required (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    # Chromium now and then fails to come up on a loaded machine (its
    # DevTools port file appears late); a second start is enough.
    for attempt in range(3):
        try:
            driver = webdriver.Chrome(service=Service(driver_path), options=options)
            break
        except Exception:
            if attempt == 2:
                raise
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = chromium_driver()
    os.makedirs(SHOTS, exist_ok=True)
    yield driver
    driver.quit()


def shot(browser, name):
    browser.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def outcome(browser):
    """The outcome line of the page a submitted action leads to."""
    return WebDriverWait(browser, 15).until(
        expected_conditions.presence_of_element_located((By.ID, "outcome"))).text


def cell(browser, row_id, cls):
    return browser.find_element(By.CSS_SELECTOR, f"tr#{row_id} td.{cls}").text


def test_console_pages_actions_and_failover(browser, cluster):
    c = cluster
    leader = c.leader()
    followers = [n for n in c.nodes if n is not leader]
    a, b = followers
    svc = leader.create_service("console-demo", token=TOKEN, max_delivery=2, consumer_grace_ms=300)

    # A dead letter: the first request fails on both of its deliveries,
    # and the worker that failed it goes away.
    status, body = call(a, "POST", f"/api/predict/{svc}", "request 0")
    assert status == 200, body
    triage = watch(a, svc, "triage", 1)
    first = DataFrameProto.FromString(triage.recv())
    for attempt in range(2):
        if attempt:
            assert DataFrameProto.FromString(triage.recv()).index == first.index
        status, _ = call(a, "PUT", f"/api/predict/{svc}?_indexes_={first.index}&_negative_=true",
                         "_code_=500&_reason_=model crashed",
                         {"Content-Type": "application/x-www-form-urlencoded",
                          "X-EAS-QueueService-Redis-Gid": "triage"})
        assert status == 200
    triage.close()
    wait_until(lambda: attrs(a, svc)["stream.deadLetters"] == "1", what="the dead letter")
    # A backlog of five more requests, put through different nodes.
    for i in range(1, 6):
        status, body = call(c.nodes[i % 3], "POST", f"/api/predict/{svc}", f"request {i}")
        assert status == 200, body
    # Two consumer groups: "workers" (window 2, on node a) and "audit"
    # (window 1, on node b), both on followers so they outlive the leader.
    workers = watch(a, svc, "workers", 2)
    audit = watch(b, svc, "audit", 1)
    for ws in (workers, audit, workers):
        DataFrameProto.FromString(ws.recv())
    # Keep reading (and so answering the nodes' pings) while the browser
    # works: both windows are full, so nothing more arrives.
    for ws in (workers, audit):
        threading.Thread(target=drain_socket, args=(ws,), daemon=True).start()

    seen = {}

    def settled():
        at = attrs(a, svc)
        seen.clear()
        seen.update(at)
        return at["stream.length"] == "5" and at["stream.inFlight"] == "3" and not any(
            "triage" in v for k, v in at.items() if k.startswith("consumers.list"))
    wait_until(settled, what="three items in flight, the triage worker gone", on_timeout=lambda: seen)

    # Cluster page, from a follower: three members, all reachable, the leader named.
    browser.get(f"{a.url}/ui?refresh=0")
    assert browser.find_element(By.ID, "leader").text == str(leader.node_id)
    assert f"node {a.node_id}" in browser.find_element(By.ID, "served-by").text
    rows = browser.find_elements(By.CSS_SELECTOR, "table#members tr[id^=member-]")
    assert len(rows) == 3
    assert [r.find_element(By.CSS_SELECTOR, "td.role").text for r in rows].count("leader") == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "table#members td.ok")) == 3
    assert not browser.find_elements(By.ID, "no-leader")
    shot(browser, "1-cluster")

    # Services page: five requests left on the input (one dead-lettered),
    # three in flight to two consumers, one dead letter.
    browser.get(f"{b.url}/ui/services?refresh=0")
    row = f"svc-{svc}-input"
    assert cell(browser, row, "length") == "5"
    assert cell(browser, row, "in-flight") == "3"
    assert cell(browser, row, "consumers") == "2"
    assert cell(browser, row, "dead-letters") == "1"
    shot(browser, "2-services")
    # The same page reads the same with JavaScript off.
    plain = chromium_driver(javascript=False)
    try:
        plain.get(f"{b.url}/ui/services?refresh=0")
        assert cell(plain, row, "length") == "5" and cell(plain, row, "dead-letters") == "1"
        plain.save_screenshot(os.path.join(SHOTS, "2-services-no-javascript.png"))
    finally:
        plain.quit()

    # The service: both groups' consumers, the dead letter with its reason.
    browser.get(f"{b.url}/ui/services/{svc}?refresh=0")
    groups = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "table#input-consumers td.group")}
    assert groups == {"workers", "audit"}
    holds = sorted(int(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "table#input-consumers td.holds"))
    assert holds == [1, 2]
    dead = browser.find_element(By.ID, "input-dead-letters").text
    assert "500: model crashed" in dead and str(first.index) in dead
    shot(browser, "3-service")

    # Requeue without the admin token: refused, nothing changes.
    browser.find_element(By.CSS_SELECTOR, "table#input-dead-letters a").click()
    assert "Put dead letter" in browser.find_element(By.ID, "what").text
    browser.find_element(By.NAME, "confirm").click()
    browser.find_element(By.ID, "confirm-action").click()
    refused = outcome(browser)
    assert "401" in refused, f"{refused}\n{browser.page_source}"
    shot(browser, "4-refused")
    assert attrs(b, svc)["stream.deadLetters"] == "1"

    # With the token: the dead letter is a new item again.
    browser.get(f"{b.url}/ui/confirm/requeue-dead-letters?service={svc}&queue=input&index={first.index}")
    browser.find_element(By.NAME, "admin_token").send_keys(c.admin_token)
    browser.find_element(By.NAME, "confirm").click()
    browser.find_element(By.ID, "confirm-action").click()
    done = outcome(browser)
    assert "1 dead letter(s)" in done and "requeued" in done, done
    shot(browser, "5-requeued")
    wait_until(lambda: attrs(b, svc)["stream.deadLetters"] == "0", what="no dead letter left")
    assert attrs(b, svc)["stream.length"] == "6"

    # Kill the leader: a survivor's cluster page names a new leader and
    # shows the dead member unreachable.
    leader.kill(signal.SIGKILL)

    def new_leader_shown():
        browser.get(f"{a.url}/ui?refresh=0")
        shown = browser.find_element(By.ID, "leader").text
        return shown not in ("none", str(leader.node_id))
    wait_until(new_leader_shown, timeout=30, interval=0.5, what="a new leader on the cluster page")
    dead_row = browser.find_element(By.ID, f"member-{leader.node_id}")
    assert dead_row.find_element(By.CSS_SELECTOR, "td.bad").text == "no"
    shot(browser, "6-new-leader")
    for ws in (workers, audit):
        ws.close()
