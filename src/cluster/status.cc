// ClusterStatus: see status.h.
#include "cluster/status.h"

#include <fmt/format.h>

#include <chrono>
#include <cstring>
#include <map>
#include <thread>

#include "cluster/membership.h"
#include "fs/super.h"
#include "lock/lock_manager.h"
#include "util/json.h"

namespace agorafs {

namespace {

// Reads block `blk` of type `t`; false when it is all zero or fails verification.
template <typename T>
Result<bool> ReadTyped(BlockDevice* dev, uint64_t blk, BlockType t, const Uuid& uuid, T* out) {
  AlignedBuffer b(kBlockSize);
  AGFS_RETURN_IF_ERROR(dev->Read(blk * kBlockSize, b.data(), kBlockSize));
  if (IsZeroBlock(b.data()) || !VerifyBlock(b.data(), t, blk, uuid).ok()) return false;
  std::memcpy(out, b.data(), kBlockSize);
  return true;
}

std::string Str(const char* p, size_t n) { return std::string(p, strnlen(p, n)); }

const char* ModeName(uint8_t m) { return IsLockMode(m) ? LockModeName(LockMode(m)) : "?"; }
const char* WhatName(uint8_t w) {
  return w == kSnapWaiting ? "waiting" : w == kSnapRevoking ? "revoking" : "held";
}
std::string LockName(uint64_t id) {
  const char* kinds[] = {"?", "inode", "dirleaf", "ag", "slot", "super"};
  uint8_t k = uint8_t(id >> 56);
  return fmt::format("{} {}", k < 6 ? kinds[k] : "?", LockIdNumber(id));
}

}  // namespace

Result<ClusterStatus> ReadClusterStatus(BlockDevice* dev, uint32_t sample_ms) {
  auto sbr = ReadSuperblock(dev);
  if (!sbr.ok()) return sbr.status();
  const Superblock& sb = *sbr;
  Geometry g = GeometryOf(sb);
  Uuid uuid = SuperUuid(sb);
  ClusterStatus st;
  st.uuid = UuidString(uuid);
  st.label = Str(sb.label, sizeof(sb.label));
  st.profile = sb.timing_profile == kProfileFast ? "fast" : "default";
  st.heartbeat_ms = sb.heartbeat_interval_ms;
  st.dead_after_ms = sb.dead_after_ms;
  st.node_slots = g.node_slots;

  auto read_slots = [&](std::vector<SlotBlock>* out, std::vector<bool>* ok) -> Status {
    out->assign(g.node_slots, SlotBlock{});
    ok->assign(g.node_slots, false);
    for (uint32_t s = 0; s < g.node_slots; s++) {
      auto r = ReadTyped(dev, g.SlotBlock(s, kSlotHeartbeat), BlockType::kSlot, uuid, &(*out)[s]);
      if (!r.ok()) return r.status();
      (*ok)[s] = *r;
    }
    return Status::Ok();
  };
  std::vector<SlotBlock> first, second;
  std::vector<bool> ok1, ok2;
  AGFS_RETURN_IF_ERROR(read_slots(&first, &ok1));
  std::this_thread::sleep_for(std::chrono::milliseconds(sample_ms));
  AGFS_RETURN_IF_ERROR(read_slots(&second, &ok2));
  auto beat = [&](uint32_t s) {
    return ok1[s] && ok2[s] &&
           (first[s].counter != second[s].counter || first[s].generation != second[s].generation);
  };

  // The newest master decision in any Paxos block (copy A, else copy B).
  for (uint32_t s = 0; s < g.node_slots; s++) {
    PaxosBlock pb;
    auto r = ReadTyped(dev, g.SlotBlock(s, kSlotPaxos), BlockType::kPaxos, uuid, &pb);
    if (!r.ok()) return r.status();
    if (!*r) {
      r = ReadTyped(dev, g.SlotBlock(s, kSlotPaxos + 1), BlockType::kPaxos, uuid, &pb);
      if (!r.ok()) return r.status();
    }
    if (*r && pb.decided_epoch > st.epoch) {
      st.epoch = pb.decided_epoch;
      st.master_slot = pb.decided_slot;
      st.master_generation = pb.decided_gen;
    }
  }

  // The master's own view of every slot, if the master is alive.
  std::map<uint32_t, PeerViewEntry> view;
  bool master_live = st.master_slot < g.node_slots && beat(st.master_slot) &&
                     second[st.master_slot].generation == st.master_generation;
  if (master_live) {
    PeerViewBlock pv;
    auto r = ReadTyped(dev, g.SlotBlock(st.master_slot, kSlotPeerView), BlockType::kPeerView,
                       uuid, &pv);
    if (!r.ok()) return r.status();
    if (*r && pv.epoch == st.epoch) {
      st.master_view_fresh = true;
      for (uint32_t i = 0; i < pv.count && i < kPeerViewEntries; i++) view[pv.entries[i].slot] = pv.entries[i];
    }
  }

  // Verdicts anywhere.
  std::map<std::pair<uint32_t, uint64_t>, uint32_t> verdicts;
  for (uint32_t s = 0; s < g.node_slots; s++) {
    if (!ok2[s]) continue;
    for (uint32_t i = 0; i < second[s].verdict_count && i < kMaxVerdicts; i++) {
      const Verdict& v = second[s].verdicts[i];
      auto& cur = verdicts[{v.slot, v.generation}];
      cur = std::max(cur, v.state);
    }
  }

  // The master's lock snapshot.
  std::map<uint32_t, std::vector<NodeLockInfo>> locks;
  if (st.master_slot < g.node_slots) {
    for (uint32_t i = 0; i < kSlotSnapshotBlocks; i++) {
      LockSnapshotBlock lb;
      auto r = ReadTyped(dev, g.SlotBlock(st.master_slot, kSlotSnapshot + i),
                         BlockType::kLockSnapshot, uuid, &lb);
      if (!r.ok()) return r.status();
      if (!*r || lb.epoch != st.epoch) break;
      if (i == 0) st.snapshot_total = lb.total;
      for (uint32_t k = 0; k < lb.count && k < kSnapshotPerBlock; k++) {
        const SnapshotEntry& e = lb.entries[k];
        locks[e.slot].push_back(NodeLockInfo{e.lock, e.mode, e.what, e.age_ms});
        st.all_locks.push_back({e.slot, NodeLockInfo{e.lock, e.mode, e.what, e.age_ms}});
      }
      if (lb.count < kSnapshotPerBlock) break;
    }
  }

  for (uint32_t s = 0; s < g.node_slots; s++) {
    if (!ok2[s] || second[s].state == kSlotFree) continue;
    const SlotBlock& b = second[s];
    NodeStatus n;
    n.slot = s;
    n.host = Str(b.host, sizeof(b.host));
    n.address = Str(b.address, sizeof(b.address));
    n.generation = b.generation;
    n.master = s == st.master_slot && b.generation == st.master_generation;
    auto v = view.find(s);
    bool moved = beat(s);
    if (v != view.end() && v->second.generation == b.generation) {
      PeerState ps = PeerState(v->second.state);
      n.heartbeat_age_ms = v->second.heartbeat_age_ms;
      n.state = ps == PeerState::kRecovering ? "recovering"
                : ps == PeerState::kFenced   ? "fenced"
                : (ps == PeerState::kDead || ps == PeerState::kRecovered) ? "dead"
                                                                          : "alive";
    } else if (s == st.master_slot && moved) {
      n.state = "alive";
      n.heartbeat_age_ms = 0;
    } else {
      n.state = moved ? "alive" : "dead";
      n.confirmed = moved;
      n.heartbeat_age_ms = moved ? 0 : sample_ms;
    }
    auto vd = verdicts.find({s, b.generation});
    if (vd != verdicts.end()) {
      if (vd->second == kVerdictRecovering) n.state = "recovering";
      if (vd->second == kVerdictRecovered) n.state = moved ? "fenced" : "dead";
      n.confirmed = true;
    }
    MailHeader mh;
    auto r = ReadTyped(dev, g.SlotBlock(s, kSlotMailbox), BlockType::kMailHeader, uuid, &mh);
    if (!r.ok()) return r.status();
    if (*r && mh.generation == b.generation) {
      n.held = mh.held;
      n.waiting = mh.waiting;
    }
    if (n.master) {
      n.held = 0;
      n.waiting = 0;
      for (auto& l : locks[s]) (l.what == kSnapWaiting ? n.waiting : n.held)++;
    }
    n.locks = locks[s];
    st.nodes.push_back(std::move(n));
  }
  return st;
}

std::string StatusJson(const ClusterStatus& s) {
  std::string o = fmt::format(
      R"({{"uuid":"{}","label":"{}","profile":"{}","heartbeat_ms":{},"dead_after_ms":{},"node_slots":{},)",
      s.uuid, JsonEscape(s.label), s.profile, s.heartbeat_ms, s.dead_after_ms, s.node_slots);
  if (s.master_slot == kNoSlot) {
    o += R"("master":null,)";
  } else {
    o += fmt::format(R"("master":{{"slot":{},"generation":{},"epoch":{}}},)", s.master_slot,
                     s.master_generation, s.epoch);
  }
  o += fmt::format(R"("epoch":{},"master_view_fresh":{},"nodes":[)", s.epoch, s.master_view_fresh);
  for (size_t i = 0; i < s.nodes.size(); i++) {
    const NodeStatus& n = s.nodes[i];
    if (i) o += ",";
    o += fmt::format(
        R"({{"slot":{},"host":"{}","generation":{},"heartbeat_age_ms":{},"state":"{}","confirmed":{},"address":"{}","master":{},"held":{},"waiting":{},"locks":[)",
        n.slot, JsonEscape(n.host), n.generation, n.heartbeat_age_ms, n.state, n.confirmed,
        JsonEscape(n.address), n.master, n.held, n.waiting);
    for (size_t k = 0; k < n.locks.size(); k++) {
      const NodeLockInfo& l = n.locks[k];
      if (k) o += ",";
      o += fmt::format(R"({{"lock":"{:#x}","name":"{}","mode":"{}","state":"{}","age_ms":{}}})",
                       l.lock, LockName(l.lock), ModeName(l.mode), WhatName(l.what), l.age_ms);
    }
    o += "]}";
  }
  o += "],\"other_locks\":[";
  bool first = true;
  for (auto& [slot, l] : s.all_locks) {
    bool listed = false;
    for (const NodeStatus& n : s.nodes) listed |= n.slot == slot;
    if (listed) continue;
    o += fmt::format(R"({}{{"slot":{},"lock":"{:#x}","name":"{}","mode":"{}","state":"{}","age_ms":{}}})",
                     first ? "" : ",", slot, l.lock, LockName(l.lock), ModeName(l.mode),
                     WhatName(l.what), l.age_ms);
    first = false;
  }
  o += "]}";
  return o;
}

std::string StatusText(const ClusterStatus& s) {
  std::string o = fmt::format("cluster {}  profile {} (heartbeat {} ms, dead after {} ms)\n",
                              s.uuid, s.profile, s.heartbeat_ms, s.dead_after_ms);
  if (s.master_slot == kNoSlot) {
    o += "lock master: none elected\n";
  } else {
    o += fmt::format("lock master: slot {} (generation {}), epoch {}{}\n", s.master_slot,
                     s.master_generation, s.epoch, s.master_view_fresh ? "" : " (not beating)");
  }
  o += fmt::format("{:<5} {:<20} {:>10} {:<11} {:>12} {:>7} {:>7}  {}\n", "SLOT", "HOST", "GEN",
                   "STATE", "HEARTBEAT", "HELD", "WAITING", "ADDRESS");
  for (const NodeStatus& n : s.nodes) {
    std::string state = n.state + (n.confirmed ? "" : "?") + (n.master ? "*" : "");
    o += fmt::format("{:<5} {:<20} {:>10} {:<11} {:>9} ms {:>7} {:>7}  {}\n", n.slot, n.host,
                     n.generation, state, n.heartbeat_age_ms, n.held, n.waiting,
                     n.address.empty() ? "-" : n.address);
  }
  // Waits, with who holds what they wait for: how a hang is traced to its cause.
  std::map<uint64_t, std::vector<std::pair<uint32_t, NodeLockInfo>>> by_lock;
  for (auto& [slot, l] : s.all_locks) by_lock[l.lock].push_back({slot, l});
  bool header = false;
  for (auto& [id, entries] : by_lock) {
    for (auto& [slot, l] : entries) {
      if (l.what != kSnapWaiting) continue;
      if (!header) {
        o += "waits:\n";
        header = true;
      }
      std::string holders;
      for (auto& [hs, hl] : entries) {
        if (hl.what == kSnapWaiting) continue;
        holders += fmt::format("{}slot {} {} ({}, {} ms)", holders.empty() ? "" : ", ", hs,
                               ModeName(hl.mode), WhatName(hl.what), hl.age_ms);
      }
      o += fmt::format("  slot {} waits {} ms for {} {} held by {}\n", slot, l.age_ms,
                       ModeName(l.mode), LockName(id), holders.empty() ? "nobody" : holders);
    }
  }
  if (!header) o += "waits: none\n";
  if (!s.master_view_fresh) {
    o += "(no live lock master: states marked ? come from a short sample of this command)\n";
  }
  return o;
}

}  // namespace agorafs
