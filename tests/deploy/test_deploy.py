"""Static checks of the deployment files: the Kubernetes manifests are
well-formed and consistent with each other and with the binary's flags, and
the Compose file describes a three-node cluster."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def manifests():
    with open(os.path.join(ROOT, "deploy", "kubernetes", "eddy.yaml")) as f:
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(f) if d}


def serve_flags():
    from eddy_harness import eddy_binary
    out = subprocess.run([eddy_binary(), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: (EDDY_[A-Z_]+)", out))


def test_kubernetes_objects_are_complete_and_consistent():
    docs = manifests()
    for key in [("StatefulSet", "eddy"), ("Service", "eddy-headless"), ("Service", "eddy"),
                ("PodDisruptionBudget", "eddy")]:
        assert key in docs, f"missing {key}"
    for doc in docs.values():
        assert doc["apiVersion"] and doc["metadata"]["name"]
    sts = docs[("StatefulSet", "eddy")]["spec"]
    headless = docs[("Service", "eddy-headless")]["spec"]
    assert sts["replicas"] == 3
    assert sts["serviceName"] == "eddy-headless"
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    labels = sts["template"]["metadata"]["labels"]
    for selector in (sts["selector"]["matchLabels"], headless["selector"], docs[("Service", "eddy")]["spec"]["selector"],
                     docs[("PodDisruptionBudget", "eddy")]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items(), "selector does not match the pod labels"
    assert docs[("PodDisruptionBudget", "eddy")]["spec"]["maxUnavailable"] == 1

    [container] = sts["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "raft": 9090}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    env = {e["name"]: e for e in container["env"]}
    known = serve_flags()
    assert set(env) - {"POD_NAME"} <= known, f"unknown settings {set(env) - known}"
    assert env["EDDY_ID_FROM_HOSTNAME"]["value"] == "true"
    # No secret ships in the manifest: peers use mutual TLS and a secret
    # file from the Secret the operator creates with `eddy certs generate`.
    assert not any(kind == "Secret" for kind, _ in docs), "a Secret with a value in the manifest"
    assert "EDDY_CLUSTER_SECRET" not in env
    [certs] = [v for v in sts["template"]["spec"]["volumes"] if "secret" in v]
    [certs_mount] = [m for m in container["volumeMounts"] if m["name"] == certs["name"]]
    assert certs_mount["readOnly"] is True
    secret_dir = certs_mount["mountPath"]
    assert env["EDDY_CLUSTER_SECRET_FILE"]["value"] == f"{secret_dir}/cluster-secret"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["EDDY_PEER_TLS_CERT"]["value"] == f"{secret_dir}/$(POD_NAME).{sts['serviceName']}.pem"
    assert env["EDDY_PEER_TLS_KEY"]["value"] == f"{secret_dir}/$(POD_NAME).{sts['serviceName']}-key.pem"
    assert env["EDDY_PEER_TLS_CA"]["value"] == f"{secret_dir}/ca.pem"
    # The admin token is mandatory on a cluster member: a file from the same
    # Secret (`eddy certs generate` writes `admin-token`), never optional.
    assert "EDDY_ADMIN_TOKEN" not in env
    assert env["EDDY_ADMIN_TOKEN_FILE"]["value"] == f"{secret_dir}/admin-token"
    assert "items" not in certs["secret"] and certs["secret"].get("optional") is not True

    # One peer per replica, ids = ordinal + 1, addressed through the headless service.
    peers = env["EDDY_PEERS"]["value"].split(",")
    assert len(peers) == sts["replicas"]
    for ordinal, peer in enumerate(peers):
        pid, raft, http = peer.split("@")
        assert int(pid) == ordinal + 1
        assert raft == f"eddy-{ordinal}.eddy-headless:{ports['raft']}"
        assert http == f"eddy-{ordinal}.eddy-headless:{ports['http']}"

    [claim] = sts["volumeClaimTemplates"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] != certs["name"]]
    assert mount["name"] == claim["metadata"]["name"]
    assert mount["mountPath"] == env["EDDY_DATA_DIR"]["value"]
    assert claim["spec"]["resources"]["requests"]["storage"]


def test_compose_file_runs_three_nodes_an_engine_and_a_model():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    secrets = compose["secrets"]
    nodes = [n for n in services if n.startswith("eddy-")]
    assert sorted(nodes) == ["eddy-1", "eddy-2", "eddy-3"]
    peers = services["eddy-1"]["environment"]["EDDY_PEERS"]
    for i, n in enumerate(sorted(nodes), start=1):
        env = services[n]["environment"]
        assert env["EDDY_NODE_ID"] == str(i)
        assert env["EDDY_PEERS"] == peers
        assert f"{i}@{n}:9090" in peers
        # What the node is given: Compose secrets, mounted at
        # /run/secrets/<target>, each from one file.
        given = {}
        for s in services[n]["secrets"]:
            source, target = (s, s) if isinstance(s, str) else (s["source"], s.get("target", s["source"]))
            given["/run/secrets/" + target] = secrets[source]["file"]
        # Peers authenticate with a secret file and mutual TLS, and the admin
        # API needs a token from a file, by default.
        certs = "./deploy/compose-certs/"
        assert given[env["EDDY_CLUSTER_SECRET_FILE"]] == certs + "cluster-secret"
        assert given[env["EDDY_ADMIN_TOKEN_FILE"]] == certs + "admin-token"
        assert given[env["EDDY_PEER_TLS_CA"]] == certs + "ca.pem"
        assert given[env["EDDY_PEER_TLS_CERT"]] == certs + f"{n}.pem"
        assert given[env["EDDY_PEER_TLS_KEY"]] == certs + f"{n}-key.pem"
        assert "EDDY_CLUSTER_SECRET" not in env and "EDDY_ADMIN_TOKEN" not in env
        # No CA key, no other node's key, and no directory is mounted: a
        # bind of the certificates' directory would carry the CA key along.
        assert len(given) == 5, given
        for source in given.values():
            assert "ca-key" not in source and "private" not in source, source
        for volume in services[n].get("volumes", []):
            assert not volume.split(":")[0].startswith((".", "/")), f"{n} binds {volume}"
    for name, s in services.items():
        if not name.startswith("eddy-"):
            assert "secrets" not in s and not s.get("volumes"), f"{name} is given files"
    # The demo service has no token: what is published is reachable from
    # this machine only.
    for name, s in services.items():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert services["engine"]["command"][0] == "engine"
    assert services["demo-model"]["command"][0] == "demo-model"
    if shutil.which("docker-compose"):
        subprocess.run(["docker-compose", "-f", os.path.join(ROOT, "docker-compose.yml"), "config", "-q"], check=True)


def test_build_script_makes_the_files_compose_mounts_and_keeps_the_ca_key_apart(tmp_path):
    """`eddy certs generate` as deploy/build-image.sh runs it writes every
    file docker-compose.yml gives the nodes, and the CA key only outside
    them."""
    from eddy_harness import eddy_binary
    with open(os.path.join(ROOT, "deploy", "build-image.sh")) as f:
        script = f.read()
    [line] = [l for l in script.splitlines() if "certs generate" in l]
    nodes = re.search(r"--nodes (\S+)", line).group(1).split(",")
    out = tmp_path / "compose-certs"
    subprocess.run([eddy_binary(), "certs", "generate", "--out", str(out), "--nodes", ",".join(nodes)],
                   check=True, capture_output=True)
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    wanted = {os.path.basename(s["file"]) for s in compose["secrets"].values()}
    top = {p.name for p in out.iterdir() if p.is_file()}
    assert wanted <= top, wanted - top
    assert not any(name.startswith("ca-key") for name in top), top
    assert (out / "private" / "ca-key.pem").read_text().startswith("-----BEGIN PRIVATE KEY")
    assert (out / "private").stat().st_mode & 0o077 == 0
    assert len((out / "admin-token").read_text().strip()) == 64
