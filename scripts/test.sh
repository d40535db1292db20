#!/usr/bin/env bash
# Sets everything up and runs every test: dependencies, release build + all tests,
# then the sanitizer builds. Exit status is non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir build --output-on-failure -j2 --timeout 900
