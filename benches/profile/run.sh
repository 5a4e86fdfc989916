#!/usr/bin/env bash
# Where the proxy's CPU goes under load: perf's cpu-clock samples of one Weft process at max
# load (64 connections, weft-load), grouped by where the code comes from (the kernel, tokio,
# hyper, Weft's core, wasmtime and the filters' code, the allocator...) and the top symbols.
#
#   bash benches/profile/run.sh [plain|std|nginx] [--out FILE]
#
# plain (default): Weft without filters; std: the standard chain of load/run.sh; nginx:
# nginx's worker proxying the same way, for comparison. Needs perf (Debian's
# linux-perf; software cpu-clock events, so it works where hardware counters do not) and
# the release binaries and filters (bash benches/load/run.sh builds them). SECS (default 10)
# seconds of samples. Layout as load/run.sh: load + origin on core 0, the proxy on core 1;
# ports 18280, 18281 and 18991 on 127.0.0.1.
set -euo pipefail

KIND=plain
OUT=/tmp/weft-profile.txt
while (($#)); do
  case "$1" in
    plain | std | nginx) KIND=$1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "profile/run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
SECS=${SECS:-10}
ORIGIN_PORT=18280
WEFT_PORT=18281
WEFT_ADMIN_PORT=18991

BENCH_NAME=profile.sh
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
need_tools
command -v perf >/dev/null || {
  log "installing linux-perf"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
}
[[ -x $LOAD_BIN && -x $WEFT_BIN ]] || die "release binaries missing: run bash benches/load/run.sh first"
ports_free $ORIGIN_PORT $WEFT_PORT $WEFT_ADMIN_PORT

TMP=$(mktemp -d /tmp/weft-profile.XXXXXX)
chmod 755 "$TMP"
trap cleanup EXIT
mkdir -p "$TMP/origin-tmp"
{
  nginx_common origin
  echo "http {"
  nginx_http_common origin
  printf '    server {\n        listen 127.0.0.1:%s;\n' $ORIGIN_PORT
  printf '        location / { default_type text/plain; return 200 "ok\\n"; }\n    }\n}\n'
} >"$TMP/origin.conf"
{
  printf 'admin: { address: 127.0.0.1:%s }\nwasm: { cache_dir: "%s/modules" }\n' $WEFT_ADMIN_PORT "$TMP"
  printf 'listeners:\n  - name: bench\n    address: 127.0.0.1:%s\n    default_cluster: origin\n' $WEFT_PORT
  [[ $KIND == std ]] && printf '    filters:\n%s\n' "$(std_filters)"
  printf 'clusters:\n  - name: origin\n    endpoints: [ { address: 127.0.0.1:%s } ]\n' $ORIGIN_PORT
  printf '    limits: { max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }\n'
} >"$TMP/weft.yaml"

start origin 0 "$NGINX_BIN" -p "$TMP" -e "$TMP/origin.error.log" -c "$TMP/origin.conf"
wait_ok "http://127.0.0.1:$ORIGIN_PORT/" || die "origin did not start"
if [[ $KIND == nginx ]]; then
  mkdir -p "$TMP/nginx-tmp"
  {
    nginx_common nginx
    echo "http {"
    nginx_http_common nginx
    printf '    upstream origin { server 127.0.0.1:%s; keepalive 256; keepalive_requests 100000000; }\n' $ORIGIN_PORT
    printf '    server {\n        listen 127.0.0.1:%s;\n        location / {\n' $WEFT_PORT
    printf '            proxy_pass http://origin;\n            proxy_http_version 1.1;\n'
    printf '            proxy_set_header Connection "";\n        }\n    }\n}\n'
  } >"$TMP/nginx.conf"
  start nginx 1 "$NGINX_BIN" -p "$TMP" -e "$TMP/nginx.error.log" -c "$TMP/nginx.conf"
  wait_ok "http://127.0.0.1:$WEFT_PORT/" || die "nginx did not start (see $TMP/nginx.log)"
  WEFT_PID=$(pgrep -P "$LAST_PID" | head -1) # the worker
  [[ -n $WEFT_PID ]] || die "no nginx worker"
else
  # WEFT_WASM_PERFMAP=1: wasmtime writes /tmp/perf-<pid>.map, which names the filters'
  # compiled functions for perf (taskset execs, so the pid is Weft's).
  start weft 1 env WEFT_WASM_PERFMAP=1 "$WEFT_BIN" --config "$TMP/weft.yaml" --workers 1 --log-level warn
  WEFT_PID=$LAST_PID
  wait_ok "http://127.0.0.1:$WEFT_ADMIN_PORT/ready" || die "weft did not become ready (see $TMP/weft.log)"
fi

URL="http://127.0.0.1:$WEFT_PORT/"
taskset -c 0 "$LOAD_BIN" --url "$URL" --mode max --connections 64 --duration-secs 2 >/dev/null
taskset -c 0 "$LOAD_BIN" --url "$URL" --mode max --connections 64 --duration-secs $((SECS + 4)) \
  >"$TMP/load.json" &
LOAD_PID=$!
sleep 2
log "sampling $KIND for ${SECS}s"
perf record -q -e cpu-clock -F 1999 -p "$WEFT_PID" -o "$TMP/perf.data" -- sleep "$SECS" 2>"$TMP/perf.log" ||
  die "perf record failed: $(cat "$TMP/perf.log")"
wait "$LOAD_PID" || die "weft-load failed"
perf report -i "$TMP/perf.data" --stdio --no-children --sort dso,sym --percent-limit 0 2>/dev/null |
  grep -E '^ +[0-9.]+%' >"$TMP/report.txt" || die "perf report gave nothing"

python3 - "$TMP/report.txt" "$KIND" "$(jq -r .rps "$TMP/load.json")" <<'PY' | tee "$OUT"
import re, sys
rows = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*([0-9.]+)%\s+(.+?)\s+\[(.)\]\s+(.*)$", line)
    if m:
        rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()))
def is_guest(dso, sym):
    # Named from wasmtime's perf map (`wasm[N]::function[M]::name`), else unnamed code.
    return ("[JIT]" in dso or "/modules/" in dso or dso.startswith("jitted") or dso.startswith("perf-")
            or "wasm-function" in sym or sym.startswith("wasm[") or (dso == "[unknown]" and sym.startswith("0x")))
# Where a symbol's code comes from, first match wins.
GROUPS = [
    ("kernel (syscalls, TCP, scheduling)", lambda d, k, s: k == "k" or d.startswith("[kernel")),
    # Compiled modules run from the module cache's files (or anonymous memory): no symbols.
    ("nginx", lambda d, k, s: d == "nginx"),
    ("filters' wasm code (compiled modules)", lambda d, k, s: is_guest(d, s)),
    ("wasmtime (runtime, trampolines)", lambda d, k, s: "wasmtime" in s or "cranelift" in s),
    ("weft-wasm (the filter host)", lambda d, k, s: "weft_wasm" in s),
    ("hyper + h2 + http (codecs)", lambda d, k, s: re.search(r"\b(hyper|h2|http|httparse|hyper_util)::", s) or s.startswith("<hyper") or s.startswith("<h2") or s.startswith("<http")),
    ("tokio (runtime, I/O driver, timers)", lambda d, k, s: "tokio" in s or "mio::" in s),
    ("weft-core (proxying, pools, headers)", lambda d, k, s: "weft_core" in s or "weft_proxy" in s),
    ("allocator and memcpy", lambda d, k, s: "je_" in s or "jemalloc" in s or "malloc" in s or "free" == s or "memcpy" in s or "memmove" in s or "memset" in s),
    ("libc (other)", lambda d, k, s: d.startswith("libc")),
]
totals = {}
for pct, dso, kind, sym in rows:
    name = next((g for g, f in GROUPS if f(dso, kind, sym)), "other user code (std, bytes, tracing...)")
    totals[name] = totals.get(name, 0.0) + pct
print(f"{sys.argv[2]}, one worker at max load ({float(sys.argv[3]):.0f} req/s): share of CPU samples")
print()
print("| where | share |")
print("|---|---:|")
for name, pct in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"| {name} | {pct:.1f}% |")
print()
print("Top symbols:")
print()
print("| share | where | symbol |")
print("|---:|---|---|")
for pct, dso, kind, sym in rows[:25]:
    sym = sym if len(sym) < 110 else sym[:107] + "..."
    print(f"| {pct:.1f}% | {dso} | `{sym}` |")
guest = [(pct, sym) for pct, dso, kind, sym in rows if is_guest(dso, sym)]
if guest:
    print()
    print("The filters' own functions (named by wasmtime's perf map; `wasm[N]` is the Nth module compiled):")
    print()
    print("| share | function |")
    print("|---:|---|")
    for pct, sym in guest[:25]:
        sym = sym if len(sym) < 110 else sym[:107] + "..."
        print(f"| {pct:.1f}% | `{sym}` |")
PY
