// DiskPaxos: agreement on "who is the lock master of epoch e" using only reads and
// writes of the shared disk (Gafni & Lamport, "Disk Paxos", single disk).
//
// Contract
// - Every slot s owns one PaxosBlock (two copies, slot blocks kSlotPaxos and
//   kSlotPaxos+1, written A then B, each write completed before the next step). A
//   reader takes copy A if it verifies, else copy B; a block that is all zero or from
//   another instance (`instance` < e) counts as the initial state (mbal = bal = 0) for
//   instance e; copies that read but do not verify are re-read a few times (a read can
//   catch a copy mid-write), then logged and counted as initial. A read *error* on both
//   copies is returned as an error, never taken as initial: that could hide an
//   accepted value. Only the slot's owner writes it; before its first write of an
//   instance the owner reloads its block from disk, so a restarted node keeps what it
//   accepted and ballots above its old mbal (the Spin model found the gap otherwise).
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
#include <mutex>
#include <optional>
#include <vector>

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
  Stats stats() const;

 private:
  friend class DiskPaxosTestPeer;  // paxos_test.cc drives Propose one step at a time

  struct Block {
    uint64_t instance = 0, mbal = 0, bal = 0;
    MasterRecord inp, decided;
  };
  // What one Step() ended with. kAborted: the ballot lost; the next Step() starts a
  // new one (Propose backs off first).
  enum class Outcome { kContinue, kDecided, kAborted, kStale };
  // The next step of the Propose in progress. Every step but kStartBallot does I/O.
  enum class Op { kIdle, kLoad, kStartBallot, kSync, kWriteA, kWriteB, kRead, kDone };
  enum class Stage { kPhase1, kPhase2, kCommit };

  Result<Block> ReadBlock(uint32_t slot);
  Status LoadOwn();
  Status SyncCopies();                // copy A over B when they may differ
  Status WriteOwnCopy(uint32_t copy); // own_ to copy 0 (A) or 1 (B), then Flush
  void Begin(uint64_t epoch, const MasterRecord& value);
  Result<Outcome> Step();
  Outcome StartBallot();
  Result<Outcome> ReadStep();
  // Read-only look at the other blocks while backing off after a lost ballot: a
  // decision or a newer instance ends the wait; `fp` (the instance-e ballot state of
  // every block) tells whether somebody is still making progress.
  struct Snapshot {
    std::vector<uint64_t> fp;
    std::optional<MasterRecord> decided;
    uint64_t newer_instance = 0;
  };
  Result<Snapshot> Scan();
  void CountIo(bool write);

  BlockDevice* dev_;
  Geometry g_;
  Uuid uuid_;
  uint32_t slot_;
  uint64_t gen_;
  Block own_;             // our block as last written (or being written)
  bool loaded_ = false;   // own_ holds what the disk has
  bool synced_ = false;   // copies A and B of our block are known to be equal
  uint64_t round_ = 0;    // our ballots are round_ * kMaxNodeSlots + slot_ + 1
  uint64_t max_seen_ = 0; // highest mbal seen in any block
  // The Propose in progress.
  uint64_t epoch_ = 0;
  MasterRecord value_;
  Op op_ = Op::kIdle;
  Stage stage_ = Stage::kPhase1;
  uint32_t read_slot_ = 0;
  uint64_t best_bal_ = 0;
  MasterRecord best_inp_;
  uint64_t stale_instance_ = 0;
  uint64_t rng_state_ = 0;  // backoff jitter
  mutable std::mutex stats_mu_;
  Stats stats_;
};

}  // namespace agorafs
