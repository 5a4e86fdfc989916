#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation (the flags cargo-fuzz
# passes, without a sanitizer: stable Rust) and runs each for a bounded time, starting from
# its corpus in fuzz/corpus/<target>/ (new inputs go to a scratch copy, so the repo stays
# clean). A crash fails the run and leaves its input in target/fuzz/artifacts/.
#
#   fuzz/run.sh [seconds per target, default 20] [target ...]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(http1_framing http1_response config manifest map_codec hostcall_args control_api)
host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"
# --target: the flags go to the targets only, not to build scripts and proc macros.
cargo build --locked --release --target "$host" --target-dir ../target/fuzz
mkdir -p ../target/fuzz/artifacts
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/" 2>/dev/null || true
  echo "fuzz: $t for ${secs}s from $(ls "corpus/$t" 2>/dev/null | wc -l) corpus inputs"
  if ! "../target/fuzz/$host/release/$t" "$work" -max_total_time="$secs" -rss_limit_mb=2048 \
      -timeout=10 -artifact_prefix="../target/fuzz/artifacts/$t-" -print_final_stats=1 \
      2> "../target/fuzz/$t.log"; then
    tail -40 "../target/fuzz/$t.log" >&2
    echo "fuzz: $t found a crash; its input is in target/fuzz/artifacts/" >&2
    rm -rf "$work"
    exit 1
  fi
  grep -E "^stat::number_of_executed_units|^stat::new_units_added" "../target/fuzz/$t.log" | tr '\n' ' '
  echo
  rm -rf "$work"
done
