#!/usr/bin/env bash
# Instructions per stream through WASM filter chains, counted by callgrind: repeatable to a
# few instructions whatever else the machine does (wall-clock figures here swing by 30%).
#
#   bash benches/chain/callgrind.sh [CASE...] [--out FILE]
#
# CASE: the filter_chain bench cases (benches/benches/filter_chain.rs) to count, default
# all: noop_x1 noop_x4 hostcalls_x100 std_telemetry std_router std_fault std_retry
# std_chain router_routes_10 router_routes_1000 router_routes_10000. Each runs under `valgrind --tool=callgrind`, collecting only inside
# `one_stream` (building heads, the callbacks, finishing; module compilation and criterion
# are left out), and the count is divided by the streams started. NO_BUILD=1 reuses the
# built bench and filters. JSON (default /tmp/weft-chain-callgrind.json): {case: Ir}.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=/tmp/weft-chain-callgrind.json
CASES=()
while (($#)); do
  case "$1" in
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) CASES+=("$1") ;;
  esac
  shift
done
((${#CASES[@]})) || CASES=(noop_x1 noop_x4 hostcalls_x100 std_telemetry std_router std_fault std_retry std_chain
  router_routes_10 router_routes_1000 router_routes_10000)

log() { printf '[callgrind.sh] %s\n' "$*" >&2; }
command -v valgrind >/dev/null || { log "installing valgrind"; apt-get install -y -qq valgrind >/dev/null; }

if [[ ${NO_BUILD:-0} != 1 ]]; then
  log "building the guests, the standard filters and the filter_chain bench"
  (cd "$ROOT" && cargo build --release --quiet --target wasm32-wasip1 \
    --manifest-path tests/filters/Cargo.toml --target-dir "$TARGET_DIR" -p compat-noop -p compat-hostcalls)
  (cd "$ROOT" && cargo build --profile filter --quiet --target wasm32-wasip1 \
    -p weft-filter-router -p weft-filter-retry -p weft-filter-fault -p weft-filter-telemetry)
  (cd "$ROOT" && cargo bench --no-run --quiet -p weft-benches --bench filter_chain)
fi
BENCH=$(ls -t "$TARGET_DIR"/release/deps/filter_chain-* | grep -v '\.d$' | head -1)
[[ -x $BENCH ]] || { log "no filter_chain bench binary; run without NO_BUILD=1"; exit 1; }

TMP=$(mktemp -d /tmp/weft-callgrind.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
echo "{}" >"$TMP/out.json"
printf '| case | instructions per stream |\n|---|---:|\n'
for c in "${CASES[@]}"; do
  # Modules compile once per CPU model seen (valgrind's differs from the machine's): the
  # cache keeps them for the next run.
  valgrind --tool=callgrind --toggle-collect='*one_stream*' --callgrind-out-file="$TMP/$c.out" \
    "$BENCH" --bench --profile-time 1 "filter_chain/$c\$" >"$TMP/$c.log" 2>&1 ||
    { log "valgrind failed on $c:"; tail -5 "$TMP/$c.log" >&2; exit 1; }
  ir=$(python3 - "$TMP/$c.out" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
lines = text.split("\n")
names = {}
for l in lines:
    m = re.match(r"^c?fn=\((\d+)\)(?: (.*))?$", l)
    if m and m.group(2):
        names[m.group(1)] = m.group(2)
streams = 0
for i, l in enumerate(lines):
    m = re.match(r"cfn=\((\d+)\)", l)
    if m and names.get(m.group(1), "").endswith("FilterChain>::start_stream"):
        c = re.match(r"calls=(\d+)", lines[i + 1])
        streams += int(c.group(1)) if c else 0
total = int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))
print(total // max(streams, 1))
PY
)
  printf '| %s | %s |\n' "$c" "$ir"
  jq --arg c "$c" --argjson ir "$ir" '. + {($c): $ir}' "$TMP/out.json" >"$TMP/next.json"
  mv "$TMP/next.json" "$TMP/out.json"
done
cp "$TMP/out.json" "$OUT"
log "JSON: $OUT"
