# Helpers shared by the end-to-end benchmark scripts (load/run.sh, scale/run.sh); sourced,
# not run. The sourcing script sets BENCH_NAME (its name in log lines) first, and TMP (a
# directory of its own) before it starts processes.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LOAD_BIN=$TARGET_DIR/release/weft-load
WEFT_BIN=$TARGET_DIR/release/weft-proxy

log() { printf '[%s] %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# need_tools : installs what is missing of nginx, HAProxy, jq, curl, h2load and taskset
# (Debian's packages), and sets NGINX_BIN and HAPROXY_BIN.
need_tools() {
  local sudo="" missing=()
  [[ $EUID -ne 0 ]] && sudo=sudo
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v jq >/dev/null || missing+=(jq)
  command -v curl >/dev/null || missing+=(curl)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  command -v taskset >/dev/null || missing+=(util-linux)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    $sudo apt-get update -qq
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null; then
      # Newer Debian and Ubuntu dropped nginx-light; plain nginx is the same binary for this.
      missing=("${missing[@]/nginx-light/nginx}")
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  fi
  NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
  HAPROXY_BIN=$(command -v haproxy || echo /usr/sbin/haproxy)
  [[ -x $NGINX_BIN && -x $HAPROXY_BIN ]] || die "nginx or haproxy is missing after install"
  (($(nproc) >= 2)) || die "needs at least 2 cores (load + origin on core 0, proxy on core 1)"
}

# --- processes, stopped by PID on exit ---------------------------------------------------
PIDS=()
# stop PID : TERM, then KILL after 5 s; the PID leaves PIDS (it may be reused later).
stop() {
  local i p rest=()
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || rest+=("$p"); done
  PIDS=("${rest[@]}")
  if kill -TERM "$1" 2>/dev/null; then
    for ((i = 0; i < 50; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
  fi
  wait "$1" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do stop "$pid"; done
  if [[ -n ${TMP:-} ]]; then
    if ((rc == 0)); then rm -rf "$TMP"; else log "logs and configs kept in $TMP"; fi
  fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# ports_free PORT... : dies naming the first of these loopback ports something listens on.
ports_free() {
  local p
  for p in "$@"; do
    port_in_use "$p" && die "127.0.0.1:$p is already in use"
  done
  return 0
}

# start NAME CORE CMD... : runs CMD pinned to CORE in the background; its PID goes to
# LAST_PID and to PIDS (stopped by the EXIT trap). taskset execs CMD, so the PID is CMD's.
LAST_PID=
start() {
  local name=$1 core=$2
  shift 2
  taskset -c "$core" "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# wait_ok URL : until URL answers 2xx (10 s at most).
wait_ok() {
  local i
  for ((i = 0; i < 100; i++)); do
    curl -sf -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  return 1
}

# All PIDs of a process tree rooted at $1 (nginx: master + workers).
tree_pids() {
  local pid=$1 child
  echo "$pid"
  for child in $(pgrep -P "$pid" || true); do tree_pids "$child"; done
}

# cpu_ns PID... : CPU time of these processes, all their threads, in nanoseconds: the
# scheduler's own account (/proc/PID/task/*/schedstat, first field), not /proc/PID/stat's
# 10 ms ticks.
cpu_ns() {
  local total=0 pid task run rest
  for pid in "$@"; do
    [[ -d /proc/$pid/task ]] || die "process $pid is gone"
    for task in /proc/"$pid"/task/*/schedstat; do
      read -r run rest <"$task" 2>/dev/null || continue # a thread that just ended
      total=$((total + run))
    done
  done
  echo "$total"
}

# --- nginx configs -------------------------------------------------------------------------
nginx_common() { # $1 = name, $2 = worker_connections (default 8192), $3 = open-file limit
  cat <<EOF
daemon off;
master_process on;
worker_processes 1;
${3:+worker_rlimit_nofile $3;}
pid $TMP/$1.pid;
error_log $TMP/$1.error.log warn;
events { worker_connections ${2:-8192}; }
EOF
}
nginx_http_common() { # $1 = name
  cat <<EOF
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $TMP/$1-tmp/body;
    proxy_temp_path $TMP/$1-tmp/proxy;
    fastcgi_temp_path $TMP/$1-tmp/fastcgi;
    uwsgi_temp_path $TMP/$1-tmp/uwsgi;
    scgi_temp_path $TMP/$1-tmp/scgi;
EOF
}

# std_filters : the standard chain as a listener's `filters:` list (YAML, indented 6
# spaces): telemetry (metrics and tracing; access log off), router (everything to `origin`),
# fault at 0%, retry. The filters are the `filter` profile's builds.
std_filters() {
  local std=$TARGET_DIR/wasm32-wasip1/filter
  cat <<EOF
      - { name: telemetry, module: "$std/weft_filter_telemetry.wasm", config: { access_log: false } }
      - name: router
        module: "$std/weft_filter_router.wasm"
        config: { routes: [ { name: origin, match: { path: { prefix: / } }, cluster: origin } ] }
      - name: fault
        module: "$std/weft_filter_fault.wasm"
        config: { default: { delay: { percent: 0, ms: 100 }, abort: { percent: 0 } } }
      - name: retry
        module: "$std/weft_filter_retry.wasm"
        config: { default: { attempts: 2 } }
EOF
}
