#!/usr/bin/env bash
# Weft mesh demo on the embedded defaults (local YAML files, no control service):
#
#   client ─► service1's sidecar (outbound :18001) ─► service2-a's sidecar (:18111) ─► service2-a
#                                                 └─► service2-b's sidecar (:18112) ─► service2-b
#
# service1's sidecar runs the standard filter chain (telemetry, router, fault, ratelimit,
# retry: WASM filters built from filters/). Shows weighted balancing (1:3), trace context
# and request ids, injected faults, an instance dying without a failed call (retries, then
# outlier ejection), labelled metrics, an access log line, and a graceful drain. Every
# process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/demo

command -v cargo >/dev/null || { echo "demo: needs a Rust toolchain (https://rustup.rs)" >&2; exit 1; }
command -v curl >/dev/null || { echo "demo: needs curl" >&2; exit 1; }

echo "== building weft-proxy, demo-service and the standard filters (wasm32-wasip1)"
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
cargo build --locked -q -p weft-proxy -p demo-service
cargo build --locked -q --profile filter --target wasm32-wasip1 -p weft-filter-router \
  -p weft-filter-retry -p weft-filter-fault -p weft-filter-telemetry -p weft-filter-ratelimit
bin=target/debug
logs=$(mktemp -d)

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$logs/$name.log" 2>&1 & pids+=($!); }

start service2-a "$bin/demo-service" --name service2-a --listen 127.0.0.1:18101
start service2-b "$bin/demo-service" --name service2-b --listen 127.0.0.1:18102
svc_b_pid=${pids[-1]}
start sidecar-2a "$bin/weft-proxy" --config $here/service2-a-sidecar.yaml --workers 1
start sidecar-2b "$bin/weft-proxy" --config $here/service2-b-sidecar.yaml --workers 1
start sidecar-1 "$bin/weft-proxy" --config $here/service1-sidecar.yaml --workers 2
sidecar1_pid=${pids[-1]}

# The first start compiles the filters with Cranelift (debug build: about half a minute);
# later starts load them from the module cache.
echo "== starting sidecars (the first run compiles the WASM filters)"
for admin in 18090 18191 18192; do
  for _ in $(seq 1 1200); do
    curl -fs "http://127.0.0.1:$admin/ready" >/dev/null && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$admin/ready" >/dev/null || { echo "sidecar on admin $admin did not start; logs in $logs" >&2; exit 1; }
done

section() { printf '\n== %s\n' "$*"; }
call() { curl -s -o /dev/null -w '%{http_code}\n' http://127.0.0.1:18001/; }

section "1. service1 calls service2 through two sidecars (the answer shows the mesh headers: request id, trace context)"
curl -s http://127.0.0.1:18001/hello

section "2. 400 calls: weights 1:3 give service2-a ~25%, service2-b ~75%"
for _ in $(seq 1 400); do curl -s http://127.0.0.1:18001/; done \
  | grep -o '"service":"[^"]*"' | sort | uniq -c

section "3. faults injected by the fault filter (asked for with request headers here)"
echo -n "abort 503: "; curl -s -o /dev/null -w '%{http_code}\n' -H 'x-weft-fault-abort: 503' http://127.0.0.1:18001/
echo -n "delay 300 ms: "; curl -s -o /dev/null -w '%{http_code} in %{time_total} s\n' -H 'x-weft-fault-delay-ms: 300' http://127.0.0.1:18001/
echo -n "direct response from the router: "; curl -s http://127.0.0.1:18001/healthz

section "4. service2-b dies: retries keep every call succeeding, then outlier detection ejects it"
kill -TERM "$svc_b_pid"
for _ in $(seq 1 40); do call; done | sort | uniq -c
echo "-- service1's sidecar /clusters:"
curl -s http://127.0.0.1:18090/clusters | grep -E '"address"|"healthy"|"ejections"'

section "5. metrics (service1's sidecar, /stats/prometheus): the telemetry filter's labelled families, retries"
curl -s http://127.0.0.1:18090/stats/prometheus \
  | grep -E '^weft_(filter_requests_total|upstream_retries_total|outlier_ejections_total|filter_fault_aborts_total)'

section "6. an access log line (telemetry filter, JSON)"
grep -m1 -o '{"authority".*}' "$logs/sidecar-1.log" || true

section "7. graceful drain: SIGTERM service1's sidecar"
kill -TERM "$sidecar1_pid"
wait "$sidecar1_pid" && echo "sidecar-1 drained and exited with status 0"
tail -n 2 "$logs/sidecar-1.log"

section "done (logs in $logs)"
