#!/usr/bin/env bash
# End-to-end load benchmark: Weft against nginx and HAProxy as plain reverse proxies, all in
# front of the same nginx origin, on one pinned core each. See benches/README.md.
#
#   bash benches/load/run.sh [--quick] [--out FILE]
#
# Env knobs: DURATION (seconds per measured run, default 10; --quick makes it 3), REPEAT
# (rounds over all targets, the median run kept; default 3, --quick makes it 1),
# MAX_CONNS (default 64), RATE (req/s of the fixed-rate run, default 2000),
# RATE_CONNS (default 16), NO_BUILD=1 to reuse the release binaries as they are.
#
# Layout on a 2-core machine: load generator + origin on core 0, the proxy under test on
# core 1. Everything listens on 127.0.0.1 only, ports 18079-18099 and 18901-18910.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=0
OUT=/tmp/weft-bench.json
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
((QUICK)) && DURATION=3 && REPEAT=1
MAX_CONNS=${MAX_CONNS:-64}
RATE=${RATE:-2000}
RATE_CONNS=${RATE_CONNS:-16}
WARMUP_SECS=1

ORIGIN_PORT=18080
WEFT_PORT=18081
NGINX_PORT=18082
HAPROXY_PORT=18083
WEFT_ADMIN_PORT=18901
WEFT4_PORT=18084
WEFT4_ADMIN_PORT=18904
WEFTSTD_PORT=18085
WEFTSTD_ADMIN_PORT=18905
# HTTP/2 (h2c, prior knowledge): nginx and HAProxy need a listener of their own; Weft's
# `auto` listeners take both.
NGINXH2_PORT=18089
HAPROXYH2_PORT=18099
# gRPC unary (h2c both ways): the echo origin, and a listener of its own on each proxy (the
# Weft ones on the weft and weftstd processes).
GRPC_ORIGIN_PORT=18079
WEFTGRPC_PORT=18091
WEFTSTDGRPC_PORT=18092
NGINXGRPC_PORT=18093
HAPROXYGRPC_PORT=18094
# Idle memory: the standard chain on two workers, started for that alone.
WEFTIDLE_PORT=18090
WEFTIDLE_ADMIN_PORT=18910
# Two sidecar hops in one process each (outbound listener -> inbound listener -> origin):
# plaintext, mesh mTLS (Weft), and nginx's proxy_ssl to its own ssl_verify_client server.
WEFTPAIR_PORT=18086
WEFTPAIR_IN_PORT=18096
WEFTPAIR_ADMIN_PORT=18906
WEFTMTLS_PORT=18087
WEFTMTLS_IN_PORT=18097
WEFTMTLS_ADMIN_PORT=18907
NGINXTLS_PORT=18088
NGINXTLS_IN_PORT=18098

BENCH_NAME=run.sh
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
need_tools

# --- build ---------------------------------------------------------------------------------
if [[ ${NO_BUILD:-0} != 1 ]]; then
  log "building weft-proxy and weft-load (release)"
  (cd "$ROOT" && cargo build --release --quiet -p weft-proxy -p weft-benches \
    --bin weft-proxy --bin weft-load --bin weft-grpc-origin)
  log "building the no-op proxy-wasm filter (wasm32-wasip1)"
  rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
  (cd "$ROOT" && cargo build --release --quiet --target wasm32-wasip1 \
    --manifest-path tests/filters/Cargo.toml --target-dir "$TARGET_DIR" -p compat-noop)
  log "building the standard filters (wasm32-wasip1)"
  (cd "$ROOT" && cargo build --profile filter --quiet --target wasm32-wasip1 \
    -p weft-filter-router -p weft-filter-retry -p weft-filter-fault -p weft-filter-telemetry)
fi
[[ -x $LOAD_BIN && -x $WEFT_BIN ]] || die "release binaries missing; run without NO_BUILD=1"

# --- processes, stopped by PID on exit (lib.sh) -------------------------------------------
TMP=$(mktemp -d /tmp/weft-bench.XXXXXX)
chmod 755 "$TMP" # nginx workers run as an unprivileged user
trap cleanup EXIT

NOOP_WASM=$TARGET_DIR/wasm32-wasip1/release/compat_noop.wasm
[[ -f $NOOP_WASM ]] || die "$NOOP_WASM missing; run without NO_BUILD=1"
STD=$TARGET_DIR/wasm32-wasip1/filter
for f in router retry fault telemetry; do
  [[ -f $STD/weft_filter_$f.wasm ]] || die "$STD/weft_filter_$f.wasm missing; run without NO_BUILD=1"
done
ports_free $ORIGIN_PORT $WEFT_PORT $NGINX_PORT $HAPROXY_PORT $WEFT_ADMIN_PORT $WEFT4_PORT $WEFT4_ADMIN_PORT \
  $WEFTSTD_PORT $WEFTSTD_ADMIN_PORT $WEFTPAIR_PORT $WEFTPAIR_IN_PORT $WEFTPAIR_ADMIN_PORT \
  $WEFTMTLS_PORT $WEFTMTLS_IN_PORT $WEFTMTLS_ADMIN_PORT $NGINXTLS_PORT $NGINXTLS_IN_PORT \
  $NGINXH2_PORT $HAPROXYH2_PORT $WEFTIDLE_PORT $WEFTIDLE_ADMIN_PORT $GRPC_ORIGIN_PORT \
  $WEFTGRPC_PORT $WEFTSTDGRPC_PORT $NGINXGRPC_PORT $HAPROXYGRPC_PORT

# --- configs ---------------------------------------------------------------------------------
{
  nginx_common origin
  echo "http {"
  nginx_http_common origin
  cat <<EOF
    server {
        listen 127.0.0.1:$ORIGIN_PORT;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
} >"$TMP/origin.conf"

{
  nginx_common nginx
  echo "http {"
  nginx_http_common nginx
  cat <<EOF
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    upstream grpc_origin {
        server 127.0.0.1:$GRPC_ORIGIN_PORT;
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINXGRPC_PORT http2;
        location / { grpc_pass grpc://grpc_origin; }
    }
    server {
        listen 127.0.0.1:$NGINXH2_PORT http2;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} >"$TMP/nginx.conf"

cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
    pidfile $TMP/haproxy.pid

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always

frontend bench
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend origin

frontend bench_h2
    bind 127.0.0.1:$HAPROXYH2_PORT proto h2
    default_backend origin

frontend bench_grpc
    bind 127.0.0.1:$HAPROXYGRPC_PORT proto h2
    default_backend grpc_origin

backend origin
    server origin1 127.0.0.1:$ORIGIN_PORT

backend grpc_origin
    server grpc1 127.0.0.1:$GRPC_ORIGIN_PORT proto h2
EOF

# weft_config PORT ADMIN_PORT [FILTERS [GRPC_PORT]] : a Weft config on stdout, one listener
# in front of the origin; FILTERS is the listener's `filters:` list (YAML, indented 6
# spaces). With GRPC_PORT, a second listener there in front of the gRPC origin, with the
# same filters (routes to `origin` go to `grpc` there).
weft_config() {
  cat <<EOF
admin: { address: 127.0.0.1:$2 }
drain: { timeout_ms: 5000 }
wasm: { cache_dir: "$TMP/modules" }
listeners:
  - name: bench
    address: 127.0.0.1:$1
    protocol: auto
    default_cluster: origin
EOF
  [[ -n ${3:-} ]] && printf '    filters:\n%s\n' "$3"
  if [[ -n ${4:-} ]]; then
    printf '  - name: grpc\n    address: 127.0.0.1:%s\n    protocol: auto\n    default_cluster: grpc\n' "$4"
    [[ -n ${3:-} ]] && printf '    filters:\n%s\n' "${3//cluster: origin/cluster: grpc}"
  fi
  cat <<EOF
clusters:
  - name: grpc
    protocol: http2
    endpoints: [ { address: 127.0.0.1:$GRPC_ORIGIN_PORT } ]
    limits: { max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }
  - name: origin
    protocol: http1
    lb_policy: round_robin
    endpoints: [ { address: 127.0.0.1:$ORIGIN_PORT, weight: 1 } ]
    limits: { max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }
EOF
}

weft_config $WEFT_PORT $WEFT_ADMIN_PORT "" $WEFTGRPC_PORT >"$TMP/weft.yaml"

# The same proxy with a chain of four no-op proxy-wasm filters.
weft_config $WEFT4_PORT $WEFT4_ADMIN_PORT "$(for i in 1 2 3 4; do
  echo "      - { name: noop$i, module: \"$NOOP_WASM\" }"
done)" >"$TMP/weft4.yaml"

# The same proxy with the standard chain: telemetry (metrics and tracing; access log off),
# router, fault at 0%, retry.
STD_FILTERS=$(std_filters)
weft_config $WEFTSTD_PORT $WEFTSTD_ADMIN_PORT "$STD_FILTERS" $WEFTSTDGRPC_PORT >"$TMP/weftstd.yaml"
weft_config $WEFTIDLE_PORT $WEFTIDLE_ADMIN_PORT "$STD_FILTERS" >"$TMP/weftidle.yaml"

# --- mesh TLS: certificates (openssl, ECDSA P-256) and the two-hop configs -------------------
# A mesh root; the outbound side's SPIFFE certificate (a) and the inbound side's (b, which
# also names inbound.mesh so that nginx's proxy_ssl_verify has a name to check).
PKI=$TMP/pki
mkdir -p "$PKI"
openssl_quiet() { openssl "$@" >/dev/null 2>&1 || die "openssl $1 failed"; }
openssl_quiet req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj "/CN=bench mesh root" -keyout "$PKI/ca.key" -out "$PKI/ca.pem" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
leaf() { # leaf NAME SAN
  openssl_quiet req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$1" -keyout "$PKI/$1.key" -out "$PKI/$1.csr" -addext "subjectAltName=$2" \
    -addext extendedKeyUsage=serverAuth,clientAuth -addext keyUsage=critical,digitalSignature
  openssl_quiet x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 30 -copy_extensions copy -out "$PKI/$1.pem"
}
leaf a "URI:spiffe://bench.local/ns/default/sa/a"
leaf b "URI:spiffe://bench.local/ns/default/sa/b,DNS:inbound.mesh"

# weft_pair PORT IN_PORT ADMIN_PORT MTLS : one Weft process playing both sidecars of a hop;
# MTLS=1: mesh mTLS between them (identity b for both roles: a process has one identity).
weft_pair() {
  local mtls=$4
  printf 'admin: { address: 127.0.0.1:%s }\ndrain: { timeout_ms: 5000 }\n' "$3"
  ((mtls)) && printf 'identity: { cert_file: %s, key_file: %s, trust_bundle_file: %s }\n' \
    "$PKI/b.pem" "$PKI/b.key" "$PKI/ca.pem"
  printf 'listeners:\n  - name: outbound\n    address: 127.0.0.1:%s\n    default_cluster: inbound\n' "$1"
  printf '  - name: inbound\n    address: 127.0.0.1:%s\n    default_cluster: origin\n' "$2"
  ((mtls)) && printf '    tls: { mode: strict }\n'
  printf 'clusters:\n  - name: inbound\n    endpoints: [ { address: 127.0.0.1:%s } ]\n' "$2"
  printf '    limits: { max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }\n'
  ((mtls)) && printf '    tls: { mode: mesh, identities: ["spiffe://bench.local/ns/default/sa/b"] }\n'
  printf '  - name: origin\n    endpoints: [ { address: 127.0.0.1:%s } ]\n' "$ORIGIN_PORT"
  printf '    limits: { max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }\n'
}
weft_pair $WEFTPAIR_PORT $WEFTPAIR_IN_PORT $WEFTPAIR_ADMIN_PORT 0 >"$TMP/weftpair.yaml"
weft_pair $WEFTMTLS_PORT $WEFTMTLS_IN_PORT $WEFTMTLS_ADMIN_PORT 1 >"$TMP/weftmtls.yaml"

{
  nginx_common nginxtls
  echo "http {"
  nginx_http_common nginxtls
  cat <<EOF
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    upstream inbound {
        server 127.0.0.1:$NGINXTLS_IN_PORT;
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINXTLS_PORT;
        location / {
            proxy_pass https://inbound;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate $PKI/a.pem;
            proxy_ssl_certificate_key $PKI/a.key;
            proxy_ssl_trusted_certificate $PKI/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name inbound.mesh;
            proxy_ssl_session_reuse on;
        }
    }
    server {
        listen 127.0.0.1:$NGINXTLS_IN_PORT ssl;
        ssl_certificate $PKI/b.pem;
        ssl_certificate_key $PKI/b.key;
        ssl_client_certificate $PKI/ca.pem;
        ssl_verify_client on;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} >"$TMP/nginxtls.conf"

# --- start everything ------------------------------------------------------------------------
mkdir -p "$TMP/origin-tmp" "$TMP/nginx-tmp" "$TMP/nginxtls-tmp"
"$NGINX_BIN" -t -q -p "$TMP" -e "$TMP/check.log" -c "$TMP/origin.conf" || die "origin config"
"$NGINX_BIN" -t -q -p "$TMP" -e "$TMP/check.log" -c "$TMP/nginx.conf" || die "nginx config"
"$NGINX_BIN" -t -q -p "$TMP" -e "$TMP/check.log" -c "$TMP/nginxtls.conf" || die "nginxtls config"
"$HAPROXY_BIN" -c -q -f "$TMP/haproxy.cfg" || die "haproxy config"

start origin 0 "$NGINX_BIN" -p "$TMP" -e "$TMP/origin.error.log" -c "$TMP/origin.conf"
ORIGIN_PID=$LAST_PID
start grpcorigin 0 "$TARGET_DIR/release/weft-grpc-origin" --listen 127.0.0.1:$GRPC_ORIGIN_PORT
wait_ok "http://127.0.0.1:$ORIGIN_PORT/" || die "origin did not start (see $TMP/origin.log)"
start weft 1 "$WEFT_BIN" --config "$TMP/weft.yaml" --workers 1 --log-level warn
WEFT_PID=$LAST_PID
start weft4 1 "$WEFT_BIN" --config "$TMP/weft4.yaml" --workers 1 --log-level warn
WEFT4_PID=$LAST_PID
start weftstd 1 "$WEFT_BIN" --config "$TMP/weftstd.yaml" --workers 1 --log-level warn
WEFTSTD_PID=$LAST_PID
start nginx 1 "$NGINX_BIN" -p "$TMP" -e "$TMP/nginx.error.log" -c "$TMP/nginx.conf"
NGINX_PID=$LAST_PID
start haproxy 1 "$HAPROXY_BIN" -db -f "$TMP/haproxy.cfg"
HAPROXY_PID=$LAST_PID
start weftpair 1 "$WEFT_BIN" --config "$TMP/weftpair.yaml" --workers 1 --log-level warn
WEFTPAIR_PID=$LAST_PID
start weftmtls 1 "$WEFT_BIN" --config "$TMP/weftmtls.yaml" --workers 1 --log-level warn
WEFTMTLS_PID=$LAST_PID
start nginxtls 1 "$NGINX_BIN" -p "$TMP" -e "$TMP/nginxtls.error.log" -c "$TMP/nginxtls.conf"
NGINXTLS_PID=$LAST_PID
wait_ok "http://127.0.0.1:$WEFTPAIR_ADMIN_PORT/ready" || die "weftpair did not become ready (see $TMP/weftpair.log)"
wait_ok "http://127.0.0.1:$WEFTMTLS_ADMIN_PORT/ready" || die "weftmtls did not become ready (see $TMP/weftmtls.log)"
wait_ok "http://127.0.0.1:$WEFT_ADMIN_PORT/ready" || die "weft did not become ready (see $TMP/weft.log)"
wait_ok "http://127.0.0.1:$WEFT4_ADMIN_PORT/ready" || die "weft4 did not become ready (see $TMP/weft4.log)"
wait_ok "http://127.0.0.1:$WEFTSTD_ADMIN_PORT/ready" || die "weftstd did not become ready (see $TMP/weftstd.log)"
# Started once the others are ready: its modules come from the warm cache, as a restarted
# sidecar's do (compiling them leaves the compiler's pages touched).
start weftidle 1 "$WEFT_BIN" --config "$TMP/weftidle.yaml" --workers 2 --log-level warn
WEFTIDLE_PID=$LAST_PID
wait_ok "http://127.0.0.1:$WEFTIDLE_ADMIN_PORT/ready" || die "weftidle did not become ready (see $TMP/weftidle.log)"

# nginx's idle memory, before any load (see "idle memory" below).
rss_kb() { # the summed VmRSS of these PIDs
  local total=0 pid kb
  for pid in "$@"; do
    kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status") || die "process $pid is gone"
    total=$((total + kb))
  done
  echo "$total"
}
for ((i = 0; i < 20; i++)); do curl -sf -o /dev/null "http://127.0.0.1:$NGINX_PORT/" || die "nginx failed a request"; done
sleep 3
mapfile -t nginx_pids < <(tree_pids "$NGINX_PID")
IDLE_NGINX_KB=$(rss_kb "${nginx_pids[@]}")

declare -A URL=(
  [direct]="http://127.0.0.1:$ORIGIN_PORT/"
  [weft]="http://127.0.0.1:$WEFT_PORT/"
  [weft4]="http://127.0.0.1:$WEFT4_PORT/"
  [weftstd]="http://127.0.0.1:$WEFTSTD_PORT/"
  [nginx]="http://127.0.0.1:$NGINX_PORT/"
  [haproxy]="http://127.0.0.1:$HAPROXY_PORT/"
  [weftpair]="http://127.0.0.1:$WEFTPAIR_PORT/"
  [weftmtls]="http://127.0.0.1:$WEFTMTLS_PORT/"
  [nginxtls]="http://127.0.0.1:$NGINXTLS_PORT/"
)
declare -A ROOT_PID=([weft]=$WEFT_PID [weft4]=$WEFT4_PID [weftstd]=$WEFTSTD_PID [nginx]=$NGINX_PID
  [haproxy]=$HAPROXY_PID [weftpair]=$WEFTPAIR_PID [weftmtls]=$WEFTMTLS_PID [nginxtls]=$NGINXTLS_PID)
TARGETS=(direct weft weft4 weftstd nginx haproxy weftpair weftmtls nginxtls)

for t in "${TARGETS[@]}"; do
  wait_ok "${URL[$t]}" || die "$t does not answer 2xx on ${URL[$t]} (see $TMP/$t.log)"
  body=$(curl -s --max-time 2 "${URL[$t]}")
  [[ $body == ok ]] || die "$t answered '$body' instead of the origin's 'ok'"
done
log "all up: origin pid $ORIGIN_PID, weft $WEFT_PID, nginx $NGINX_PID, haproxy $HAPROXY_PID"

# load NAME URL ARGS... : one pinned weft-load run; its JSON goes to $TMP/NAME.json.
load() {
  local name=$1 url=$2
  shift 2
  timeout $((${DURATION%.*} + 60)) taskset -c 0 "$LOAD_BIN" --url "$url" "$@" \
    >"$TMP/$name.json" 2>"$TMP/$name.err" || die "weft-load $name failed: $(cat "$TMP/$name.err")"
}

# measure TARGET KIND ARGS... : a run with the proxy's CPU time read around it; writes
# $TMP/TARGET.KIND.json = the load report + {"cpu_ns": N}.
measure() {
  local t=$1 kind=$2 pids=() before after
  shift 2
  [[ $t != direct ]] && mapfile -t pids < <(tree_pids "${ROOT_PID[$t]}")
  before=0
  ((${#pids[@]})) && before=$(cpu_ns "${pids[@]}")
  load "$t.$kind.raw" "${URL[$t]}" "$@"
  after=0
  ((${#pids[@]})) && after=$(cpu_ns "${pids[@]}")
  jq -c --argjson ns $((after - before)) --argjson pids "${#pids[@]}" \
    '. + {cpu_ns: $ns, cpu_pids: $pids}' "$TMP/$t.$kind.raw.json" >"$TMP/$t.$kind.$round.json"
}

# REPEAT rounds, each over every target in turn, so that a noisy minute of the machine hits
# every target alike; per target and kind the run with the median CPU per request (the
# median req/s for `direct`) is the result, and every run is kept in the JSON.
for ((round = 1; round <= REPEAT; round++)); do
  for t in "${TARGETS[@]}"; do
    log "round $round/$REPEAT, $t: warm-up ${WARMUP_SECS}s, max ($MAX_CONNS conns, ${DURATION}s), rate $RATE/s ($RATE_CONNS conns, ${DURATION}s)"
    load "$t.warmup" "${URL[$t]}" --mode max --connections "$MAX_CONNS" --duration-secs "$WARMUP_SECS"
    measure "$t" max --mode max --connections "$MAX_CONNS" --duration-secs "$DURATION"
    sleep 1
    measure "$t" rate --mode rate --rate "$RATE" --connections "$RATE_CONNS" --duration-secs "$DURATION"
    sleep 1
  done
done
for t in "${TARGETS[@]}"; do
  for kind in max rate; do
    jq -s 'def cost: if .cpu_pids == 0 then -.rps else .cpu_ns / ([.requests, 1] | max) end;
           (sort_by(cost) | .[length / 2 | floor]) + {runs: [.[] | {rps, cpu_ns, requests,
             p50_ms: .latency_ms.p50, p99_ms: .latency_ms.p99}]}' \
      "$TMP/$t.$kind".[0-9]*.json >"$TMP/$t.$kind.json"
  done
done

# --- new TLS handshakes ------------------------------------------------------------------------
# openssl s_time (pinned to core 0) opens a new mTLS connection per request to each inbound
# side (client certificate a), for HS_SECS seconds: handshakes per second on the proxy's one
# core, and the proxy's CPU per handshake.
HS_SECS=${HS_SECS:-5}
((QUICK)) && HS_SECS=2
declare -A HS_RATE HS_CPU
handshakes() { # handshakes TARGET PORT
  local pids before after out n secs
  mapfile -t pids < <(tree_pids "${ROOT_PID[$1]}")
  before=$(cpu_ns "${pids[@]}")
  out=$(taskset -c 0 timeout $((HS_SECS + 30)) openssl s_time -connect "127.0.0.1:$2" -new \
    -time "$HS_SECS" -cert "$PKI/a.pem" -key "$PKI/a.key" -CAfile "$PKI/ca.pem" -www / 2>&1 || true)
  after=$(cpu_ns "${pids[@]}")
  read -r n secs < <(sed -nE 's/^([0-9]+) connections in ([0-9.]+) real seconds.*/\1 \2/p' <<<"$out" | head -1)
  [[ -n ${n:-} && $n -gt 0 ]] || die "openssl s_time against $1 made no connection: $out"
  HS_RATE[$1]=$(awk -v n="$n" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
  HS_CPU[$1]=$(awk -v t=$((after - before)) -v n="$n" 'BEGIN { printf "%.0f", t / 1e3 / n }')
}
log "new mTLS handshakes: ${HS_SECS}s of openssl s_time -new against each inbound side"
handshakes weftmtls $WEFTMTLS_IN_PORT
handshakes nginxtls $NGINXTLS_IN_PORT

# --- HTTP/2 -------------------------------------------------------------------------------------
# h2load (pinned to core 0): H2_REQUESTS requests over 10 connections of 100 streams each
# (h2c, prior knowledge), to each proxy's HTTP/2 listener; the origin stays HTTP/1.1.
H2_REQUESTS=${H2_REQUESTS:-300000}
((QUICK)) && H2_REQUESTS=60000
declare -A H2_URL=([weft]="http://127.0.0.1:$WEFT_PORT/" [weftstd]="http://127.0.0.1:$WEFTSTD_PORT/"
  [nginx]="http://127.0.0.1:$NGINXH2_PORT/" [haproxy]="http://127.0.0.1:$HAPROXYH2_PORT/")
H2_TARGETS=(weft weftstd nginx haproxy)
# h2run KIND TARGET URL [H2LOAD-ARG...] : a warm-up of a tenth, then H2_REQUESTS requests
# measured; the result goes into $TMP/KIND.json under TARGET.
h2run() {
  local kind=$1 t=$2 url=$3 pids before after out rps ok
  shift 3
  mapfile -t pids < <(tree_pids "${ROOT_PID[$t]}")
  taskset -c 0 timeout 300 h2load -n $((H2_REQUESTS / 10)) -c 10 -m 100 "$@" "$url" >/dev/null 2>&1 || true
  before=$(cpu_ns "${pids[@]}")
  out=$(taskset -c 0 timeout 300 h2load -n "$H2_REQUESTS" -c 10 -m 100 "$@" "$url" 2>&1) ||
    die "h2load ($kind) against $t failed: $out"
  after=$(cpu_ns "${pids[@]}")
  rps=$(sed -nE 's/^finished in .*, ([0-9.]+) req\/s.*/\1/p' <<<"$out")
  ok=$(sed -nE 's/^status codes: ([0-9]+) 2xx.*/\1/p' <<<"$out")
  [[ -n $rps && -n $ok ]] || die "cannot read h2load's report ($kind) for $t: $out"
  [[ -f $TMP/$kind.json ]] || echo "{}" >"$TMP/$kind.json"
  jq --arg t "$t" --argjson rps "$rps" --argjson ok "$ok" --argjson n "$H2_REQUESTS" \
    --argjson ns $((after - before)) \
    '. + {($t): {rps: $rps, ok: $ok, failed: ($n - $ok),
       cpu_us_per_req: (if $ok > 0 then $ns / 1e3 / $ok else null end)}}' \
    "$TMP/$kind.json" >"$TMP/$kind.next.json"
  mv "$TMP/$kind.next.json" "$TMP/$kind.json"
}
for t in "${H2_TARGETS[@]}"; do
  log "$t: HTTP/2, h2load -n $H2_REQUESTS -c 10 -m 100"
  h2run h2 "$t" "${H2_URL[$t]}"
done

# --- gRPC unary ----------------------------------------------------------------------------------
# The same h2load run as calls: POST of one 32-byte message (5-byte gRPC frame header), `te:
# trailers`, to each proxy's gRPC listener, in front of weft-grpc-origin (h2c), which echoes
# it with `grpc-status: 0`. One call through each is checked first: the message comes back
# and the status trailer says 0.
declare -A GRPC_URL=([weft]="http://127.0.0.1:$WEFTGRPC_PORT/bench.Echo/Unary"
  [weftstd]="http://127.0.0.1:$WEFTSTDGRPC_PORT/bench.Echo/Unary"
  [nginx]="http://127.0.0.1:$NGINXGRPC_PORT/bench.Echo/Unary"
  [haproxy]="http://127.0.0.1:$HAPROXYGRPC_PORT/bench.Echo/Unary")
{
  printf '\x00\x00\x00\x00\x20'
  printf 'weft-bench-grpc-unary-message-32'
} >"$TMP/grpc.msg"
for t in "${H2_TARGETS[@]}"; do
  reply=$(curl -s --http2-prior-knowledge --max-time 5 -H 'content-type: application/grpc' \
    -H 'te: trailers' --data-binary @"$TMP/grpc.msg" -D "$TMP/grpc.$t.head" "${GRPC_URL[$t]}" |
    tail -c 32) || true
  [[ $reply == weft-bench-grpc-unary-message-32 ]] &&
    grep -qi '^grpc-status: 0' "$TMP/grpc.$t.head" ||
    die "a gRPC call through $t did not come back whole with grpc-status 0 (see $TMP/grpc.$t.head)"
  log "$t: gRPC unary, h2load -n $H2_REQUESTS -c 10 -m 100"
  h2run grpc "$t" "${GRPC_URL[$t]}" -d "$TMP/grpc.msg" -H 'content-type: application/grpc' \
    -H 'te: trailers'
done

# --- idle memory -------------------------------------------------------------------------------
# weftidle: the standard chain on two workers, after 20 requests (every worker's instances
# made), then 3 s of quiet; nginx (master + 1 worker) for comparison, measured the same way
# before the load runs (after them it holds what the HTTP/2 and gRPC runs made it allocate).
for ((i = 0; i < 20; i++)); do curl -sf -o /dev/null "http://127.0.0.1:$WEFTIDLE_PORT/" || die "weftidle failed a request"; done
sleep 3
IDLE_WEFT_KB=$(rss_kb "$WEFTIDLE_PID")
# Of which anonymous (heap, stacks, instance memories): the rest is file pages (the binary's
# code and data, libc) that every Weft process on a host shares.
IDLE_WEFT_ANON_KB=$(awk '/^Anonymous:/ { print $2 }' "/proc/$WEFTIDLE_PID/smaps_rollup")

# --- results ---------------------------------------------------------------------------------
# One JSON document: per target the two raw reports plus derived figures, and the ratios.
jq -n --argjson duration "$DURATION" --argjson rate "$RATE" \
  --argjson max_conns "$MAX_CONNS" --argjson rate_conns "$RATE_CONNS" \
  --arg host "$(uname -srm)" --arg nginx "$("$NGINX_BIN" -v 2>&1)" \
  --arg haproxy "$("$HAPROXY_BIN" -v | head -1)" \
  --slurpfile dm "$TMP/direct.max.json" --slurpfile dr "$TMP/direct.rate.json" \
  --slurpfile wm "$TMP/weft.max.json" --slurpfile wr "$TMP/weft.rate.json" \
  --slurpfile fm "$TMP/weft4.max.json" --slurpfile fr "$TMP/weft4.rate.json" \
  --slurpfile sm "$TMP/weftstd.max.json" --slurpfile sr "$TMP/weftstd.rate.json" \
  --slurpfile nm "$TMP/nginx.max.json" --slurpfile nr "$TMP/nginx.rate.json" \
  --slurpfile hm "$TMP/haproxy.max.json" --slurpfile hr "$TMP/haproxy.rate.json" \
  --slurpfile pm "$TMP/weftpair.max.json" --slurpfile pr "$TMP/weftpair.rate.json" \
  --slurpfile tm "$TMP/weftmtls.max.json" --slurpfile tr "$TMP/weftmtls.rate.json" \
  --slurpfile xm "$TMP/nginxtls.max.json" --slurpfile xr "$TMP/nginxtls.rate.json" \
  --slurpfile h2 "$TMP/h2.json" --slurpfile grpc "$TMP/grpc.json" --argjson idle_weft "$IDLE_WEFT_KB" --argjson idle_nginx "$IDLE_NGINX_KB" \
  --argjson idle_weft_anon "${IDLE_WEFT_ANON_KB:-null}" '
  def us_per_req($r): if $r.cpu_pids == 0 or $r.requests == 0 then null
                      else $r.cpu_ns / 1e3 / $r.requests end;
  def util($r): if $r.cpu_pids == 0 then null else $r.cpu_ns / 1e9 / $r.elapsed_secs end;
  def row($m; $r; $direct_p50): {
    max_rps: $m.rps, p50_ms: $r.latency_ms.p50, p90_ms: $r.latency_ms.p90,
    p99_ms: $r.latency_ms.p99, max_ms: $r.latency_ms.max,
    added_p50_ms: (if $direct_p50 == null then null else $r.latency_ms.p50 - $direct_p50 end),
    cpu_us_per_req_at_rate: us_per_req($r), cpu_us_per_req_at_max: us_per_req($m),
    proxy_cores_busy_at_max: util($m),
    failed: ($m.non_2xx + $m.errors + $m.timeouts + $r.non_2xx + $r.errors + $r.timeouts),
    max_run: $m, rate_run: $r };
  def ratio($a; $b): if $a == null or $b == null or $b <= 0 then null else $a / $b end;
  ($dr[0].latency_ms.p50) as $d50
  | { direct: row($dm[0]; $dr[0]; null), weft: row($wm[0]; $wr[0]; $d50),
      weft4: row($fm[0]; $fr[0]; $d50), weftstd: row($sm[0]; $sr[0]; $d50),
      nginx: row($nm[0]; $nr[0]; $d50), haproxy: row($hm[0]; $hr[0]; $d50),
      weftpair: row($pm[0]; $pr[0]; $d50), weftmtls: row($tm[0]; $tr[0]; $d50),
      nginxtls: row($xm[0]; $xr[0]; $d50) } as $rows
  | { setup: { host: $host, nginx: $nginx, haproxy: $haproxy, duration_secs: $duration,
               max_connections: $max_conns, rate: $rate, rate_connections: $rate_conns,
               cpu_clock: "schedstat (ns, all threads)",
               pinning: "load generator + origin nginx on core 0, proxy under test on core 1" },
      results: $rows,
      weft_vs_nginx: {
        max_rps: ratio($rows.weft.max_rps; $rows.nginx.max_rps),
        cpu_per_req_at_rate: ratio($rows.weft.cpu_us_per_req_at_rate; $rows.nginx.cpu_us_per_req_at_rate),
        cpu_per_req_at_max: ratio($rows.weft.cpu_us_per_req_at_max; $rows.nginx.cpu_us_per_req_at_max),
        added_p50: ratio($rows.weft.added_p50_ms; $rows.nginx.added_p50_ms) },
      weftstd_vs_nginx: {
        max_rps: ratio($rows.weftstd.max_rps; $rows.nginx.max_rps),
        cpu_per_req_at_rate: ratio($rows.weftstd.cpu_us_per_req_at_rate; $rows.nginx.cpu_us_per_req_at_rate),
        cpu_per_req_at_max: ratio($rows.weftstd.cpu_us_per_req_at_max; $rows.nginx.cpu_us_per_req_at_max),
        added_p50: ratio($rows.weftstd.added_p50_ms; $rows.nginx.added_p50_ms) },
      weftstd_per_filter_us_at_max: (if $rows.weftstd.cpu_us_per_req_at_max == null then null
        else ($rows.weftstd.cpu_us_per_req_at_max - $rows.weft.cpu_us_per_req_at_max) / 4 end),
      weftmtls_vs_nginxtls: {
        max_rps: ratio($rows.weftmtls.max_rps; $rows.nginxtls.max_rps),
        cpu_per_req_at_rate: ratio($rows.weftmtls.cpu_us_per_req_at_rate; $rows.nginxtls.cpu_us_per_req_at_rate),
        cpu_per_req_at_max: ratio($rows.weftmtls.cpu_us_per_req_at_max; $rows.nginxtls.cpu_us_per_req_at_max),
        added_p50: ratio($rows.weftmtls.added_p50_ms; $rows.nginxtls.added_p50_ms) },
      weftmtls_vs_weftpair: {
        max_rps: ratio($rows.weftmtls.max_rps; $rows.weftpair.max_rps),
        cpu_per_req_at_rate: ratio($rows.weftmtls.cpu_us_per_req_at_rate; $rows.weftpair.cpu_us_per_req_at_rate),
        cpu_per_req_at_max: ratio($rows.weftmtls.cpu_us_per_req_at_max; $rows.weftpair.cpu_us_per_req_at_max) },
      http2: { results: $h2[0],
        weft_vs_nginx: { rps: ratio($h2[0].weft.rps; $h2[0].nginx.rps),
          cpu_per_req: ratio($h2[0].weft.cpu_us_per_req; $h2[0].nginx.cpu_us_per_req) },
        weftstd_vs_nginx: { rps: ratio($h2[0].weftstd.rps; $h2[0].nginx.rps),
          cpu_per_req: ratio($h2[0].weftstd.cpu_us_per_req; $h2[0].nginx.cpu_us_per_req) } },
      grpc_unary: { results: $grpc[0],
        weft_vs_nginx: { rps: ratio($grpc[0].weft.rps; $grpc[0].nginx.rps),
          cpu_per_req: ratio($grpc[0].weft.cpu_us_per_req; $grpc[0].nginx.cpu_us_per_req) },
        weftstd_vs_nginx: { rps: ratio($grpc[0].weftstd.rps; $grpc[0].nginx.rps),
          cpu_per_req: ratio($grpc[0].weftstd.cpu_us_per_req; $grpc[0].nginx.cpu_us_per_req) } },
      idle_rss_kb: { weft_standard_chain_two_workers: $idle_weft,
        weft_standard_chain_two_workers_anonymous: $idle_weft_anon,
        nginx_master_and_worker: $idle_nginx },
      weft4_vs_weft: {
        cpu_per_req_at_rate: ratio($rows.weft4.cpu_us_per_req_at_rate; $rows.weft.cpu_us_per_req_at_rate),
        cpu_per_req_at_max: ratio($rows.weft4.cpu_us_per_req_at_max; $rows.weft.cpu_us_per_req_at_max),
        max_rps: ratio($rows.weft4.max_rps; $rows.weft.max_rps) } }
' >"$OUT"

fmt() { # fmt VALUE PRINTF-FORMAT : "–" for null
  # shellcheck disable=SC2059 # the format is the point
  if [[ $1 == null || -z $1 ]]; then printf '–'; else LC_ALL=C printf "$2" "$1"; fi
}
get() { jq -r "$1" "$OUT"; }

# h2_table KEY UNIT : the table of an h2load section of the JSON (.http2 or .grpc_unary).
h2_table() {
  local t
  echo "| target | $2/s | CPU µs/$2 | failed |"
  echo "|---|---:|---:|---:|"
  for t in "${H2_TARGETS[@]}"; do
    printf '| %s | %s | %s | %s |\n' "$t" \
      "$(fmt "$(get ".$1.results.$t.rps")" '%.0f')" \
      "$(fmt "$(get ".$1.results.$t.cpu_us_per_req")" '%.1f')" \
      "$(get ".$1.results.$t.failed")"
  done
  for t in weft weftstd; do
    printf '| **%s ÷ nginx** | %s | %s | |\n' "$t" \
      "$(fmt "$(get ".$1.${t}_vs_nginx.rps")" '%.2f×')" "$(fmt "$(get ".$1.${t}_vs_nginx.cpu_per_req")" '%.2f×')"
  done
}
echo
echo "Weft load benchmark: ${DURATION}s runs; max = $MAX_CONNS connections closed loop;" \
  "latency at $RATE req/s open loop over $RATE_CONNS connections. Proxy pinned to core 1," \
  "load generator + origin to core 0."
echo
echo "| target | max req/s | p50 ms | p99 ms | added p50 ms | CPU µs/req @${RATE} | CPU µs/req @max | proxy core busy @max | failed |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for t in "${TARGETS[@]}"; do
  r=".results.$t"
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$t" \
    "$(fmt "$(get "$r.max_rps")" '%.0f')" \
    "$(fmt "$(get "$r.p50_ms")" '%.3f')" \
    "$(fmt "$(get "$r.p99_ms")" '%.3f')" \
    "$(fmt "$(get "$r.added_p50_ms")" '%.3f')" \
    "$(fmt "$(get "$r.cpu_us_per_req_at_rate")" '%.1f')" \
    "$(fmt "$(get "$r.cpu_us_per_req_at_max")" '%.1f')" \
    "$(fmt "$(get "($r.proxy_cores_busy_at_max // null) | if . == null then null else . * 100 end")" '%.0f%%')" \
    "$(get "$r.failed")"
done
printf '| **weft ÷ nginx** | %s | | | %s | %s | %s | | |\n' \
  "$(fmt "$(get .weft_vs_nginx.max_rps)" '%.2f×')" \
  "$(fmt "$(get .weft_vs_nginx.added_p50)" '%.2f×')" \
  "$(fmt "$(get .weft_vs_nginx.cpu_per_req_at_rate)" '%.2f×')" \
  "$(fmt "$(get .weft_vs_nginx.cpu_per_req_at_max)" '%.2f×')"
printf '| **weft4 ÷ weft** | %s | | | | %s | %s | | |\n' \
  "$(fmt "$(get .weft4_vs_weft.max_rps)" '%.2f×')" \
  "$(fmt "$(get .weft4_vs_weft.cpu_per_req_at_rate)" '%.2f×')" \
  "$(fmt "$(get .weft4_vs_weft.cpu_per_req_at_max)" '%.2f×')"
printf '| **weftstd ÷ nginx** | %s | | | %s | %s | %s | | |\n' \
  "$(fmt "$(get .weftstd_vs_nginx.max_rps)" '%.2f×')" \
  "$(fmt "$(get .weftstd_vs_nginx.added_p50)" '%.2f×')" \
  "$(fmt "$(get .weftstd_vs_nginx.cpu_per_req_at_rate)" '%.2f×')" \
  "$(fmt "$(get .weftstd_vs_nginx.cpu_per_req_at_max)" '%.2f×')"
printf '| **weftmtls ÷ nginxtls** | %s | | | %s | %s | %s | | |\n' \
  "$(fmt "$(get .weftmtls_vs_nginxtls.max_rps)" '%.2f×')" \
  "$(fmt "$(get .weftmtls_vs_nginxtls.added_p50)" '%.2f×')" \
  "$(fmt "$(get .weftmtls_vs_nginxtls.cpu_per_req_at_rate)" '%.2f×')" \
  "$(fmt "$(get .weftmtls_vs_nginxtls.cpu_per_req_at_max)" '%.2f×')"
printf '| **weftmtls ÷ weftpair** | %s | | | | %s | %s | | |\n' \
  "$(fmt "$(get .weftmtls_vs_weftpair.max_rps)" '%.2f×')" \
  "$(fmt "$(get .weftmtls_vs_weftpair.cpu_per_req_at_rate)" '%.2f×')" \
  "$(fmt "$(get .weftmtls_vs_weftpair.cpu_per_req_at_max)" '%.2f×')"
echo
echo "weftpair, weftmtls, nginxtls = one process playing both sidecars of a hop (outbound" \
  "listener -> inbound listener -> origin): plaintext; mesh mTLS (SPIFFE certificates," \
  "keep-alive pool); nginx proxy_ssl with a client certificate to its own ssl_verify_client server."
echo
echo "| new mTLS handshakes (openssl s_time -new, one core) | handshakes/s | proxy CPU µs/handshake |"
echo "|---|---:|---:|"
for t in weftmtls nginxtls; do
  echo "| $t | ${HS_RATE[$t]} | ${HS_CPU[$t]} |"
done
echo
echo "weft4 = Weft with a chain of 4 no-op proxy-wasm filters (tests/filters/noop)."
echo "weftstd = Weft with the standard chain: telemetry (metrics, tracing), router, fault at 0%," \
  "retry; $(fmt "$(get .weftstd_per_filter_us_at_max)" '%.1f') µs of CPU per filter per request at max."
echo
echo "HTTP/2 (h2c): h2load -n $H2_REQUESTS -c 10 -m 100 on core 0; the origin stays HTTP/1.1."
echo
h2_table http2 req
echo
echo "gRPC unary (h2c both ways): the same h2load run, each request a call with a 32-byte message," \
  "to weft-grpc-origin (echo)."
echo
h2_table grpc_unary call
echo
echo "Idle RSS: Weft with the standard chain and two workers $(get .idle_rss_kb.weft_standard_chain_two_workers) KiB" \
  "($(get .idle_rss_kb.weft_standard_chain_two_workers_anonymous) KiB of it anonymous; after 20 requests and 3 s of quiet);" \
  "nginx master + worker $(get .idle_rss_kb.nginx_master_and_worker) KiB (the same, before any load)."
echo "JSON: $OUT"

failed=$(get '[.results[].failed, .http2.results[].failed, .grpc_unary.results[].failed] | add')
if ((failed > 0)); then
  log "WARNING: $failed requests failed (non-2xx, errors or timeouts); see $OUT"
fi
