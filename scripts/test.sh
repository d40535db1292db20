#!/usr/bin/env bash
# Sets everything up and runs every test: dependencies, release build + all tests,
# then the sanitizer builds. Exit status is non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir build --output-on-failure -j2 --timeout 900

# AddressSanitizer + UndefinedBehaviorSanitizer: every unit test, and the mount tests
# (POSIX behaviour, bad input, three-node mounts and application locks on one image file).
# The long crash, fsx and cluster-process loops, and the multi-node cases through nbdkit,
# run in the release build above (the NBD device itself is unit-tested here).
echo "== ASan + UBSan"
BUILD_DIR=build-asan scripts/build.sh -DAGORAFS_SANITIZE=address
# Crash-point replay checks 300 images here (2,000 in the release run above).
AGORAFS_CRASHPOINT_IMAGES=300 \
  ctest --test-dir build-asan --output-on-failure -j2 --timeout 1800 -LE "slow|model" \
  -E "^(it_crash|it_fsx|it_cluster|it_nbd|it_multinode_nbd|it_applocks_nbd)$"

# ThreadSanitizer: the cluster layer (membership, Disk Paxos, network channel, lock
# service), the journal, the metadata cache, and the filesystem core with two nodes
# and several threads in one process. Not the single-threaded Disk Paxos schedule
# simulation (DiskPaxosSimTest), which has no threads for TSan to check.
echo "== TSan"
TSAN_TESTS=(membership_test paxos_test net_channel_test lock_service_test journal_test
            meta_store_test fs_test)
cmake -S . -B build-tsan -G Ninja -DAGORAFS_SANITIZE=thread >/dev/null
ninja -C build-tsan "${TSAN_TESTS[@]}"
ctest --test-dir build-tsan --output-on-failure -j2 --timeout 900 \
  -R "^(Membership|Paxos|DiskPaxos|NetChannel|LockService|Journal|MetaStore|FsTest)[A-Za-z]*\." \
  -E "^DiskPaxosSimTest\."

# libFuzzer (clang, ASan + UBSan): every on-disk decoder, the journal replayer and
# fsck, 45 s per target, two at a time, after replaying fuzz/regressions/ (longer runs:
# scripts/fuzz.sh SECONDS, see the README).
echo "== libFuzzer"
scripts/fuzz.sh 45
