#!/usr/bin/env bash
# Builds Eddy and runs every test layer: the state machine and storage unit
# and property tests, the in-process cluster tests, the official Python SDK
# and the raw protocol against live `eddy serve` processes, those processes
# under kills, restarts and storage faults, the deployment files, and the
# web console in a headless browser.
# Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build --release"
cargo build --release --locked

echo "== Rust tests (state machine, storage, in-process clusters)"
cargo test --release --locked -- --skip security_ --skip t30_failover

# The failover tests bound elections and leases in time; run alone, so
# that other tests competing for the CPU do not stretch what they measure.
echo "== Failover tests (tests/integration/t30_failover.rs, one at a time)"
cargo test --release --locked --test integration t30_failover -- --test-threads=1

echo "== Security tests (tests/security: admin, peers, limits, floods; fuzzing runs in the unit tests)"
cargo test --release --locked --test integration security_

echo "== Python SDK tests (tests/sdk: official eas-prediction SDK and raw protocol against a live node)"
VENV=target/venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  "eas-prediction==0.36" "pytest>=7" "pytest-timeout>=2" "websocket-client>=1" "pyyaml>=6" \
  "selenium>=4.20"
export EDDY_BIN="$PWD/target/release/eddy"
"$VENV/bin/python" -m pytest tests/sdk -q

echo "== System tests (processes: kills, restarts, storage faults, engine)"
"$VENV/bin/python" -m pytest tests/system -q

echo "== Deploy tests (tests/deploy: Compose file, Kubernetes manifests, image build script, dashboard and alerts)"
"$VENV/bin/python" -m pytest tests/deploy -q

echo "== Console tests (tests/console: the web console in headless Chromium; screenshots in target/console-screenshots)"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
"$VENV/bin/python" -m pytest tests/console -q

echo "== Fault suite (Compose cluster: kill -9, SIGSTOP, partition, full restart)"
if ! docker info >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1; then
  echo "starting dockerd" >&2
  (dockerd >/tmp/eddy-dockerd.log 2>&1 &)
  for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
if docker info >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1; then
  deploy/build-image.sh
  "$VENV/bin/python" tests/fault/fault_suite.py --rounds "${FAULT_ROUNDS:-1}"
else
  echo "docker or docker-compose not available: fault suite not run" >&2
  exit 1
fi
