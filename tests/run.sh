#!/usr/bin/env bash
# Runs Weft's whole test suite: unit tests, end-to-end tests (real weft-proxy processes
# against real servers on loopback, and the container images in Docker) and doc tests.
# Needs a Rust toolchain (rustup), a Docker engine, and root (the capture tests make network
# namespaces and iptables rules).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "tests: needs a Rust toolchain (https://rustup.rs)" >&2; exit 1; }

# The TLS tests probe the proxy with curl (client certificates, SNI); the DNS discovery
# tests run a real DNS server, dnsmasq, on loopback; the store tests a real etcd.
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v dnsmasq >/dev/null || [[ -x /usr/sbin/dnsmasq ]] || missing+=(dnsmasq-base)
command -v etcd >/dev/null || missing+=(etcd-server)
# etcd-client's build compiles etcd's API with protoc.
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# The images' static binaries compile C (ring, jemalloc) for musl.
command -v musl-gcc >/dev/null || missing+=(musl-tools)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
# The capture tests make network namespaces linked by veth pairs (iproute2), install
# `weft-proxy init`'s iptables rules in them, and run the sidecars as the proxy's own user
# (setpriv); they need root, as istio-init does.
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v setpriv >/dev/null || missing+=(util-linux)
# The dashboard test loads the page in a real headless Chromium.
command -v chromium >/dev/null || missing+=(chromium)
# The compose mesh test runs deploy/compose with Docker Compose.
command -v docker-compose >/dev/null || missing+=(docker-compose)
# The Kubernetes manifests are validated against the OpenAPI schema with kubernetes-validate.
python3 -c 'import kubernetes_validate' 2>/dev/null \
  || python3 -m pip install -q kubernetes-validate 2>/dev/null \
  || { command -v pip3 >/dev/null || missing+=(python3-pip); }
if (( ${#missing[@]} )); then
  SUDO=""; [[ $EUID -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -c 'import kubernetes_validate' 2>/dev/null \
  || python3 -m pip install -q --break-system-packages kubernetes-validate >/dev/null \
  || python3 -m pip install -q kubernetes-validate

# The end-to-end tests start the binaries and load guest filters, so build them first:
# the proxy binaries for the host, the filters of tests/filters/ for wasm32-wasip1.
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
cargo build --locked --workspace --bins
cargo build --locked --release --target wasm32-wasip1 \
  --manifest-path tests/filters/Cargo.toml --target-dir target
# The container images, FROM scratch (tests/e2e/images.rs runs them).
command -v docker >/dev/null || { echo "tests: needs a Docker engine (the image tests)" >&2; exit 1; }
bash deploy/images/build.sh
# The standard filters (filters/), as they ship, and the SDK's example filter.
cargo build --locked --profile filter --target wasm32-wasip1 -p weft-filter-router -p weft-filter-retry -p weft-filter-fault -p weft-filter-telemetry -p weft-filter-ratelimit -p weft-filter-authz -p filter-template

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
  # nextest does not run doc tests.
  cargo test --locked --workspace --doc
else
  cargo test --locked --workspace --no-fail-fast
fi
