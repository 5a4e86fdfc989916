#!/usr/bin/env bash
# Instructions per request of whole proxies, counted by callgrind: Weft without filters,
# Weft with the standard chain, and nginx as a plain reverse proxy, each in front of the
# same nginx origin. Counts are repeatable whatever the machine's neighbours do; they are
# user-space instructions only (the kernel's TCP and syscall work is not counted, and is
# about the same for all three: benches/profile/run.sh).
#
#   bash benches/proxy/callgrind.sh [weft|weftstd|nginx ...] [--out FILE]
#
# Each target runs under `valgrind --tool=callgrind` twice, for 500 and for 2,500 requests
# (`h2load --h1 -c 1`: one keep-alive connection, one request at a time); instructions per
# request = (I(2500) - I(500)) / 2000, so start-up and shutdown cancel out. Weft runs one
# worker; nginx one worker process without a master. The origin (nginx, not under valgrind)
# answers `ok`. Needs the release binaries and the standard filters (bash
# benches/load/run.sh builds them; NO_BUILD=1 is assumed here). Ports 18380-18383 on
# 127.0.0.1. JSON (default /tmp/weft-proxy-callgrind.json): {target: instructions/request}.
set -euo pipefail

OUT=/tmp/weft-proxy-callgrind.json
TARGETS=()
while (($#)); do
  case "$1" in
    weft | weftstd | nginx) TARGETS+=("$1") ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "proxy/callgrind.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
((${#TARGETS[@]})) || TARGETS=(weft weftstd nginx)

ORIGIN_PORT=18380
PROXY_PORT=18381
ADMIN_PORT=18382
FEW=500
MANY=2500

BENCH_NAME=proxy-callgrind.sh
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
need_tools
command -v valgrind >/dev/null || { log "installing valgrind"; apt-get install -y -qq valgrind >/dev/null; }
[[ -x $WEFT_BIN ]] || die "no release weft-proxy: run bash benches/load/run.sh (or cargo build --release -p weft-proxy)"
STD=$TARGET_DIR/wasm32-wasip1/filter
for f in router retry fault telemetry; do
  [[ -f $STD/weft_filter_$f.wasm ]] || die "$STD/weft_filter_$f.wasm missing (cargo build --profile filter --target wasm32-wasip1 -p weft-filter-$f)"
done
ports_free $ORIGIN_PORT $PROXY_PORT $ADMIN_PORT

TMP=$(mktemp -d /tmp/weft-proxy-callgrind.XXXXXX)
trap cleanup EXIT
mkdir -p "$TMP/origin-tmp" "$TMP/nginx-tmp"

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

# nginx under valgrind: one process (no master), so that one callgrind file holds it all.
{
  nginx_common nginx | sed 's/^master_process on;/master_process off;/'
  echo "http {"
  nginx_http_common nginx
  cat <<EOF
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive 16;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$PROXY_PORT;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} >"$TMP/nginx.conf"

weft_config() { # $1 = filters (YAML list, indented 6 spaces) or empty
  cat <<EOF
admin: { address: 127.0.0.1:$ADMIN_PORT }
drain: { timeout_ms: 1000 }
wasm: { cache_dir: "$TMP/modules" }
listeners:
  - name: bench
    address: 127.0.0.1:$PROXY_PORT
    protocol: auto
    default_cluster: origin
EOF
  [[ -n $1 ]] && printf '    filters:\n%s\n' "$1"
  cat <<EOF
clusters:
  - name: origin
    protocol: http1
    endpoints: [ { address: 127.0.0.1:$ORIGIN_PORT } ]
EOF
}
weft_config "" >"$TMP/weft.yaml"
weft_config "$(std_filters)" >"$TMP/weftstd.yaml"

start origin 0 "$NGINX_BIN" -c "$TMP/origin.conf" -e "$TMP/origin.error.log"
for _ in $(seq 50); do port_in_use $ORIGIN_PORT && break; sleep 0.1; done
port_in_use $ORIGIN_PORT || die "the origin did not start"

# run TARGET N : the instructions of TARGET serving N requests, start to exit, into RESULT.
RESULT=
run() {
  local target=$1 n=$2 out="$TMP/$1.$2.callgrind" cmd
  case $target in
    nginx) cmd=("$NGINX_BIN" -c "$TMP/nginx.conf" -e "$TMP/nginx.error.log") ;;
    *) cmd=("$WEFT_BIN" --config "$TMP/$target.yaml" --workers 1 --log-level warn) ;;
  esac
  # Pinned to core 1, the origin and h2load to core 0, as in load/run.sh.
  start "$target.$n" 1 valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}"
  local pid=$LAST_PID
  # Ready: Weft's admin says so (modules compiled); nginx answers through to the origin.
  local ok=""
  for _ in $(seq 2400); do
    if [[ $target == nginx ]]; then
      curl -sf -o /dev/null "http://127.0.0.1:$PROXY_PORT/" && ok=1 && break
    else
      curl -sf -o /dev/null "http://127.0.0.1:$ADMIN_PORT/ready" && ok=1 && break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  [[ -n $ok ]] || die "$target did not become ready under valgrind (see $TMP/$target.$n.log)"
  taskset -c 0 h2load --h1 -c 1 -n "$n" "http://127.0.0.1:$PROXY_PORT/" >"$TMP/$target.$n.h2load" 2>&1 ||
    die "h2load failed against $target (see $TMP/$target.$n.h2load)"
  grep -q "$n succeeded" "$TMP/$target.$n.h2load" ||
    die "not every request to $target succeeded: $(grep -m1 'requests:' "$TMP/$target.$n.h2load")"
  stop "$pid"
  local total=0 f t
  for f in "$out"*; do
    t=$(grep -m1 -E '^(summary|totals):' "$f" | awk '{print $2}')
    total=$((total + ${t:-0}))
  done
  ((total > 0)) || die "no callgrind totals for $target (see $TMP/$target.$n.log)"
  RESULT=$total
}

echo "{}" >"$TMP/out.json"
printf '| target | instructions, %s requests | instructions, %s requests | per request |\n|---|---:|---:|---:|\n' $FEW $MANY
for target in "${TARGETS[@]}"; do
  # A first short run fills the module cache for valgrind's CPU model, so that both measured
  # runs load the same compiled modules.
  [[ $target == weftstd ]] && run "$target" 10
  run "$target" $FEW
  few=$RESULT
  run "$target" $MANY
  many=$RESULT
  per=$(((many - few) / (MANY - FEW)))
  printf '| %s | %s | %s | %s |\n' "$target" "$few" "$many" "$per"
  jq --arg t "$target" --argjson v "$per" '. + {($t): $v}' "$TMP/out.json" >"$TMP/next.json"
  mv "$TMP/next.json" "$TMP/out.json"
done
cp "$TMP/out.json" "$OUT"
log "JSON: $OUT"
