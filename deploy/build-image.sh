#!/usr/bin/env bash
# Build the static binary and the `eddy:dev` image around it.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$TARGET"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "target/$TARGET/release/eddy" deploy/Dockerfile "$ctx/"
docker build -q -t "${EDDY_IMAGE:-eddy:dev}" "$ctx"
# The Compose cluster's CA, node certificates and cluster secret, made once.
if [ ! -f deploy/compose-certs/ca.pem ]; then
  "target/$TARGET/release/eddy" certs generate --out deploy/compose-certs --nodes eddy-1,eddy-2,eddy-3
fi
