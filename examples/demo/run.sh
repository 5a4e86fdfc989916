#!/usr/bin/env bash
# Weft mesh demo on the embedded defaults (no external dependency: the control service keeps
# its state in an embedded database under a temp dir):
#
#   client ─► service1's sidecar (outbound :18001) ═mTLS═► service2-a's sidecar (:18111) ─► service2-a
#                                                 ╚═mTLS═► service2-b's sidecar (:18112) ─► service2-b
#   weft-control (:18070, TLS) ─ discovery streams ─► the sidecars
#                             └ mesh CA: each sidecar's certificate, from a join token
#
# The standard filters (telemetry, router, fault, ratelimit, retry: WASM built from filters/)
# are pushed with weftctl and applied as service1's chain (examples/demo/mesh.yaml); service2's
# instances register with the control service, which feeds them to service1's sidecar.
# Shows weighted balancing (1:3), trace context and request ids, injected faults, a chain
# swapped live under traffic, a new service joining under traffic, an instance dying without a failed call (retries, outlier
# ejection, then its registration expiring), labelled metrics, an access log line, and a
# graceful drain. Sidecars speak mutual TLS with SPIFFE identities issued by weft-control (the
# mesh CA) from join tokens. Every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/demo

command -v cargo >/dev/null || { echo "demo: needs a Rust toolchain (https://rustup.rs)" >&2; exit 1; }
command -v curl >/dev/null || { echo "demo: needs curl" >&2; exit 1; }
# weft-control's etcd client compiles etcd's API with protoc: install it if it is missing.
if ! command -v protoc >/dev/null; then
  SUDO=""; [[ $EUID -ne 0 ]] && SUDO=sudo
  command -v apt-get >/dev/null || { echo "demo: needs protoc (protobuf-compiler)" >&2; exit 1; }
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq protobuf-compiler >/dev/null
fi

echo "== building weft-proxy, weft-control, weftctl, demo-service and the standard filters (wasm32-wasip1)"
rustup target add wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip1
cargo build --locked -q -p weft-proxy -p weft-control -p demo-service
cargo build --locked -q --profile filter --target wasm32-wasip1 -p weft-filter-router \
  -p weft-filter-retry -p weft-filter-fault -p weft-filter-telemetry -p weft-filter-ratelimit -p weft-filter-authz
bin=target/debug
logs=$(mktemp -d)

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$logs/$name.log" 2>&1 & pids+=($!); }

# The control channel is TLS too: weftctl and the sidecars verify the control service
# against the mesh root it makes in its data dir (WEFT_CONTROL_CA).
export WEFT_CONTROL=https://127.0.0.1:18070
export WEFT_CONTROL_CA=$logs/control-data/ca/bundle.pem
ctl() { "$bin/weftctl" "$@"; }
start control "$bin/weft-control" --data-dir "$logs/control-data" --listen 127.0.0.1:18070 --tls
for _ in $(seq 1 100); do ctl module ls >/dev/null 2>&1 && break; sleep 0.1; done

echo "== pushing the standard filters and the mesh config to the control service"
for f in telemetry router fault ratelimit retry authz; do
  ctl module push target/wasm32-wasip1/filter/weft_filter_$f.wasm --name $f
done
ctl apply -f $here/mesh.yaml
echo "-- service2's instances register (and keep heartbeating)"
start register-2a "$bin/weftctl" register service2 127.0.0.1:18111 --weight 1 --ttl 3 --keep-alive
start register-2b "$bin/weftctl" register service2 127.0.0.1:18112 --weight 3 --ttl 3 --keep-alive
register_b_pid=${pids[-1]}

echo "-- join tokens for the sidecars' identities (the control service is the mesh CA)"
ctl identity token --service-account service1 > "$logs/service1.token"
ctl identity token --service-account service2 > "$logs/service2-a.token"
ctl identity token --service-account service2 > "$logs/service2-b.token"
for f in service1 service2-a service2-b; do
  sed "s|TOKEN_DIR|$logs|" "$here/$f-sidecar.yaml" > "$logs/$f-sidecar.yaml"
done

start service2-a "$bin/demo-service" --name service2-a --listen 127.0.0.1:18101
start service2-b "$bin/demo-service" --name service2-b --listen 127.0.0.1:18102
svc_b_pid=${pids[-1]}
start sidecar-2a "$bin/weft-proxy" --config "$logs/service2-a-sidecar.yaml" --workers 1 \
  --control $WEFT_CONTROL --id service2-a --label app=service2 --state-dir "$logs/sidecar-2a-state"
start sidecar-2b "$bin/weft-proxy" --config "$logs/service2-b-sidecar.yaml" --workers 1 \
  --control $WEFT_CONTROL --id service2-b --label app=service2 --state-dir "$logs/sidecar-2b-state"
start sidecar-1 "$bin/weft-proxy" --config "$logs/service1-sidecar.yaml" --workers 2 \
  --control $WEFT_CONTROL --id service1-0 --label app=service1 --state-dir "$logs/sidecar-1-state"
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

echo "== waiting for the sidecars to run their chains (weftctl rollout status)"
ctl rollout status --selector app=service1 --timeout 120
ctl rollout status --selector app=service2 --timeout 120
for _ in $(seq 1 100); do
  [[ $(ctl get services | grep -c 127.0.0.1:1811) == 2 ]] && [[ $(curl -s http://127.0.0.1:18090/clusters | grep -c '"address"') == 2 ]] && break
  sleep 0.1
done
ctl status
ctl get services

section "1. service1 calls service2 through two sidecars (the answer shows the mesh headers: request id, trace context)"
curl -s http://127.0.0.1:18001/hello

section "1b. between the sidecars: mutual TLS with SPIFFE identities from the mesh CA"
for admin in 18090 18191; do curl -s "http://127.0.0.1:$admin/certs"; echo; done
echo -n "a plaintext call straight to service2-a's sidecar is refused: "
curl -s -o /dev/null -w '%{http_code}\n' http://127.0.0.1:18111/ || true
echo -n "service1 calling service2's /admin: denied by service2's authz filter: "
curl -s -D - -o /dev/null http://127.0.0.1:18001/admin | grep -iE '^HTTP|^x-weft-authz' | tr -d '\r' | tr '\n' ' '; echo

section "2. 400 calls: weights 1:3 give service2-a ~25%, service2-b ~75%"
for _ in $(seq 1 400); do curl -s http://127.0.0.1:18001/; done \
  | grep -o '"service":"[^"]*"' | sort | uniq -c
echo "-- mutual TLS connections service2's sidecars accepted (service1's sidecar pools them) and refused:"
for i in a:18191 b:18192; do
  echo "service2-${i%%:*}'s sidecar:"
  curl -s "http://127.0.0.1:${i#*:}/stats/prometheus" | grep -E '^weft_downstream_tls_(connections|handshake_failures)_total' || true
done

section "3. faults injected by the fault filter (asked for with request headers here)"
echo -n "abort 503: "; curl -s -o /dev/null -w '%{http_code}\n' -H 'x-weft-fault-abort: 503' http://127.0.0.1:18001/
echo -n "delay 300 ms: "; curl -s -o /dev/null -w '%{http_code} in %{time_total} s\n' -H 'x-weft-fault-delay-ms: 300' http://127.0.0.1:18001/
echo -n "direct response from the router: "; curl -s http://127.0.0.1:18001/healthz

section "4. new routes (a FilterConfig), swapped live into the chain while 400 calls flow (every call answers 200)"
curl -s http://127.0.0.1:18001/version
(for _ in $(seq 1 400); do call; done | sort | uniq -c > "$logs/during-swap.txt") &
traffic=$!
sed 's/routes v1/routes v2/' $here/mesh.yaml | ctl apply -f -
ctl rollout status --selector app=service1 --timeout 60
wait $traffic
cat "$logs/during-swap.txt"
curl -s http://127.0.0.1:18001/version

section "4b. a new service joins while calls flow: service3 registers, service1's sidecar learns it with no restart"
echo -n "before: a call for host service3: "
curl -s -H 'host: service3' -w ' (%{http_code})' http://127.0.0.1:18001/ | tr '\n' ' '; echo
(for _ in $(seq 1 300); do call; done | sort | uniq -c > "$logs/during-join.txt") &
traffic=$!
start service3 "$bin/demo-service" --name service3 --listen 127.0.0.1:18103
start register-3 "$bin/weftctl" register service3 127.0.0.1:18103 --ttl 3 --keep-alive
for _ in $(seq 1 100); do
  curl -s http://127.0.0.1:18090/clusters | grep -q '"service3"' && break
  sleep 0.1
done
echo -n "after: "; curl -s -H 'host: service3' http://127.0.0.1:18001/hello
wait $traffic
echo "-- the calls to service2 meanwhile:"; cat "$logs/during-join.txt"

section "4c. a canary for service3 with a Gateway API HTTPRoute: service3-v2 joins and takes 25% of service3's calls"
start service3-v2 "$bin/demo-service" --name service3-v2 --listen 127.0.0.1:18104
start register-3v2 "$bin/weftctl" register service3-v2 127.0.0.1:18104 --ttl 3 --keep-alive
cat > "$logs/canary.yaml" <<'YAML'
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: service3-canary, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: service3}]
  rules:
    - backendRefs: [{name: service3, port: 80, weight: 75}, {name: service3-v2, port: 80, weight: 25}]
YAML
for _ in $(seq 1 100); do ctl get services 2>/dev/null | grep -q service3-v2 && break; sleep 0.1; done
ctl apply -f "$logs/canary.yaml"
ctl rollout status --selector app=service1 --timeout 60
ctl get httproutes
for _ in $(seq 1 200); do curl -s -H 'host: service3' http://127.0.0.1:18001/; done \
  | grep -o '"service":"[^"]*"' | sort | uniq -c

section "5. service2-b dies: retries keep every call succeeding, outlier detection ejects it, its registration expires"
kill -TERM "$svc_b_pid"
{ kill -KILL "$register_b_pid"; wait "$register_b_pid"; } 2>/dev/null || true   # its heartbeats stop (no goodbye)
for _ in $(seq 1 40); do call; done | sort | uniq -c
echo "-- service1's sidecar /clusters:"
curl -s http://127.0.0.1:18090/clusters | grep -E '"address"|"healthy"|"ejections"'
echo "-- 4 s later: the registry expired it (no heartbeat for its 3 s TTL) and the cluster followed"
sleep 4
ctl get services
curl -s http://127.0.0.1:18090/clusters | grep -E '"address"'

section "6. metrics (service1's sidecar, /stats/prometheus): the telemetry filter's labelled families, retries"
curl -s http://127.0.0.1:18090/stats/prometheus \
  | grep -E '^weft_(filter_requests_total|upstream_retries_total|outlier_ejections_total|filter_fault_aborts_total)'

section "7. an access log line (telemetry filter, JSON)"
grep -m1 -o '{"authority".*}' "$logs/sidecar-1.log" || true

section "8. graceful drain: SIGTERM service1's sidecar"
kill -TERM "$sidecar1_pid"
wait "$sidecar1_pid" && echo "sidecar-1 drained and exited with status 0"
tail -n 2 "$logs/sidecar-1.log"

section "done (logs in $logs)"
