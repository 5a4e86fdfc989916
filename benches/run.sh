#!/usr/bin/env bash
# Every figure the performance targets are read from, in one command (see benches/README.md):
#
#   bash benches/run.sh [--quick] [--out-dir DIR]
#
# 1. load/run.sh: direct, Weft (no filters, 4 no-op filters, the standard chain), nginx and
#    HAProxy over HTTP/1.1 at max and at 2,000 req/s; HTTP/2; gRPC unary; the mTLS hop;
#    idle RSS. Ratios to nginx and HAProxy from the same run.
# 2. scale/run.sh: CPU per request against routes, endpoints, connections and body size,
#    Weft and nginx, plotted.
# 3. chain/callgrind.sh: instructions per stream through each filter chain;
#    proxy/callgrind.sh: instructions per request of the whole proxy (Weft plain, Weft with
#    the standard chain, nginx), the ratio no neighbour on the VM can move.
# 4. profile/run.sh: where the CPU goes at max load (perf), Weft plain, Weft with the
#    standard chain, and nginx (skipped if perf cannot sample here).
#
# Results (default benches/results/): load.json, load.md, scale.json, scale.md, scale.png,
# chain-callgrind.json, chain-callgrind.md, proxy-callgrind.json, proxy-callgrind.md,
# profile-{plain,std,nginx}.md. --quick passes --quick to the first two (a
# smoke test: 1 round of short runs).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=$HERE/results
QUICK=()
while (($#)); do
  case "$1" in
    --quick) QUICK=(--quick) ;;
    --out-dir) DIR=${2:?--out-dir needs a directory}; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$DIR"

bash "$HERE/load/run.sh" "${QUICK[@]}" --out "$DIR/load.json" | tee "$DIR/load.md"
NO_BUILD=1 bash "$HERE/scale/run.sh" "${QUICK[@]}" --out "$DIR/scale.json" --plot "$DIR/scale.png" |
  tee "$DIR/scale.md"
bash "$HERE/chain/callgrind.sh" --out "$DIR/chain-callgrind.json" | tee "$DIR/chain-callgrind.md"
bash "$HERE/proxy/callgrind.sh" --out "$DIR/proxy-callgrind.json" | tee "$DIR/proxy-callgrind.md"
for kind in plain std nginx; do
  bash "$HERE/profile/run.sh" "$kind" --out "$DIR/profile-$kind.md" ||
    echo "run.sh: no profile of $kind (perf cannot sample here?)" >&2
done
