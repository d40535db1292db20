// Disk Paxos (Gafni & Lamport), single disk: see paxos.h for the contract.
//
// Notes on the implementation
// - Propose is a small state machine: every Step() does at most one block-level I/O
//   (load own block, sync copies, write copy A, write copy B, read one other slot's
//   block), so a test can interleave several proposers step by step.
// - Our own block is never read back during a ballot: we are its only writer, and
//   own_ is what we last wrote (or are writing). own_ only moves forward: after a
//   failed write we keep the new state in memory, since the disk may hold it.
// - Copies. A write is: copy A, Flush, copy B, Flush. While A is being written B
//   holds the previous state, so a torn A reads as "the write did not happen yet".
//   That needs B == A whenever a write of A starts. After a crash between the two
//   copies (or a failed write) that may not hold, and a torn A would then expose a
//   state older than one readers already saw; so before the first write of a new
//   object, and after any failed write, we re-read both copies and copy a valid A
//   over B (SyncCopies).
// - Flush. Other nodes see a completed Write without it. We flush anyway, after each
//   copy: Disk Paxos assumes a completed write stays written, and the device's
//   volatile cache (power cut of the shared storage while the nodes live on, as
//   MemDevice::Crash models) could otherwise undo a phase-2 write that a decision was
//   based on and let a second value be chosen for the same epoch. Elections are rare,
//   so the cost is small. The flush between A and B also keeps the copies ordered on
//   stable storage. A crash of *our* process needs nothing of this: a write it left
//   in progress may or may not take effect, which Disk Paxos tolerates.
// - Reading a block: copy A if it verifies, else copy B. A read error on one copy
//   falls back to the other; read errors on both are returned as an error (treating
//   an unreadable block as initial could hide an accepted value and let two values
//   be chosen). Both copies read but neither valid: if one is all zero the block was
//   never completely written (initial state); if both are garbage we read again (a
//   torn read of a copy being written), and after a few rounds log and count it as
//   the initial state, as the contract says.
#include "cluster/paxos.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>

namespace agorafs {

namespace {

constexpr int kReadRounds = 3;
constexpr uint64_t kBackoffStartMs = 2;
constexpr uint64_t kBackoffCapMs = 200;

uint64_t SplitMix(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

DiskPaxos::DiskPaxos(BlockDevice* dev, const Geometry& g, const Uuid& uuid,
                     uint32_t my_slot, uint64_t my_generation)
    : dev_(dev), g_(g), uuid_(uuid), slot_(my_slot), gen_(my_generation) {
  assert(my_slot < g.node_slots && my_slot < kMaxNodeSlots);
  std::random_device rd;
  rng_state_ = (uint64_t(rd()) << 32) ^ rd() ^ (uint64_t(my_slot) << 20) ^ my_generation;
  // A restarted node continues from its block on disk: same accepted value, ballots
  // above its mbal. If the read fails now, Propose tries again before its first write.
  Status st = LoadOwn();
  if (!st.ok()) {
    spdlog::warn("paxos: slot {}: reading own block: {} (retried at Propose)", slot_,
                 st.ToString());
  }
}

DiskPaxos::Stats DiskPaxos::stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  return stats_;
}

void DiskPaxos::CountIo(bool write) {
  std::lock_guard<std::mutex> l(stats_mu_);
  if (write) {
    stats_.writes++;
  } else {
    stats_.reads++;
  }
}

Result<DiskPaxos::Block> DiskPaxos::ReadBlock(uint32_t slot) {
  AlignedBuffer buf(kBlockSize);
  if (!buf.valid()) return Err(Code::kNoMemory, "paxos: block buffer");
  Status last_err;
  for (int round = 0; round < kReadRounds; round++) {
    bool read_ok[2] = {false, false};
    bool zero = false;
    for (uint32_t copy = 0; copy < 2; copy++) {
      uint64_t blk = g_.SlotBlock(slot, kSlotPaxos + copy);
      CountIo(false);
      Status st = dev_->Read(blk * kBlockSize, buf.data(), kBlockSize);
      if (!st.ok()) {
        last_err = st;
        continue;
      }
      read_ok[copy] = true;
      if (VerifyBlock(buf.data(), BlockType::kPaxos, blk, uuid_).ok()) {
        const auto* p = reinterpret_cast<const PaxosBlock*>(buf.data());
        Block b;
        b.instance = p->instance;
        b.mbal = p->mbal;
        b.bal = p->bal;
        b.inp = MasterRecord{p->instance, p->inp_slot, p->inp_gen};
        b.decided = MasterRecord{p->decided_epoch, p->decided_slot, p->decided_gen};
        return b;
      }
      if (IsZeroBlock(buf.data())) zero = true;
    }
    if (!read_ok[0] && !read_ok[1]) return last_err;
    if (!read_ok[0] || !read_ok[1]) {
      // One copy unreadable, the other not valid: we cannot tell what the block holds.
      return Err(Code::kIOError, "paxos block of slot " + std::to_string(slot) +
                                     ": one copy unreadable (" + last_err.ToString() +
                                     "), the other invalid");
    }
    if (zero) return Block{};  // never completely written: initial state
    std::this_thread::yield();
  }
  spdlog::error("paxos: block of slot {} fails verification in both copies; counted as "
                "initial", slot);
  return Block{};
}

Status DiskPaxos::LoadOwn() {
  AGFS_ASSIGN_OR_RETURN(Block b, ReadBlock(slot_));
  own_ = b;
  max_seen_ = std::max(max_seen_, own_.mbal);
  loaded_ = true;
  synced_ = false;
  return Status::Ok();
}

Status DiskPaxos::SyncCopies() {
  AlignedBuffer a(kBlockSize), b(kBlockSize);
  if (!a.valid() || !b.valid()) return Err(Code::kNoMemory, "paxos: block buffer");
  uint64_t blk_a = g_.SlotBlock(slot_, kSlotPaxos);
  uint64_t blk_b = g_.SlotBlock(slot_, kSlotPaxos + 1);
  CountIo(false);
  AGFS_RETURN_IF_ERROR(dev_->Read(blk_a * kBlockSize, a.data(), kBlockSize));
  if (VerifyBlock(a.data(), BlockType::kPaxos, blk_a, uuid_).ok()) {
    CountIo(false);
    AGFS_RETURN_IF_ERROR(dev_->Read(blk_b * kBlockSize, b.data(), kBlockSize));
    // Identical payloads differ only in blocknr and checksum.
    if (std::memcmp(a.data() + sizeof(BlockHeader), b.data() + sizeof(BlockHeader),
                    kPayload) != 0 ||
        !VerifyBlock(b.data(), BlockType::kPaxos, blk_b, uuid_).ok()) {
      Header(a.data())->blocknr = blk_b;
      SealBlock(a.data());
      CountIo(true);
      AGFS_RETURN_IF_ERROR(dev_->Write(blk_b * kBlockSize, a.data(), kBlockSize));
      AGFS_RETURN_IF_ERROR(dev_->Flush());
    }
  }
  // A not valid: readers already fall back to B, which a write of A leaves alone.
  synced_ = true;
  return Status::Ok();
}

Status DiskPaxos::WriteOwnCopy(uint32_t copy) {
  AlignedBuffer buf(kBlockSize);
  if (!buf.valid()) return Err(Code::kNoMemory, "paxos: block buffer");
  uint64_t blk = g_.SlotBlock(slot_, kSlotPaxos + copy);
  InitHeader(buf.data(), BlockType::kPaxos, blk, uuid_);
  auto* p = reinterpret_cast<PaxosBlock*>(buf.data());
  p->generation = gen_;
  p->instance = own_.instance;
  p->mbal = own_.mbal;
  p->bal = own_.bal;
  p->inp_slot = own_.inp.slot;
  p->inp_gen = own_.inp.generation;
  p->decided_epoch = own_.decided.epoch;
  p->decided_slot = own_.decided.slot;
  p->decided_gen = own_.decided.generation;
  SealBlock(buf.data());
  CountIo(true);
  Status st = dev_->Write(blk * kBlockSize, buf.data(), kBlockSize);
  if (st.ok()) st = dev_->Flush();
  if (!st.ok()) synced_ = false;  // this copy may hold anything now
  return st;
}

void DiskPaxos::Begin(uint64_t epoch, const MasterRecord& value) {
  epoch_ = epoch;
  value_ = value;
  value_.epoch = epoch;
  stale_instance_ = 0;
  op_ = loaded_ ? Op::kStartBallot : Op::kLoad;
}

DiskPaxos::Outcome DiskPaxos::StartBallot() {
  if (own_.instance > epoch_) {
    stale_instance_ = own_.instance;
    op_ = Op::kDone;
    return Outcome::kStale;
  }
  if (own_.decided.epoch == epoch_) {  // we decided (or learnt) it before a restart
    op_ = Op::kDone;
    return Outcome::kDecided;
  }
  if (own_.instance < epoch_) {
    // Blocks of older instances count as initial for this one; decisions are kept.
    MasterRecord decided = own_.decided;
    own_ = Block{};
    own_.instance = epoch_;
    own_.decided = decided;
  }
  uint64_t floor = std::max(max_seen_, own_.mbal);
  round_ = std::max(round_ + 1, floor / kMaxNodeSlots + 1);
  own_.mbal = round_ * kMaxNodeSlots + slot_ + 1;  // > floor, unique to our slot
  stage_ = Stage::kPhase1;
  op_ = synced_ ? Op::kWriteA : Op::kSync;
  std::lock_guard<std::mutex> l(stats_mu_);
  stats_.ballots++;
  return Outcome::kContinue;
}

Result<DiskPaxos::Outcome> DiskPaxos::ReadStep() {
  if (read_slot_ == slot_) read_slot_++;
  if (read_slot_ < g_.node_slots) {
    uint32_t s = read_slot_++;
    AGFS_ASSIGN_OR_RETURN(Block b, ReadBlock(s));
    if (b.decided.epoch == epoch_) {
      // Somebody recorded the decision of this instance: adopt and record it.
      own_.decided = b.decided;
      stage_ = Stage::kCommit;
      op_ = synced_ ? Op::kWriteA : Op::kSync;
      return Outcome::kContinue;
    }
    if (b.instance > epoch_ || b.decided.epoch > epoch_) {
      stale_instance_ = std::max(b.instance, b.decided.epoch);
      op_ = Op::kDone;
      return Outcome::kStale;
    }
    if (b.instance == epoch_) {
      max_seen_ = std::max(max_seen_, b.mbal);
      if (b.mbal > own_.mbal) {
        op_ = Op::kStartBallot;
        std::lock_guard<std::mutex> l(stats_mu_);
        stats_.aborted++;
        return Outcome::kAborted;
      }
      if (b.bal > best_bal_) {
        best_bal_ = b.bal;
        best_inp_ = b.inp;
      }
    }
    if (read_slot_ == slot_) read_slot_++;
    if (read_slot_ < g_.node_slots) return Outcome::kContinue;
  }
  // Every block read, none with a higher ballot.
  if (stage_ == Stage::kPhase1) {
    own_.bal = own_.mbal;
    own_.inp = best_bal_ > 0 ? best_inp_ : value_;
    own_.inp.epoch = epoch_;
    stage_ = Stage::kPhase2;
  } else {
    own_.decided = own_.inp;  // chosen
    own_.decided.epoch = epoch_;
    stage_ = Stage::kCommit;
  }
  op_ = synced_ ? Op::kWriteA : Op::kSync;
  return Outcome::kContinue;
}

Result<DiskPaxos::Outcome> DiskPaxos::Step() {
  switch (op_) {
    case Op::kIdle:
    case Op::kDone:
      return Err(Code::kInvalid, "paxos: no Propose in progress");
    case Op::kLoad:
      AGFS_RETURN_IF_ERROR(LoadOwn());
      op_ = Op::kStartBallot;
      return Outcome::kContinue;
    case Op::kStartBallot:
      return StartBallot();
    case Op::kSync:
      AGFS_RETURN_IF_ERROR(SyncCopies());
      op_ = Op::kWriteA;
      return Outcome::kContinue;
    case Op::kWriteA:
      AGFS_RETURN_IF_ERROR(WriteOwnCopy(0));
      op_ = Op::kWriteB;
      return Outcome::kContinue;
    case Op::kWriteB:
      AGFS_RETURN_IF_ERROR(WriteOwnCopy(1));
      if (stage_ == Stage::kCommit) {
        op_ = Op::kDone;
        return Outcome::kDecided;
      }
      op_ = Op::kRead;
      read_slot_ = 0;
      best_bal_ = own_.bal;  // our own block is one of those read
      best_inp_ = own_.inp;
      return Outcome::kContinue;
    case Op::kRead:
      return ReadStep();
  }
  return Err(Code::kInvalid, "paxos: bad step");
}

Result<MasterRecord> DiskPaxos::Propose(uint64_t epoch, MasterRecord value,
                                        const std::function<bool()>& keep_going) {
  if (epoch == 0) return Err(Code::kInvalid, "paxos: epoch 0 is never proposed");
  Begin(epoch, value);
  uint64_t backoff_ms = kBackoffStartMs;
  for (;;) {
    if (!keep_going()) {
      op_ = Op::kIdle;
      return Err(Code::kTimedOut, "paxos: gave up on epoch " + std::to_string(epoch));
    }
    Result<Outcome> r = Step();
    if (!r.ok()) {
      op_ = Op::kIdle;
      return r.status();
    }
    switch (*r) {
      case Outcome::kContinue:
        break;
      case Outcome::kDecided:
        op_ = Op::kIdle;
        return own_.decided;
      case Outcome::kStale:
        op_ = Op::kIdle;
        return Err(Code::kStale, "paxos: stale: epoch " + std::to_string(epoch) +
                                     " is behind instance " +
                                     std::to_string(stale_instance_));
      case Outcome::kAborted: {
        // Back off (random, growing) until the other blocks stop changing: while
        // another proposer's ballot is moving, starting ours would only abort it.
        // A proposer that crashed mid-ballot leaves its block still, so we go on.
        std::optional<Snapshot> before;
        for (;;) {
          Result<Snapshot> snap = Scan();
          if (!snap.ok()) {
            op_ = Op::kIdle;
            return snap.status();
          }
          if (snap->decided) {  // adopt and record it, as in a ballot's read
            own_.decided = *snap->decided;
            stage_ = Stage::kCommit;
            op_ = synced_ ? Op::kWriteA : Op::kSync;
            break;
          }
          if (snap->newer_instance > 0) {
            op_ = Op::kIdle;
            return Err(Code::kStale, "paxos: stale: epoch " + std::to_string(epoch) +
                                         " is behind instance " +
                                         std::to_string(snap->newer_instance));
          }
          if (before && before->fp == snap->fp) break;  // nobody moved: our turn
          before = std::move(*snap);
          uint64_t ms = 1 + SplitMix(&rng_state_) % backoff_ms;
          backoff_ms = std::min(backoff_ms * 2, kBackoffCapMs);
          auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
          bool go = true;
          while (go && std::chrono::steady_clock::now() < until) {
            go = keep_going();
            auto left = until - std::chrono::steady_clock::now();
            if (go && left.count() > 0) {
              std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
                  left, std::chrono::milliseconds(10)));
            }
          }
          if (!go) break;  // reported at the top of the loop
        }
        break;
      }
    }
  }
}

Result<DiskPaxos::Snapshot> DiskPaxos::Scan() {
  Snapshot snap;
  for (uint32_t s = 0; s < g_.node_slots; s++) {
    if (s == slot_) continue;
    AGFS_ASSIGN_OR_RETURN(Block b, ReadBlock(s));
    if (b.decided.epoch == epoch_) {
      snap.decided = b.decided;
      return snap;
    }
    if (b.instance > epoch_ || b.decided.epoch > epoch_) {
      snap.newer_instance = std::max(b.instance, b.decided.epoch);
      return snap;
    }
    snap.fp.push_back(b.instance == epoch_ ? b.mbal : 0);
    snap.fp.push_back(b.instance == epoch_ ? b.bal : 0);
  }
  return snap;
}

Result<PaxosView> DiskPaxos::ReadDecided() {
  PaxosView view;
  for (uint32_t s = 0; s < g_.node_slots; s++) {
    AGFS_ASSIGN_OR_RETURN(Block b, ReadBlock(s));
    view.highest_instance = std::max({view.highest_instance, b.instance, b.decided.epoch});
    if (b.decided.epoch > view.decided.epoch) {
      view.decided = b.decided;
    } else if (b.decided.epoch != 0 && b.decided.epoch == view.decided.epoch &&
               !(b.decided == view.decided)) {
      spdlog::critical("paxos: epoch {} has two decisions: slot {} gen {} and slot {} gen {}",
                       b.decided.epoch, view.decided.slot, view.decided.generation,
                       b.decided.slot, b.decided.generation);
    }
  }
  return view;
}

}  // namespace agorafs
