#!/usr/bin/env bash
# Weft mesh demo on the embedded defaults (no external dependency: the control service keeps
# its state in an embedded database under a temp dir):
#
#   client ─► service1's sidecar (outbound :18001) ═mTLS═► service2-a's sidecar (:18111) ─► service2-a
#                                                 ╚═mTLS═► service2-b's sidecar (:18112) ─► service2-b
#   weft-control (:18070, TLS) ─ discovery streams ─► the sidecars (and their traffic reports)
#                             ├ mesh CA: each sidecar's certificate, from a join token
#                             └ web dashboard (:18071, TLS)
#
# The standard filters (telemetry, router, fault, ratelimit, retry: WASM built from filters/)
# are pushed with weftctl and applied as service1's chain (examples/demo/mesh.yaml); service2's
# instances register with the control service, which feeds them to service1's sidecar.
# Shows weighted balancing (1:3), trace context and request ids, injected faults, a chain
# swapped live under traffic, a new service joining under traffic, an instance dying without a failed call (retries, outlier
# ejection, then its registration expiring), the mesh's golden metrics (`weftctl top`, `stat`,
# the dashboard), a bad filter version rolled back by itself in a staged rollout, labelled
# metrics, an access log line, and a graceful drain. WEFT_DEMO_KEEP=SECONDS keeps the mesh up
# (with traffic) that long before the drain, for a look at the dashboard. Sidecars speak mutual TLS with SPIFFE identities issued by weft-control (the
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

# Every port the demo uses, in one place (the sidecars' YAML files get theirs from here).
OUT=18001           # service1's sidecar, outbound: where the client calls
CONTROL_PORT=18070  # weft-control
DASHBOARD=18071     # weft-control's web dashboard
ADMIN1=18090        # service1's sidecar, admin
APP2A=18101         # service2-a
APP2B=18102         # service2-b
APP3=18103          # service3
APP3V2=18104        # service3-v2
IN2A=18111          # service2-a's sidecar, inbound (mTLS)
IN2B=18112          # service2-b's sidecar, inbound (mTLS)
ADMIN2A=18191       # service2-a's sidecar, admin
ADMIN2B=18192       # service2-b's sidecar, admin
for p in $OUT $CONTROL_PORT $DASHBOARD $ADMIN1 $APP2A $APP2B $APP3 $APP3V2 $IN2A $IN2B $ADMIN2A $ADMIN2B; do
  # Something answering there would take the demo's calls: stop before starting anything.
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    name=$(grep -E "^[A-Z0-9]+=$p " "$0" | sed 's/.*# //')
    echo "demo: port $p ($name) is in use by another program; stop it, or change the port at the top of $0" >&2
    exit 1
  fi
done

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
# Waits until the process started last listens on port $2 (10 s); one that exits or never
# listens stops the demo with its log.
listening() {
  local name=$1 port=$2 pid=${pids[-1]}
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { echo "demo: $name exited at startup:" >&2; tail -n 20 "$logs/$name.log" >&2; exit 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "demo: $name is not listening on $port after 10 s; its log: $logs/$name.log" >&2; exit 1
}

# The control channel is TLS too: weftctl and the sidecars verify the control service
# against the mesh root it makes in its data dir (WEFT_CONTROL_CA).
export WEFT_CONTROL=https://127.0.0.1:$CONTROL_PORT
export WEFT_CONTROL_CA=$logs/control-data/ca/bundle.pem
ctl() { "$bin/weftctl" "$@"; }
start control "$bin/weft-control" --data-dir "$logs/control-data" --listen 127.0.0.1:$CONTROL_PORT --tls \
  --dashboard 127.0.0.1:$DASHBOARD
listening control $CONTROL_PORT
for _ in $(seq 1 100); do ctl module ls >/dev/null 2>&1 && break; sleep 0.1; done

echo "== pushing the standard filters and the mesh config to the control service"
for f in telemetry router fault ratelimit retry authz; do
  ctl module push target/wasm32-wasip1/filter/weft_filter_$f.wasm --name $f
done
ctl apply -f $here/mesh.yaml
echo "-- service2's instances register (and keep heartbeating)"
start register-2a "$bin/weftctl" register service2 127.0.0.1:$IN2A --weight 1 --ttl 3 --keep-alive
start register-2b "$bin/weftctl" register service2 127.0.0.1:$IN2B --weight 3 --ttl 3 --keep-alive
register_b_pid=${pids[-1]}

echo "-- join tokens for the sidecars' identities (the control service is the mesh CA)"
ctl identity token --service-account service1 > "$logs/service1.token"
ctl identity token --service-account service2 > "$logs/service2-a.token"
ctl identity token --service-account service2 > "$logs/service2-b.token"
for f in service1 service2-a service2-b; do
  sed -e "s|TOKEN_DIR|$logs|" -e "s|\$OUT|$OUT|; s|\$ADMIN1|$ADMIN1|; s|\$ADMIN2A|$ADMIN2A|; s|\$ADMIN2B|$ADMIN2B|" \
    -e "s|\$IN2A|$IN2A|; s|\$IN2B|$IN2B|; s|\$APP2A|$APP2A|; s|\$APP2B|$APP2B|" \
    "$here/$f-sidecar.yaml" > "$logs/$f-sidecar.yaml"
done

start service2-a "$bin/demo-service" --name service2-a --listen 127.0.0.1:$APP2A
listening service2-a $APP2A
start service2-b "$bin/demo-service" --name service2-b --listen 127.0.0.1:$APP2B
listening service2-b $APP2B
svc_b_pid=${pids[-1]}
declare -A sidecar_pid
start sidecar-2a "$bin/weft-proxy" --config "$logs/service2-a-sidecar.yaml" --workers 1 \
  --control $WEFT_CONTROL --id service2-a --label app=service2 --state-dir "$logs/sidecar-2a-state" \
  --report-interval-ms 1000
sidecar_pid[sidecar-2a]=${pids[-1]}
start sidecar-2b "$bin/weft-proxy" --config "$logs/service2-b-sidecar.yaml" --workers 1 \
  --control $WEFT_CONTROL --id service2-b --label app=service2 --state-dir "$logs/sidecar-2b-state" \
  --report-interval-ms 1000
sidecar_pid[sidecar-2b]=${pids[-1]}
start sidecar-1 "$bin/weft-proxy" --config "$logs/service1-sidecar.yaml" --workers 2 \
  --control $WEFT_CONTROL --id service1-0 --label app=service1 --state-dir "$logs/sidecar-1-state" \
  --report-interval-ms 1000
sidecar1_pid=${pids[-1]}
sidecar_pid[sidecar-1]=$sidecar1_pid

# The first start compiles the filters with Cranelift (debug build: about half a minute);
# later starts load them from the module cache.
echo "== starting sidecars"
started=$SECONDS
for s in sidecar-2a:$ADMIN2A sidecar-2b:$ADMIN2B sidecar-1:$ADMIN1; do
  name=${s%%:*} admin=${s#*:}
  for i in $(seq 1 1200); do
    curl -fs "http://127.0.0.1:$admin/ready" >/dev/null && break
    kill -0 "${sidecar_pid[$name]}" 2>/dev/null || { echo "demo: $name exited at startup:" >&2; tail -n 20 "$logs/$name.log" >&2; exit 1; }
    (( i % 50 == 0 )) && echo "   $name: not ready yet after $((SECONDS - started)) s (compiling the filters; later runs load them from the module cache)"
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$admin/ready" >/dev/null || { echo "demo: $name did not become ready; its log:" >&2; tail -n 20 "$logs/$name.log" >&2; exit 1; }
  echo "   $name ready after $((SECONDS - started)) s"
done

section() { printf '\n== %s\n' "$*"; }
call() { curl -s -o /dev/null -w '%{http_code}\n' http://127.0.0.1:$OUT/; }

echo "== waiting for the sidecars to run their chains (weftctl rollout status; the first run compiles the WASM filters, about half a minute in this debug build)"
ctl rollout status --selector app=service1 --timeout 120
ctl rollout status --selector app=service2 --timeout 120
for _ in $(seq 1 100); do
  [[ $(ctl get services | grep -cE "127.0.0.1:($IN2A|$IN2B)") == 2 ]] && [[ $(curl -s http://127.0.0.1:$ADMIN1/clusters | grep -c '"address"') == 2 ]] && break
  sleep 0.1
done
ctl status
ctl get services

section "1. service1 calls service2 through two sidecars (the answer shows the mesh headers: request id, trace context)"
curl -s http://127.0.0.1:$OUT/hello

section "1b. between the sidecars: mutual TLS with SPIFFE identities from the mesh CA"
for admin in $ADMIN1 $ADMIN2A; do curl -s "http://127.0.0.1:$admin/certs"; echo; done
echo -n "a plaintext call straight to service2-a's sidecar is refused: "
curl -s -o /dev/null -w '%{http_code}\n' http://127.0.0.1:$IN2A/ || true
echo -n "service1 calling service2's /admin: denied by service2's authz filter: "
curl -s -D - -o /dev/null http://127.0.0.1:$OUT/admin | grep -iE '^HTTP|^x-weft-authz' | tr -d '\r' | tr '\n' ' '; echo

section "2. 400 calls: weights 1:3 give service2-a ~25%, service2-b ~75%"
for _ in $(seq 1 400); do curl -s http://127.0.0.1:$OUT/; done \
  | grep -o '"service":"[^"]*"' | sort | uniq -c | tee "$logs/split.txt"
# A split far from 1:3 means the calls did not go where the demo thinks: stop there.
b=$(awk '/service2-b/ {print $1}' "$logs/split.txt"); b=${b:-0}
(( b >= 240 && b <= 360 )) || { echo "demo: service2-b took $b of 400 calls, not about 300; logs in $logs" >&2; exit 1; }
echo "-- mutual TLS connections service2's sidecars accepted (service1's sidecar pools them) and refused:"
for i in a:$ADMIN2A b:$ADMIN2B; do
  echo "service2-${i%%:*}'s sidecar:"
  curl -s "http://127.0.0.1:${i#*:}/stats/prometheus" | grep -E '^weft_downstream_tls_(connections|handshake_failures)_total' || true
done

section "3. faults injected by the fault filter (asked for with request headers here)"
echo -n "abort 503: "; curl -s -o /dev/null -w '%{http_code}\n' -H 'x-weft-fault-abort: 503' http://127.0.0.1:$OUT/
echo -n "delay 300 ms: "; curl -s -o /dev/null -w '%{http_code} in %{time_total} s\n' -H 'x-weft-fault-delay-ms: 300' http://127.0.0.1:$OUT/
echo -n "direct response from the router: "; curl -s http://127.0.0.1:$OUT/healthz

section "4. new routes (a FilterConfig), swapped live into the chain while 400 calls flow (every call answers 200)"
curl -s http://127.0.0.1:$OUT/version
(for _ in $(seq 1 400); do call; done | sort | uniq -c > "$logs/during-swap.txt") &
traffic=$!
sed 's/routes v1/routes v2/' $here/mesh.yaml | ctl apply -f -
ctl rollout status --selector app=service1 --timeout 60
wait $traffic
cat "$logs/during-swap.txt"
curl -s http://127.0.0.1:$OUT/version

section "4b. a new service joins while calls flow: service3 registers, service1's sidecar learns it with no restart"
echo -n "before: a call for host service3: "
curl -s -H 'host: service3' -w ' (%{http_code})' http://127.0.0.1:$OUT/ | tr '\n' ' '; echo
(for _ in $(seq 1 300); do call; done | sort | uniq -c > "$logs/during-join.txt") &
traffic=$!
start service3 "$bin/demo-service" --name service3 --listen 127.0.0.1:$APP3
listening service3 $APP3
start register-3 "$bin/weftctl" register service3 127.0.0.1:$APP3 --ttl 3 --keep-alive
for _ in $(seq 1 100); do
  curl -s http://127.0.0.1:$ADMIN1/clusters | grep -q '"service3"' && break
  sleep 0.1
done
echo -n "after: "; curl -s -H 'host: service3' http://127.0.0.1:$OUT/hello
wait $traffic
echo "-- the calls to service2 meanwhile:"; cat "$logs/during-join.txt"

section "4c. a canary for service3 with a Gateway API HTTPRoute: service3-v2 joins and takes 25% of service3's calls"
start service3-v2 "$bin/demo-service" --name service3-v2 --listen 127.0.0.1:$APP3V2
listening service3-v2 $APP3V2
start register-3v2 "$bin/weftctl" register service3-v2 127.0.0.1:$APP3V2 --ttl 3 --keep-alive
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
for _ in $(seq 1 200); do curl -s -H 'host: service3' http://127.0.0.1:$OUT/; done \
  | grep -o '"service":"[^"]*"' | sort | uniq -c

section "4d. the mesh's golden metrics, from the sidecars' reports: weftctl top, weftctl stat, the dashboard"
sleep 1.5   # the sidecars report every second
ctl top --iterations 1 --window 60
ctl stat edges --window 60
echo "-- the dashboard: https://127.0.0.1:$DASHBOARD/ (its certificate is from the mesh CA: $WEFT_CONTROL_CA)"
curl -s --cacert "$WEFT_CONTROL_CA" "https://127.0.0.1:$DASHBOARD/api/overview?window=60" \
  | grep -o '"services":\[{[^}]*}' || true

section "4e. a bad filter version, rolled out in steps, is rolled back by itself"
echo "-- service2's new inbound chain fails 20% of requests ($here/service2-bad.yaml); steps 50%, 100%; 4 s each; at most +1% errors"
(for _ in $(seq 1 3000); do [[ -e "$logs/rollout-done" ]] && break; call; done | sort | uniq -c > "$logs/during-rollout.txt") &
traffic=$!
if ctl rollout start -f $here/service2-bad.yaml --steps 50,100 --interval 4s --max-error-rate 1% --wait; then
  echo "demo: the bad version was promoted; logs in $logs" >&2; exit 1
fi
touch "$logs/rollout-done"; wait "$traffic"
echo "-- the calls meanwhile (500s only from the first step's sidecar, until the rollback):"
cat "$logs/during-rollout.txt"
ctl rollout history
sleep 1   # the first step's sidecar swaps back
echo -n "after the rollback, 100 calls: "; for _ in $(seq 1 100); do call; done | sort | uniq -c | tr '\n' ' '; echo

section "5. service2-b dies: retries keep every call succeeding, outlier detection ejects it, its registration expires"
kill -TERM "$svc_b_pid"
{ kill -KILL "$register_b_pid"; wait "$register_b_pid"; } 2>/dev/null || true   # its heartbeats stop (no goodbye)
for _ in $(seq 1 40); do call; done | sort | uniq -c
echo "-- service1's sidecar /clusters:"
curl -s http://127.0.0.1:$ADMIN1/clusters | grep -E '"address"|"healthy"|"ejections"'
echo "-- 4 s later: the registry expired it (no heartbeat for its 3 s TTL) and the cluster followed"
sleep 4
ctl get services
curl -s http://127.0.0.1:$ADMIN1/clusters | grep -E '"address"'

section "6. metrics (service1's sidecar, /stats/prometheus): the telemetry filter's labelled families, retries"
curl -s http://127.0.0.1:$ADMIN1/stats/prometheus \
  | grep -E '^weft_(filter_requests_total|upstream_retries_total|outlier_ejections_total|filter_fault_aborts_total)'

section "7. an access log line (telemetry filter, JSON)"
grep -m1 -o '{"authority".*}' "$logs/sidecar-1.log" || true

if (( ${WEFT_DEMO_KEEP:-0} > 0 )); then
  section "the mesh stays up for ${WEFT_DEMO_KEEP} s with traffic: https://127.0.0.1:$DASHBOARD/ (CA: $WEFT_CONTROL_CA)"
  end=$((SECONDS + WEFT_DEMO_KEEP))
  while (( SECONDS < end )); do call >/dev/null; sleep 0.05; done
fi

section "8. graceful drain: SIGTERM service1's sidecar"
kill -TERM "$sidecar1_pid"
wait "$sidecar1_pid" && echo "sidecar-1 drained and exited with status 0"
tail -n 2 "$logs/sidecar-1.log"

section "done (logs in $logs)"
