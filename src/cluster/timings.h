// ClusterTimings: the cluster-wide time constants, stored in the superblock at mkfs,
// and the arithmetic that derives every other timeout from them.
//
// Contract
// - heartbeat_ms H: a node rewrites its heartbeat block every H.
// - io_timeout_ms N: an I/O slower than N counts as a stall. An observer whose own
//   scan of the heartbeats took longer than N, or that could not scan for H + N,
//   restarts all its liveness clocks: it cannot vouch for what it did not see, so a
//   storage-wide stall never makes anyone declare anyone dead.
// - dead_after_ms D: an observer declares a slot dead when its counter has not changed
//   for D of the observer's own healthy observation time.
// - LeaseMs() = D - max(H, D/10): a node may write only until LeaseMs() after it
//   *issued* its last heartbeat write that completed. The write landed no earlier than
//   its issue, and observers start counting no earlier than its landing, so nobody can
//   declare the node dead before the node has stopped writing.
// - JoinWaitMs() J: a joiner writes its claim, waits J, re-reads. A joiner aborts its
//   own attempt if its read, the gap from read to write, or its write took longer than
//   J/4, so a competitor's claim write always lands within 3J/4 of the read that saw
//   the slot free, i.e. before the first joiner's re-read.
// - poll_ms: how often a node reads the message rings it waits on when the network
//   channel is off or silent (not in the superblock: a mount option).
//
// Thread-safety: plain data.
#pragma once

#include <algorithm>
#include <cstdint>

#include "format/format.h"

namespace agorafs {

struct ClusterTimings {
  uint32_t heartbeat_ms = 2000;
  uint32_t io_timeout_ms = 10000;
  uint32_t dead_after_ms = 60000;
  uint32_t poll_ms = 5;

  static ClusterTimings FromSuper(const Superblock& sb) {
    ClusterTimings t;
    t.heartbeat_ms = sb.heartbeat_interval_ms;
    t.io_timeout_ms = sb.io_timeout_ms;
    t.dead_after_ms = sb.dead_after_ms;
    return t;
  }
  uint64_t LeaseMs() const {
    return dead_after_ms - std::max<uint64_t>(heartbeat_ms, dead_after_ms / 10);
  }
  uint64_t JoinWaitMs() const { return std::clamp<uint64_t>(io_timeout_ms / 4, 200, 2000); }
};

}  // namespace agorafs
