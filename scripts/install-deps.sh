#!/usr/bin/env bash
# Installs every build, test and benchmark dependency of agorafs from Debian 12 packages.
# Idempotent; needs root. Skips apt entirely when everything is already installed.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build pkg-config git clang libclang-rt-14-dev
  libfuse3-dev fuse3 liburing-dev libxxhash-dev libcli11-dev libfmt-dev libspdlog-dev
  libgtest-dev libgmock-dev libbenchmark-dev libnbd-dev libsodium-dev
  fio nbdkit spin e2fsprogs attr acl util-linux iproute2 procps python3 xxd
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# FUSE needs its device node; containers sometimes lack it.
if [ ! -e /dev/fuse ]; then mknod -m 0666 /dev/fuse c 10 229 || true; fi
