// TestMetaTxn: a MetaTxn over a plain in-memory block map, for unit tests of code
// that sits on top of MetaTxn (directories, extents, xattrs) without a journal.
// It enforces the same rules the real cache does: reads verify headers and
// checksums (blocks are sealed when written back to the map at Commit()), freed
// blocks are not reused until Commit(), and locks are recorded per block so tests
// can check that every block has exactly one covering lock.
// Thread-safety: none; one test thread.
#pragma once

#include <map>
#include <set>
#include <vector>

#include "cache/meta_txn.h"

namespace agorafs {

class TestMetaTxn : public MetaTxn {
 public:
  // Blocks [first, first+count) are allocatable.
  TestMetaTxn(uint64_t first, uint64_t count) : first_(first), count_(count) {
    for (size_t i = 0; i < uuid_.size(); i++) uuid_[i] = uint8_t(0xA0 + i);
  }

  bool read_only() const override { return false; }
  const Uuid& uuid() const override { return uuid_; }

  Result<const uint8_t*> Read(uint64_t blk, BlockType type, LockId lock) override {
    auto r = Write(blk, type, lock);
    if (!r.ok()) return r.status();
    return static_cast<const uint8_t*>(*r);
  }
  Result<uint8_t*> Write(uint64_t blk, BlockType type, LockId lock) override {
    auto it = blocks_.find(blk);
    if (it == blocks_.end()) return Err(Code::kCorruption, "block not present");
    if (sealed_.count(blk)) {
      AGFS_RETURN_IF_ERROR(VerifyBlock(it->second.data(), type, blk, uuid_));
      sealed_.erase(blk);
    } else if (Header(it->second.data())->type != uint16_t(type)) {
      return Err(Code::kCorruption, "wrong type");
    }
    locks_[blk] = lock;
    return it->second.data();
  }
  Result<std::pair<uint64_t, uint8_t*>> NewBlock(BlockType type, LockId lock,
                                                 uint64_t hint) override {
    auto a = AllocData(hint, 1);
    if (!a.ok()) return a.status();
    auto& b = blocks_[a->start];
    b.assign(kBlockSize, 0);
    InitHeader(b.data(), type, a->start, uuid_);
    locks_[a->start] = ResolveLock(lock, a->start);
    return std::make_pair(a->start, b.data());
  }
  Result<Allocation> AllocData(uint64_t hint, uint32_t want) override {
    if (hint < first_ || hint >= first_ + count_) hint = first_;
    for (uint64_t i = 0; i < count_; i++) {
      uint64_t b = first_ + (hint - first_ + i) % count_;
      if (used_.count(b) || pending_free_.count(b)) continue;
      Allocation a{b, 0};
      while (a.len < want && b + a.len < first_ + count_ && !used_.count(b + a.len) &&
             !pending_free_.count(b + a.len)) {
        used_.insert(b + a.len);
        a.len++;
      }
      return a;
    }
    return Err(Code::kNoSpace, "test store full");
  }
  Status Free(uint64_t blk, uint64_t count) override {
    for (uint64_t b = blk; b < blk + count; b++) {
      if (!used_.erase(b)) return Err(Code::kCorruption, "double free");
      pending_free_.insert(b);
      blocks_.erase(b);
      sealed_.erase(b);
      locks_.erase(b);
    }
    return Status::Ok();
  }

  // Seals every block (as a commit would) and makes freed blocks reusable.
  void Commit() {
    for (auto& [blk, b] : blocks_) {
      SealBlock(b.data());
      sealed_.insert(blk);
    }
    pending_free_.clear();
  }
  size_t used_blocks() const { return used_.size(); }
  const std::map<uint64_t, LockId>& locks() const { return locks_; }
  std::map<uint64_t, std::vector<uint8_t>>& blocks() { return blocks_; }

 private:
  Uuid uuid_{};
  uint64_t first_, count_;
  std::set<uint64_t> used_, pending_free_, sealed_;
  std::map<uint64_t, std::vector<uint8_t>> blocks_;
  std::map<uint64_t, LockId> locks_;
};

}  // namespace agorafs
