#!/usr/bin/env bash
# Build the static binary and the `eddy:dev` image around it.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
# The dist profile (Cargo.toml): the release profile with link-time
# optimisation, for the binary that is shipped.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --profile dist --locked --target "$TARGET"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "target/$TARGET/dist/eddy" deploy/Dockerfile "$ctx/"
docker build -q -t "${EDDY_IMAGE:-eddy:dev}" "$ctx"
# The Compose cluster's CA, node certificates, cluster secret and admin
# token, made once. Containers get only the files docker-compose.yml names;
# the CA key stays in deploy/compose-certs/private, mounted nowhere.
certs=deploy/compose-certs
if [ ! -f "$certs/ca.pem" ]; then
  "target/$TARGET/dist/eddy" certs generate --out "$certs" --nodes eddy-1,eddy-2,eddy-3
fi
# Certificates made by earlier versions: the CA key beside the node files,
# and no admin token.
if [ -f "$certs/ca-key.pem" ]; then
  mkdir -p -m 700 "$certs/private"
  mv "$certs/ca-key.pem" "$certs/private/ca-key.pem"
fi
if [ ! -s "$certs/admin-token" ]; then
  (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$certs/admin-token")
fi
