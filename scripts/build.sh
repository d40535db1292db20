#!/usr/bin/env bash
# Configures and builds agorafs into build/ (or $BUILD_DIR) with CMake + Ninja.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja "$@" >/dev/null
ninja -C "$BUILD_DIR"
