// DiskPaxos: agreement on "who is the lock master of epoch e" using only reads and
// writes of the shared disk (Gafni & Lamport, "Disk Paxos", single disk).
//
// Contract
// - Every slot s owns one PaxosBlock (two copies, slot blocks kSlotPaxos and
//   kSlotPaxos+1, written A then B, each write completed before the next step). A
//   reader takes copy A if it verifies, else copy B; a block that is all zero, from
//   another instance (`instance` < e), or unreadable in both copies (logged) counts as
//   the initial state (mbal = bal = 0) for instance e. Only the slot's owner writes it.
// - Propose(e, v) runs ballots for instance e until a value is chosen and returns it:
//     phase 1: mbal = a fresh ballot (round * kMaxNodeSlots + slot + 1, above every
//       mbal seen); write own block (instance e, mbal); read every slot's block; if
//       any block for instance e has mbal > ours, or any block has instance > e, the
//       ballot lost: back off (random, growing) and retry. Otherwise v' = the inp of
//       the block with the highest bal among those for instance e, or v if none.
//     phase 2: write own block (bal = mbal, inp = v'); read every block; same abort
//       rule; otherwise v' is chosen.
//     Then write own block with decided_epoch = e, decided = v' and return it.
//   A block with instance > e means e was already decided and the caller is behind:
//   Propose returns kStale and the caller reads ReadDecided().
// - The decision of instance e is stable: every Propose(e, *) that returns OK returns
//   the same value, whatever crashes, pauses or interleavings happen, as long as each
//   read returns a value some write actually wrote (or the initial one).
// - ReadDecided() returns the decision with the highest epoch recorded in any block
//   (epoch 0, slot kNoSlot when none yet), plus whether an instance above it has
//   started (so a caller can finish it).
// - Every write goes through the device given (the Membership's GuardedDevice), so a
//   fenced node cannot take part.
//
// Thread-safety: one Propose at a time per object; ReadDecided from any thread.
#pragma once

#include <cstdint>
#include <functional>

#include "device/block_device.h"
#include "format/format.h"
#include "util/status.h"

namespace agorafs {

struct MasterRecord {
  uint64_t epoch = 0;
  uint32_t slot = kNoSlot;
  uint64_t generation = 0;
  bool operator==(const MasterRecord&) const = default;
};

struct PaxosView {
  MasterRecord decided;          // highest decision known in any block
  uint64_t highest_instance = 0; // highest instance any block works on
};

class DiskPaxos {
 public:
  struct Stats {
    uint64_t ballots = 0;
    uint64_t aborted = 0;
    uint64_t reads = 0;
    uint64_t writes = 0;
  };
  DiskPaxos(BlockDevice* dev, const Geometry& g, const Uuid& uuid, uint32_t my_slot,
            uint64_t my_generation);

  // `keep_going` is polled between steps; returning false makes Propose return
  // kTimedOut (e.g. the node was fenced or is shutting down).
  Result<MasterRecord> Propose(uint64_t epoch, MasterRecord value,
                               const std::function<bool()>& keep_going);
  Result<PaxosView> ReadDecided();
  Stats stats() const { return stats_; }

 private:
  struct Block {
    uint64_t instance = 0, mbal = 0, bal = 0;
    MasterRecord inp, decided;
  };
  Result<Block> ReadBlock(uint32_t slot);
  Status WriteOwn(const Block& b);

  BlockDevice* dev_;
  Geometry g_;
  Uuid uuid_;
  uint32_t slot_;
  uint64_t gen_;
  Block own_;
  Stats stats_;
};

}  // namespace agorafs
