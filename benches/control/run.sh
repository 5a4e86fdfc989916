#!/usr/bin/env bash
# The control-path benchmark: push-to-live latency with 1, 10 and 100 real proxies,
# convergence of 1,000 simulated proxy streams with the control service's memory, 100
# chain swaps under 2,000 req/s, and replica failover on etcd with 10 and 100 proxies
# (it needs `etcd` on PATH: apt-get install etcd-server). Builds what it needs in
# release; prints one JSON object (and a summary on stderr).
#
#   bash benches/control/run.sh [--out FILE] [-- extra weft-control-bench args]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=""
if [[ "${1:-}" == "--out" ]]; then out="$2"; shift 2; fi
[[ "${1:-}" == "--" ]] && shift

rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
if ! command -v etcd >/dev/null; then
  SUDO=""; [[ $EUID -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi
cargo build --release -p weft-proxy -p weft-control -p weft-benches \
  --bin weft-proxy --bin weft-control --bin weft-load --bin weft-control-bench
cargo build --release --target wasm32-wasip1 --manifest-path tests/filters/Cargo.toml --target-dir target -p compat-basic

# 1,000 streams are 1,000 connections on each side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
result=$(target/release/weft-control-bench --module target/wasm32-wasip1/release/compat_basic.wasm "$@")
echo "$result"
if [[ -n "$out" ]]; then echo "$result" > "$out"; fi
