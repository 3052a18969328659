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
