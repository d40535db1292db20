// ClusterStatus: what `agorafs status` shows, read from the device alone while the
// filesystem is mounted anywhere. Writes nothing.
//
// Contract
// - Reads every slot's heartbeat block twice, `sample_ms` apart, so it sees by itself
//   which nodes beat; the lock master's published view (PeerViewBlock) gives each
//   used slot's state and heartbeat age as the master's observer measured them, and
//   is used when the master's heartbeat moved during the sample (the view is fresh).
//   Without a live master a slot that did not beat during the sample is reported dead
//   with `confirmed` false.
// - Verdicts in any heartbeat block mark (slot, generation) recovering, or fenced
//   when the node beat again after being recovered.
// - The master and its epoch come from the Disk Paxos blocks (newest decision); the
//   locks from the master's snapshot blocks (held, waiting, revoking, with ages) and
//   the per-node counts from the mail headers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "device/block_device.h"
#include "format/format.h"
#include "util/status.h"

namespace agorafs {

struct NodeLockInfo {
  uint64_t lock = 0;
  uint8_t mode = 0;  // LockMode
  uint8_t what = 0;  // SnapshotWhat
  uint32_t age_ms = 0;
};

struct NodeStatus {
  uint32_t slot = 0;
  std::string host, address;
  uint64_t generation = 0;
  uint64_t heartbeat_age_ms = 0;
  std::string state;       // alive | dead | fenced | recovering
  bool confirmed = true;   // false: judged from this command's short sample only
  bool master = false;
  uint64_t held = 0, waiting = 0;  // from the node's mail header
  std::vector<NodeLockInfo> locks;  // from the master's snapshot
};

struct ClusterStatus {
  std::string uuid, label, profile;
  uint32_t heartbeat_ms = 0, dead_after_ms = 0, node_slots = 0;
  uint64_t epoch = 0;
  uint32_t master_slot = kNoSlot;
  uint64_t master_generation = 0;
  bool master_view_fresh = false;
  uint64_t snapshot_total = 0;
  std::vector<NodeStatus> nodes;
  // Every entry of the master's snapshot by slot, including slots no longer mounted
  // (a node that left or died and is not yet forgotten still blocks its locks).
  std::vector<std::pair<uint32_t, NodeLockInfo>> all_locks;
};

Result<ClusterStatus> ReadClusterStatus(BlockDevice* dev, uint32_t sample_ms);

std::string StatusJson(const ClusterStatus& s);
std::string StatusText(const ClusterStatus& s);

}  // namespace agorafs
