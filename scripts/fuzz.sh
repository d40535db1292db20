#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang, ASan + UBSan) into build-fuzz/ and runs
# each for SECONDS_PER_TARGET seconds (default 60), two at a time. Before fuzzing, every
# input in fuzz/regressions/<target>/ is replayed. Crashes, hangs (-timeout) and
# over-large allocations (-rss_limit_mb) are saved to $FUZZ_CRASH_DIR (default
# build-fuzz/fuzz-crashes/) and make the script exit non-zero. The corpus grows in
# build-fuzz/fuzz-corpus/<target>/ across runs; seeds are regenerated from real images
# each run. Prints the executions per target.
#
#   scripts/fuzz.sh            # 60 s per target (the test command runs 45)
#   scripts/fuzz.sh 3600       # long run: one hour per target
# Environment: FUZZ_BUILD_DIR, FUZZ_CRASH_DIR, FUZZ_PARALLEL (targets at once, 2),
# FUZZ_TARGETS (space-separated subset).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
BUILD=${FUZZ_BUILD_DIR:-build-fuzz}
CRASH_DIR=${FUZZ_CRASH_DIR:-$BUILD/fuzz-crashes}
PARALLEL=${FUZZ_PARALLEL:-2}
read -r -a TARGETS <<<"${FUZZ_TARGETS:-fuzz_super fuzz_meta fuzz_journal fuzz_image fuzz_cluster}"

# Per-target options: the largest input each target reads (fuzz/<target>.cc).
# fuzz_image seeds are a few bytes; without -len_control=0 libFuzzer would keep
# its inputs that short (one patch) for most of a short run.
target_opts() {
  case "$1" in
    fuzz_super) echo "-max_len=4097" ;;
    fuzz_meta) echo "-max_len=$((2 + 8 * 8 + 8 * 4096))" ;;
    fuzz_journal) echo "-max_len=$((3 + 16 * 4096))" ;;
    fuzz_image) echo "-max_len=1024 -len_control=0" ;;
    fuzz_cluster) echo "-max_len=$((1 + 3 * 8 + 8 * (2 + 4096)))" ;;
    *) echo "-max_len=4096" ;;
  esac
}

start=$(date +%s)
CC=${FUZZ_CC:-clang} CXX=${FUZZ_CXX:-clang++} \
  cmake -S . -B "$BUILD" -G Ninja -DAGORAFS_FUZZ=ON >/dev/null
nice -n 10 ninja -C "$BUILD" "${TARGETS[@]}"
built=$(date +%s)

mkdir -p "$CRASH_DIR" "$BUILD/fuzz-logs"
status=0

# Regression inputs first: each must run without a crash.
rm -f "$BUILD"/fuzz-logs/*.rc
for t in "${TARGETS[@]}"; do
  reg=fuzz/regressions/$t
  if [ -d "$reg" ] && [ -n "$(ls -A "$reg")" ]; then
    if ! "$BUILD/fuzz/$t" -rss_limit_mb=2048 -timeout=30 "$reg"/* \
        >"$BUILD/fuzz-logs/$t-regressions.log" 2>&1; then
      echo "FAIL $t: a regression input crashes again (see $BUILD/fuzz-logs/$t-regressions.log)"
      status=1
    fi
  fi
done

run_target() {
  local t=$1 seeds=$BUILD/fuzz-seeds/$t corpus=$BUILD/fuzz-corpus/$t
  rm -rf "$seeds"
  mkdir -p "$corpus"
  AGORAFS_FUZZ_WRITE_SEEDS=$seeds "$BUILD/fuzz/$t" >"$BUILD/fuzz-logs/$t-seeds.log" 2>&1 || return 1
  nice -n 10 "$BUILD/fuzz/$t" -max_total_time="$SECS" -print_final_stats=1 \
    -rss_limit_mb=2048 -timeout=20 $(target_opts "$t") \
    -artifact_prefix="$CRASH_DIR/$t-" "$corpus" "$seeds" >"$BUILD/fuzz-logs/$t.log" 2>&1
}

declare -A pid_of
running=()
for t in "${TARGETS[@]}"; do
  while [ "${#running[@]}" -ge "$PARALLEL" ]; do
    wait -n || true
    still=()
    for r in "${running[@]}"; do kill -0 "${pid_of[$r]}" 2>/dev/null && still+=("$r"); done
    running=("${still[@]}")
  done
  ( rc=0; run_target "$t" || rc=$?; echo "$rc" >"$BUILD/fuzz-logs/$t.rc" ) &
  pid_of[$t]=$!
  running+=("$t")
done

wait
total=0
for t in "${TARGETS[@]}"; do
  rc=$(cat "$BUILD/fuzz-logs/$t.rc" 2>/dev/null || echo 1)
  log=$BUILD/fuzz-logs/$t.log
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" 2>/dev/null | grep -o '[0-9]*$' | tail -1)
  execs=${execs:-0}
  total=$((total + execs))
  if [ "$rc" -ne 0 ]; then
    echo "FAIL $t: exit $rc after $execs executions (log $log, inputs in $CRASH_DIR)"
    grep -m3 -E 'ERROR: (AddressSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error' "$log" || true
    status=1
  else
    printf '%-14s %10s executions\n' "$t" "$execs"
  fi
done
end=$(date +%s)
echo "fuzz: $total executions in total; build $((built - start)) s, fuzzing $((end - built)) s"
exit $status
