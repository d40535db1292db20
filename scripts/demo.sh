#!/usr/bin/env bash
# The main job: set everything up, make an image file, mkfs, mount it on three nodes
# at once (three daemons, three mount points), show a file written on one appear on
# the other two, show the cluster, unmount cleanly, check. Leaves nothing mounted.
# On real machines each node runs `agorafs mount` on its own host against the shared
# disk (a multi-attach LUN, or an NBD export); here the three nodes share one image.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh >/dev/null
BIN=$PWD/build/agorafs
WORK=${AGORAFS_DEMO_DIR:-$PWD/build/demo}
IMG=$WORK/disk.img
NODES=(node1 node2 node3)
for n in "${NODES[@]}"; do
  mkdir -p "$WORK/$n"
  mountpoint -q "$WORK/$n" && umount "$WORK/$n"
done
rm -f "$IMG"
cleanup() {
  for n in "${NODES[@]}"; do mountpoint -q "$WORK/$n" && umount "$WORK/$n" || true; done
}
trap cleanup EXIT
wait_daemons_gone() {
  while pgrep -f "agorafs mount $IMG" >/dev/null; do sleep 0.1; done
}

echo "== agorafs mkfs (1 GiB image file, fast failure detection)"
"$BIN" mkfs --size 1G --label demo --profile fast "$IMG"

echo "== agorafs mount on three nodes"
for n in "${NODES[@]}"; do
  "$BIN" mount "$IMG" "$WORK/$n"
  mountpoint -q "$WORK/$n"
done

echo "== node1 writes; node2 and node3 see it at once"
mkdir -p "$WORK/node1/projects/agorafs"
echo "hello from node1" > "$WORK/node1/projects/agorafs/hello.txt"
head -c 32M /dev/urandom > "$WORK/node1/projects/random.bin"
sum1=$(sha256sum < "$WORK/node1/projects/random.bin")
for n in node2 node3; do
  echo "$n reads: $(cat "$WORK/$n/projects/agorafs/hello.txt")"
  [ "$(sha256sum < "$WORK/$n/projects/random.bin")" = "$sum1" ] &&
    echo "$n reads the same 32 MiB file: ${sum1%% *}"
done

echo "== node3 renames and appends; node1 and node2 see it"
mv "$WORK/node3/projects/agorafs/hello.txt" "$WORK/node3/projects/agorafs/greeting.txt"
echo "and hello from node3" >> "$WORK/node3/projects/agorafs/greeting.txt"
for n in node1 node2; do
  echo "--- $n: ls projects/agorafs; cat greeting.txt"
  ls "$WORK/$n/projects/agorafs"
  cat "$WORK/$n/projects/agorafs/greeting.txt"
done
df -h "$WORK/node2"

echo "== agorafs status (the cluster as the disk shows it)"
"$BIN" status "$IMG"

echo "== unmount node2; node1 and node3 go on"
umount "$WORK/node2"
echo "written on node3 after node2 left" > "$WORK/node3/projects/after.txt"
cat "$WORK/node1/projects/after.txt"

echo "== unmount the others"
umount "$WORK/node1"
umount "$WORK/node3"
wait_daemons_gone

echo "== agorafs info"
"$BIN" info "$IMG"
echo "== agorafs fsck"
"$BIN" fsck "$IMG"
