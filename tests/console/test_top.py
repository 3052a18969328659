"""`eddy top` against a live node: the services with their figures and
the consumers holding items, with rates from the second screen on."""

import subprocess
import urllib.request
import uuid

import websocket

from eddy_harness import eddy_binary, wait_until

TOKEN = "top-token"


def test_top_shows_queues_consumers_and_rates(node):
    svc = node.create_service("top-" + uuid.uuid4().hex[:6], token=TOKEN)
    for i in range(5):
        req = urllib.request.Request(f"{node.url}/api/predict/{svc}", data=f"job {i}".encode(), method="POST",
                                     headers={"Authorization": TOKEN})
        urllib.request.urlopen(req, timeout=10).read()
    ws = websocket.create_connection(
        f"ws://{node.endpoint}/api/predict/{svc}?_watch_=true&_index_=0&_window_=2",
        header=[f"Authorization: {TOKEN}", "X-EAS-QueueService-Redis-Uid: worker-1",
                "X-EAS-QueueService-Redis-Gid: gpu-pool"], timeout=10)
    try:
        ws.recv()
        ws.recv()

        def screens():
            out = subprocess.run([eddy_binary(), "top", "-e", node.endpoint, "--iterations", "2",
                                  "--interval-ms", "200", "--plain"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            return out
        out = screens()
        first, second = out.split("eddy top · ")[1:]
        row = next(line for line in second.splitlines() if line.startswith(svc) and " input " in line)
        # length 5, backlog 3, 2 in flight of a window of 2, no rate on
        # an idle queue but a figure (not "-") from the second screen on.
        fields = row.split()
        assert fields[2:6] == ["5", "3", "2", "2/2"], row
        assert fields[7] == "0.0" and fields[8] == "0.0", row
        first_row = next(line for line in first.splitlines() if line.startswith(svc) and " input " in line)
        assert first_row.split()[7] == "-", first_row
        consumer = next(line for line in second.splitlines() if "gpu-pool" in line)
        assert "worker-1" in consumer and "running" in consumer, consumer
        assert consumer.split()[6] == "2", consumer
    finally:
        ws.close()
