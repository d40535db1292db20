#!/usr/bin/env bash
# The main job: set everything up, make an image file, mkfs, mount, write and read
# files, show `agorafs info`, unmount. Leaves nothing mounted.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh >/dev/null
BIN=$PWD/build/agorafs
WORK=${AGORAFS_DEMO_DIR:-$PWD/build/demo}
mkdir -p "$WORK/mnt"
IMG=$WORK/disk.img
MNT=$WORK/mnt
mountpoint -q "$MNT" && umount "$MNT"
rm -f "$IMG"
cleanup() { mountpoint -q "$MNT" && umount "$MNT" || true; }
trap cleanup EXIT

echo "== agorafs mkfs (1 GiB image file)"
"$BIN" mkfs --size 1G --label demo "$IMG"
echo "== agorafs mount"
"$BIN" mount "$IMG" "$MNT"
echo "== write and read files"
mkdir -p "$MNT/projects/agorafs"
echo "hello from agorafs" > "$MNT/projects/agorafs/hello.txt"
head -c 64M /dev/urandom > "$MNT/projects/random.bin"
sum1=$(sha256sum < "$MNT/projects/random.bin")
ln -s agorafs/hello.txt "$MNT/projects/link"
cat "$MNT/projects/link"
ls -la "$MNT/projects"
df -h "$MNT"
echo "== unmount, remount, verify"
umount "$MNT"
while pgrep -f "agorafs mount $IMG" >/dev/null; do sleep 0.1; done
"$BIN" mount "$IMG" "$MNT"
sum2=$(sha256sum < "$MNT/projects/random.bin")
[ "$sum1" = "$sum2" ] && echo "64 MiB file intact after remount: $sum2"
umount "$MNT"
while pgrep -f "agorafs mount $IMG" >/dev/null; do sleep 0.1; done
echo "== agorafs info"
"$BIN" info "$IMG"
echo "== agorafs fsck"
"$BIN" fsck "$IMG"
