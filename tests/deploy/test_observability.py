"""The Grafana dashboard (deploy/grafana/eddy.json) and the Prometheus alert
rules (deploy/prometheus/alerts.yml) parse, are complete, and name only
metrics a live node serves at /metrics."""

import json
import os
import re
import urllib.request

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# Series Prometheus makes itself, not served by Eddy.
PROMETHEUS_OWN = {"up"}
METRIC = re.compile(r"\b(eddy_[a-z0-9_]+)")


def dashboard():
    with open(os.path.join(ROOT, "deploy", "grafana", "eddy.json")) as f:
        return json.load(f)


def alert_rules():
    with open(os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")) as f:
        doc = yaml.safe_load(f)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def served_metrics(node):
    """Names declared by `# TYPE` on the node's /metrics, with the series
    names a histogram adds."""
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            names.add(m.group(1))
            if m.group(2) == "histogram":
                names.update(m.group(1) + s for s in ("_bucket", "_sum", "_count"))
    return names


def balanced(expr):
    depth = 0
    for ch in expr:
        depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_dashboard_is_complete_and_names_served_metrics(node):
    d = dashboard()
    assert d["title"] and d["uid"]
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"]), "panel ids repeat"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ["backlog", "oldest", "puts", "commits", "window occupancy", "redeliveries",
                  "dead letters", "term", "leader", "replication lag", "fsync"]:
        assert topic in titles, f"no panel about {topic}"
    served = served_metrics(node)
    used = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert balanced(t["expr"]), t["expr"]
            used.update(METRIC.findall(t["expr"]))
    missing = used - served
    assert not missing, f"the dashboard names metrics a node does not serve: {missing}"
    assert len(used) >= 15


def test_alert_rules_are_complete_and_name_served_metrics(node):
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert names >= {"EddyNoLeader", "EddyFollowerLagging", "EddyBacklogOld",
                     "EddyDeadLettersGrowing", "EddyFsyncSlow", "EddyNodeNotReady"}
    served = served_metrics(node)
    for r in rules:
        assert balanced(r["expr"]), r["expr"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r
        assert r["labels"]["severity"] in ("critical", "warning")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        used = set(METRIC.findall(r["expr"]))
        assert used, r["alert"]
        assert not used - served, f"{r['alert']} names unserved metrics {used - served}"
        bare = set(re.findall(r"\b([a-z_]+)\{", r["expr"])) - {m for m in used}
        assert bare <= PROMETHEUS_OWN, bare


def engine_manifests():
    docs = {}
    for name in ("engine.yaml", "engine-hpa.yaml"):
        with open(os.path.join(ROOT, "deploy", "kubernetes", name)) as f:
            docs.update({d["kind"]: d for d in yaml.safe_load_all(f) if d})
    return docs


def engine_settings():
    import subprocess
    from eddy_harness import eddy_binary
    out = subprocess.run([eddy_binary(), "engine", "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: (EDDY_[A-Z_]+)", out))


def test_engine_deployment_scales_on_served_metrics(node):
    docs = engine_manifests()
    assert set(docs) == {"Deployment", "ScaledObject", "HorizontalPodAutoscaler"}
    with open(os.path.join(ROOT, "deploy", "kubernetes", "engine.yaml")) as f:
        kinds = [d["kind"] for d in yaml.safe_load_all(f) if d]
    assert "HorizontalPodAutoscaler" not in kinds, "KEDA and an HPA must not both scale the Deployment"
    deployment = docs["Deployment"]["spec"]
    assert "replicas" not in deployment, "the autoscaler owns the replica count"
    pod = deployment["template"]
    [model] = pod["spec"]["initContainers"]
    assert model["restartPolicy"] == "Always", "the model is a sidecar: it outlives the engine's drain"
    assert "127.0.0.1:8000" in model["args"]
    [engine] = pod["spec"]["containers"]
    env = {e["name"]: e for e in engine["env"]}
    assert set(env) <= engine_settings(), set(env) - engine_settings()
    assert env["EDDY_ENGINE_MODEL"]["value"].endswith(":8000")
    port = env["EDDY_ENGINE_LISTEN"]["value"].rsplit(":", 1)[1]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == port
    assert int(pod["spec"]["terminationGracePeriodSeconds"]) * 1000 > int(env["EDDY_ENGINE_DRAIN_MS"]["value"])
    name = docs["Deployment"]["metadata"]["name"]
    keda = docs["ScaledObject"]["spec"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert keda["scaleTargetRef"]["name"] == name and hpa["scaleTargetRef"]["name"] == name
    assert keda["minReplicaCount"] == 0, "scales to zero when the queue is empty"
    # One engine per window: the target per engine is its concurrency.
    window = env["EDDY_ENGINE_CONCURRENCY"]["value"]
    [trigger] = keda["triggers"]
    assert trigger["metadata"]["threshold"] == window
    [metric] = hpa["metrics"]
    assert metric["external"]["target"]["averageValue"] == window
    served = served_metrics(node)
    for q in (trigger["metadata"]["query"], metric["external"]["metric"]["name"]):
        used = set(METRIC.findall(q))
        assert used == {"eddy_queue_outstanding"} and used <= served, q
        assert balanced(q), q


def test_engine_metrics_named_in_the_readme_are_served():
    """Every engine metric the README names is declared in the engine's
    /metrics rendering (a `# TYPE` line in the source)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    named = set(re.findall(r"`(eddy_engine_[a-z_]+)", readme))
    assert {"eddy_engine_model_seconds", "eddy_engine_in_flight", "eddy_engine_model_responses_total",
            "eddy_engine_results_written_total", "eddy_engine_retries_total"} <= named
    with open(os.path.join(ROOT, "src", "engine", "mod.rs")) as f:
        source = f.read()
    declared = set(re.findall(r'"(eddy_engine_[a-z_]+)"', source))
    declared |= set(re.findall(r"# TYPE (eddy_engine_[a-z_]+)", source))
    assert named <= declared, f"the README names {named - declared}, which the engine does not serve"
