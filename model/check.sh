#!/usr/bin/env bash
# check.sh -- verify the agorafs cluster-layer Promela models with Spin.
#
# For every check: spin -a generates the verifier, gcc builds pan, pan runs an
# exhaustive search (-DCOLLAPSE compresses states; no bitstate). "pass" checks must end
# with "errors: 0"; "fail" checks are mutations (a protocol rule removed, or the timing
# assumption broken) that must be caught, proving the checks are not vacuous.
# Exits non-zero on any unexpected result. Two checks run at a time (~1-2 min, <3 GB).
#
#   MODEL_JOBS=1 bash model/check.sh     # run serially
#   bash model/check.sh live_progress    # run only the named checks
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
JOBS="${MODEL_JOBS:-2}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/agorafs-model.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
command -v spin >/dev/null || { echo "check.sh: spin not found" >&2; exit 2; }
command -v gcc >/dev/null || { echo "check.sh: gcc not found" >&2; exit 2; }

SAFE="-DSAFETY -DCOLLAPSE"
LIVEC="-DCOLLAPSE -DNFAIR=3"
REC="-DNN=2 -DMAXE=1 -DL_T=2 -DD_T=3 -DB_T=1 -DMAXREQ=2"   # lapses, recovery, B = D-L
FO="-DNN=2 -DMAXE=2 -DL_T=1 -DD_T=2 -DB_T=0 -DMAXREQ=2"     # election, reclaim, deposed master

# name | expect | model | spin -D flags | gcc flags | pan flags
CHECKS=(
  "paxos_agreement|pass|paxos.pml|-DMAXE=1|$SAFE|-m1000000 -w25"
  "paxos_epochs_restart|pass|paxos.pml|-DN=2 -DMAXE=2 -DRESTART|$SAFE|-m1000000 -w22"
  "paxos_restart_fresh_own|fail|paxos.pml|-DN=2 -DMAXE=1 -DRESTART_FRESH -DCHOSEN|$SAFE|-m1000000 -w22"
  "cluster_recovery|pass|cluster.pml|$REC|$SAFE|-m1000000 -w25"
  "cluster_failover|pass|cluster.pml|$FO|$SAFE|-m1000000 -w25"
  "cluster_inflight_beyond_margin|fail|cluster.pml|${REC/-DB_T=1/-DB_T=2}|$SAFE|-m1000000 -w24"
  "cluster_release_before_blocks_home|fail|cluster.pml|$REC -DBUG_EARLY_RELEASE|$SAFE|-m1000000 -w24"
  "cluster_guard_clock_only|fail|cluster.pml|$REC -DBUG_LEASE_ONLY|$SAFE|-m1000000 -w24"
  "live_progress|pass|cluster.pml|-DLIVE -DNN=2 -DMAXE=2 -DL_T=3 -DD_T=4 -DB_T=1|$LIVEC|-a -f -m1000000 -w25"
  "live_cancel|pass|cluster.pml|-DLIVE -DLIVE_CANCEL -DNN=2 -DMAXE=1 -DMAXCRASH=0 -DL_T=2 -DD_T=3 -DB_T=0|$LIVEC|-a -f -m1000000 -w24"
  "live_cancel_drop_grant|fail|cluster.pml|-DLIVE -DLIVE_CANCEL -DBUG_DROP_GRANT -DNN=2 -DMAXE=1 -DMAXCRASH=0 -DL_T=2 -DD_T=3 -DB_T=0|$LIVEC|-a -f -m1000000 -w24"
)

run_one() {  # $1 = check line; writes $WORK/<name>.res
  IFS='|' read -r name expect model dflags cflags pflags <<<"$1"
  local d="$WORK/$name"; mkdir -p "$d"; cd "$d" || return
  local t0=$SECONDS verdict
  # shellcheck disable=SC2086
  if ! spin $dflags -a "$HERE/$model" >spin.log 2>&1; then
    echo "$name|ERROR|spin -a failed: $(tail -1 spin.log)" >"$WORK/$name.res"; return
  fi
  # shellcheck disable=SC2086
  if ! gcc -O2 -w $cflags -o pan pan.c >gcc.log 2>&1; then
    echo "$name|ERROR|gcc failed: $(tail -1 gcc.log)" >"$WORK/$name.res"; return
  fi
  # shellcheck disable=SC2086
  ./pan $pflags >pan.out 2>&1
  local errs states depth why
  errs=$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' pan.out | tail -1)
  states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' pan.out | tail -1)
  depth=$(sed -n 's/.*depth reached \([0-9]*\).*/\1/p' pan.out | tail -1)
  why=$(grep -m1 -E "assertion violated|acceptance cycle|invalid end state \\(|max search depth too small|out of memory" pan.out)
  [ "$expect" = pass ] && [ "${errs:-x}" = 0 ] && why=""
  if grep -qE "max search depth too small|out of memory|Search not completed" pan.out && [ "$expect" = pass ]; then
    verdict=ERROR; why="incomplete search: $why"
  elif [ -z "$errs" ]; then
    verdict=ERROR; why="no result from pan: $(tail -2 pan.out | tr '\n' ' ')"
  elif [ "$expect" = pass ] && [ "$errs" = 0 ]; then
    verdict=ok
  elif [ "$expect" = fail ] && [ "$errs" != 0 ]; then
    verdict=ok; why="caught as expected: $why"
  else
    verdict=FAILED
    [ -f ./*.trail ] && why="$why (trail: spin -t -p -k $d/$(basename "$model").trail $dflags $HERE/$model)"
    trap - EXIT   # keep the work dir for the trail
  fi
  echo "$name|$verdict|expect=$expect states=$states depth=$depth time=$((SECONDS - t0))s $why" >"$WORK/$name.res"
}

selected=()
for c in "${CHECKS[@]}"; do
  n="${c%%|*}"
  if [ $# -eq 0 ] || printf '%s\n' "$@" | grep -qx "$n"; then selected+=("$c"); fi
done
[ ${#selected[@]} -gt 0 ] || { echo "check.sh: no such check: $*" >&2; exit 2; }

running=0
for c in "${selected[@]}"; do
  run_one "$c" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait

rc=0
for c in "${selected[@]}"; do
  n="${c%%|*}"
  IFS='|' read -r name verdict info <"$WORK/$n.res" || { echo "$n: no result"; rc=1; continue; }
  printf '%-36s %-6s %s\n' "$name" "$verdict" "$info"
  [ "$verdict" = ok ] || rc=1
done
[ $rc -eq 0 ] && echo "all model checks passed" || echo "MODEL CHECK FAILURES" >&2
exit $rc
