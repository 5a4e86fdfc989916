#!/usr/bin/env bash
# How Weft's cost per request grows with what it is given: CPU per request at max throughput
# with 10, 1,000 and 10,000 routes in the router; 3, 100 and 10,000 endpoints in the
# cluster; 64, 1,000 and 10,000 concurrent connections; 3-byte, 1 KiB and 1 MiB response
# bodies. nginx does the same beside it where it can. See benches/README.md.
#
#   bash benches/scale/run.sh [--quick] [--out FILE] [--plot FILE]
#
# Env knobs: DURATION (seconds per measured run, default 5; --quick makes it 2), NO_BUILD=1
# to reuse the release binaries and filters as they are. --plot FILE (default: next to the
# JSON, .png) draws the curves with matplotlib (installed from PyPI if missing).
#
# Layout as load/run.sh: load generator + origin on core 0, the proxy under test on core 1;
# one proxy at a time, started for each point and stopped after it. Everything listens on
# 127.0.0.1 only, ports 18180-18182 and 18981.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=0
OUT=/tmp/weft-scale.json
PLOT=
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --plot) PLOT=${2:?--plot needs a file}; shift ;;
    --plot=*) PLOT=${1#--plot=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "scale/run.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
PLOT=${PLOT:-${OUT%.json}.png}

DURATION=${DURATION:-5}
((QUICK)) && DURATION=2
WARMUP_SECS=2

ORIGIN_PORT=18180
WEFT_PORT=18181
NGINX_PORT=18182
WEFT_ADMIN_PORT=18981

BENCH_NAME=scale.sh
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
need_tools

if [[ ${NO_BUILD:-0} != 1 ]]; then
  log "building weft-proxy and weft-load (release) and the router filter (wasm32-wasip1)"
  (cd "$ROOT" && cargo build --release --quiet -p weft-proxy -p weft-benches \
    --bin weft-proxy --bin weft-load)
  rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
  (cd "$ROOT" && cargo build --profile filter --quiet --target wasm32-wasip1 -p weft-filter-router)
fi
ROUTER_WASM=$TARGET_DIR/wasm32-wasip1/filter/weft_filter_router.wasm
[[ -x $LOAD_BIN && -x $WEFT_BIN && -f $ROUTER_WASM ]] ||
  die "release binaries or the router filter missing; run without NO_BUILD=1"
ports_free $ORIGIN_PORT $WEFT_PORT $NGINX_PORT $WEFT_ADMIN_PORT

TMP=$(mktemp -d /tmp/weft-scale.XXXXXX)
chmod 755 "$TMP" # nginx workers run as an unprivileged user
trap cleanup EXIT
mkdir -p "$TMP/www/b" "$TMP/origin-tmp" "$TMP/nginx-tmp"
head -c 1024 /dev/urandom >"$TMP/www/b/1k"
head -c 1048576 /dev/urandom >"$TMP/www/b/1m"
chmod -R a+rX "$TMP/www"

# --- the origin: "ok\n" on every path but /b/, where 1 KiB and 1 MiB files are --------------
{
  nginx_common origin 16384 19000
  echo "http {"
  nginx_http_common origin
  cat <<EOF
    sendfile on;
    server {
        listen 127.0.0.1:$ORIGIN_PORT backlog=16384;
        location / { default_type text/plain; return 200 "ok\n"; }
        location /b/ { root $TMP/www; default_type application/octet-stream; }
    }
}
EOF
} >"$TMP/origin.conf"
"$NGINX_BIN" -t -q -p "$TMP" -e "$TMP/check.log" -c "$TMP/origin.conf" || die "origin config"
start origin 0 "$NGINX_BIN" -p "$TMP" -e "$TMP/origin.error.log" -c "$TMP/origin.conf"
wait_ok "http://127.0.0.1:$ORIGIN_PORT/" || die "origin did not start (see $TMP/origin.log)"

# weft_config ENDPOINTS ROUTES CONN_LIMIT : Weft in front of the origin, the cluster's
# endpoints ENDPOINTS entries (all the origin's address: each entry is an endpoint of its
# own, with its own pool); ROUTES > 0: the router with /r0/ ... prefixes and /api/v1/ last.
# CONN_LIMIT: the cluster's max_connections.
weft_config() {
  local i
  cat <<EOF
admin: { address: 127.0.0.1:$WEFT_ADMIN_PORT }
drain: { timeout_ms: 1000 }
wasm: { cache_dir: "$TMP/modules" }
overload: { max_connections: 15000, keepalive_off_percent: 100 }
listeners:
  - name: bench
    address: 127.0.0.1:$WEFT_PORT
    protocol: auto
    default_cluster: origin
EOF
  if (($2 > 0)); then
    printf '    filters:\n      - name: router\n        module: "%s"\n        config:\n          routes:\n' "$ROUTER_WASM"
    for ((i = 0; i < $2 - 1; i++)); do
      printf '            - { match: { path: { prefix: /r%d/ } }, cluster: origin }\n' "$i"
    done
    printf '            - { match: { path: { prefix: /api/v1/ } }, cluster: origin }\n'
  fi
  printf 'clusters:\n  - name: origin\n    protocol: http1\n    endpoints:\n'
  for ((i = 0; i < $1; i++)); do printf '      - { address: 127.0.0.1:%d }\n' $ORIGIN_PORT; done
  printf '    limits: { max_connections: %d, max_pending_requests: 100000, max_requests: 100000 }\n' "$3"
}

# nginx_config ENDPOINTS ROUTES : the same for nginx (ROUTES prefix locations).
nginx_config() {
  local i
  nginx_common nginx 16384 19000
  echo "http {"
  nginx_http_common nginx
  echo "    upstream origin {"
  for ((i = 0; i < $1; i++)); do echo "        server 127.0.0.1:$ORIGIN_PORT;"; done
  cat <<EOF
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=16384;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
EOF
  if (($2 > 0)); then
    for ((i = 0; i < $2 - 1; i++)); do echo "        location /r$i/ { proxy_pass http://origin; }"; done
    echo "        location /api/v1/ { proxy_pass http://origin; }"
    echo '        location / { return 404; }'
  else
    echo "        location / { proxy_pass http://origin; }"
  fi
  echo "    }"
  echo "}"
}

# point DIMENSION VALUE TARGET CONNECTIONS PATH ENDPOINTS ROUTES CONN_LIMIT : starts TARGET
# (weft or nginx) configured so, loads it for WARMUP_SECS then DURATION at CONNECTIONS,
# stops it; one JSON line into $TMP/points.jsonl.
point() {
  local dim=$1 value=$2 t=$3 conns=$4 path=$5 eps=$6 routes=$7 limit=$8 pid pids before after
  log "$dim=$value: $t, $conns connections, GET $path"
  if [[ $t == weft ]]; then
    weft_config "$eps" "$routes" "$limit" >"$TMP/weft.yaml"
    start weft 1 "$WEFT_BIN" --config "$TMP/weft.yaml" --workers 1 --log-level warn
    pid=$LAST_PID
    wait_ok "http://127.0.0.1:$WEFT_ADMIN_PORT/ready" || die "weft did not become ready (see $TMP/weft.log)"
    url="http://127.0.0.1:$WEFT_PORT$path"
  else
    nginx_config "$eps" "$routes" >"$TMP/nginx.conf"
    "$NGINX_BIN" -t -q -p "$TMP" -e "$TMP/check.log" -c "$TMP/nginx.conf" || die "nginx config"
    start nginx 1 "$NGINX_BIN" -p "$TMP" -e "$TMP/nginx.error.log" -c "$TMP/nginx.conf"
    pid=$LAST_PID
    url="http://127.0.0.1:$NGINX_PORT$path"
    wait_ok "$url" || die "nginx did not start (see $TMP/nginx.log)"
  fi
  curl -sf -o /dev/null --max-time 5 "$url" || die "$t does not answer $url with 2xx"
  taskset -c 0 "$LOAD_BIN" --url "$url" --mode max --connections "$conns" \
    --duration-secs "$WARMUP_SECS" >/dev/null || die "weft-load failed (warm-up, $t)"
  mapfile -t pids < <(tree_pids "$pid")
  before=$(cpu_ns "${pids[@]}")
  taskset -c 0 "$LOAD_BIN" --url "$url" --mode max --connections "$conns" \
    --duration-secs "$DURATION" >"$TMP/run.json" || die "weft-load failed ($t)"
  after=$(cpu_ns "${pids[@]}")
  stop "$pid"
  jq -c --arg dim "$dim" --argjson value "$value" --arg t "$t" --argjson conns "$conns" \
    --arg path "$path" --argjson ns $((after - before)) '
    { dimension: $dim, value: $value, target: $t, connections: $conns, path: $path,
      rps, requests, failed: (.non_2xx + .errors + .timeouts),
      p50_ms: .latency_ms.p50, p99_ms: .latency_ms.p99,
      cpu_us_per_req: (if .requests > 0 then $ns / 1e3 / .requests else null end) }' \
    "$TMP/run.json" >>"$TMP/points.jsonl"
}

: >"$TMP/points.jsonl"
for t in weft nginx; do
  for n in 10 1000 10000; do point routes $n $t 64 /api/v1/x 1 $n 100000; done
  for n in 3 100 10000; do point endpoints $n $t 64 / $n 0 100000; done
  for n in 64 1000 10000; do
    # nginx opens an upstream connection per request in flight and has no queue for them
    # (max_conns without a queue is a 502): 10,000 of each do not fit in this machine's
    # 20,000 open files. Weft queues on the cluster's limit (1,024, Envoy's default).
    [[ $t == nginx && $n == 10000 ]] && continue
    point connections $n $t $n / 1 0 1024
  done
  point body_bytes 3 $t 64 / 1 0 100000
  point body_bytes 1024 $t 64 /b/1k 1 0 100000
  point body_bytes 1048576 $t 64 /b/1m 1 0 100000
done

jq -s --arg host "$(uname -srm)" --arg nginx "$("$NGINX_BIN" -v 2>&1)" \
  --argjson duration "$DURATION" '
  { setup: { host: $host, nginx: $nginx, duration_secs: $duration, mode: "max (closed loop)",
             cpu_clock: "schedstat (ns, all threads)",
             pinning: "load generator + origin nginx on core 0, proxy under test on core 1" },
    points: . }' "$TMP/points.jsonl" >"$OUT"

echo
echo "How cost grows: CPU µs per request at max (${DURATION}s runs; proxy on core 1)."
for dim in routes endpoints connections body_bytes; do
  echo
  echo "| $dim | weft µs/req | weft req/s | nginx µs/req | nginx req/s | weft ÷ nginx | failed |"
  echo "|---:|---:|---:|---:|---:|---:|---:|"
  jq -r --arg dim "$dim" '
    def f: if . == null then "–" else (. * 10 | round / 10 | tostring) end;
    [.points[] | select(.dimension == $dim)] | group_by(.value)[]
    | (map(select(.target == "weft"))[0]) as $w | (map(select(.target == "nginx"))[0]) as $n
    | "| \(.[0].value) | \($w.cpu_us_per_req | f) | \($w.rps // null | if . == null then "–" else round end)"
      + " | \($n.cpu_us_per_req // null | f) | \($n.rps // null | if . == null then "–" else round end)"
      + " | \(if $w and $n then ($w.cpu_us_per_req / $n.cpu_us_per_req * 100 | round / 100 | tostring) + "×" else "–" end)"
      + " | \([.[].failed] | add) |"' "$OUT"
done
echo
echo "JSON: $OUT"

if ! python3 -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib (PyPI) for the plot"
  python3 -m pip install --quiet matplotlib >/dev/null 2>&1 || log "matplotlib could not be installed: no plot"
fi
if python3 -c 'import matplotlib' 2>/dev/null; then
  python3 "$ROOT/benches/scale/plot.py" "$OUT" "$PLOT" && echo "Plot: $PLOT"
fi
failed=$(jq '[.points[].failed] | add' "$OUT")
((failed == 0)) || log "WARNING: $failed requests failed (non-2xx, errors or timeouts); see $OUT"
