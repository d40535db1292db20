// FastTestMountOptions: MountOptions for tests and fuzzers that mount nodes in-process
// on a shared in-memory device. No background commit thread (tests commit when they
// mean to), and short cluster timings: heartbeat 50 ms, I/O timeout 200 ms, a silent
// node declared dead after 0.5 s, so recovering a crashed slot takes well under a
// second. The node's lease is then 450 ms, which a loaded machine can starve.
#pragma once

#include "fs/filesystem.h"

namespace agorafs {

inline MountOptions FastTestMountOptions() {
  MountOptions o;
  o.store.background = false;
  o.heartbeat_ms_override = 50;
  o.io_timeout_ms_override = 200;
  o.dead_after_ms_override = 500;
  return o;
}

}  // namespace agorafs
