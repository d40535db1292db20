// MetaTxn: the handle through which filesystem code reads and changes metadata blocks.
//
// Every metadata change happens inside a MetaTxn obtained from the transaction
// manager (src/cache/txn_manager.h). The handle pins every block it touches in the
// buffer cache until it ends, so pointers it returns stay valid for the handle's life.
//
// Contract
// - Read(blk, type, lock): returns the block verified by VerifyBlock (magic, type,
//   checksum, blocknr, uuid); kCorruption or kIOError otherwise. `lock` names the lock
//   that covers the block (format.h LockKind); the cache records it so that releasing
//   that lock can write the block home and drop it.
// - Write(...): like Read, and marks the block dirty in the running transaction; the
//   caller then changes the payload in place. The checksum is computed at commit,
//   so callers never call SealBlock on cache blocks.
// - NewBlock(type, lock, hint): allocates a metadata block (in hint's allocation
//   group when it can), gives it a fresh header and a zeroed payload, dirty. A lock
//   whose number is 0 (SelfLock(kind)) means "the lock of that kind named by the new
//   block's own number": new inodes and new directory leaves are their own locks.
// - AllocData(hint, want): allocates 1..want contiguous blocks for file data; the
//   blocks are not in the cache and are not zeroed.
// - Free(blk, n): returns blocks to their allocation group. They are not reused until
//   the transaction that freed them is checkpointed (so replaying an older
//   transaction can never overwrite a reused block), and any cached copy is dropped.
// - A read-only handle (read_only() true) fails Write/NewBlock/AllocData/Free with
//   kReadOnly.
// - Thread-safety: a handle belongs to one thread at a time. Callers serialise access
//   to any one inode's blocks themselves (the filesystem core holds its own mutex).
#pragma once

#include <cstdint>
#include <utility>

#include "format/format.h"
#include "util/status.h"

namespace agorafs {

struct Allocation {
  uint64_t start = 0;
  uint32_t len = 0;
};

class MetaTxn {
 public:
  virtual ~MetaTxn() = default;

  virtual bool read_only() const = 0;
  virtual const Uuid& uuid() const = 0;

  virtual Result<const uint8_t*> Read(uint64_t blk, BlockType type, LockId lock) = 0;
  virtual Result<uint8_t*> Write(uint64_t blk, BlockType type, LockId lock) = 0;
  virtual Result<std::pair<uint64_t, uint8_t*>> NewBlock(BlockType type, LockId lock,
                                                         uint64_t hint) = 0;
  virtual Result<Allocation> AllocData(uint64_t hint, uint32_t want) = 0;
  virtual Status Free(uint64_t blk, uint64_t count) = 0;

  template <typename T>
  Result<const T*> ReadAs(uint64_t blk, BlockType type, LockId lock) {
    auto r = Read(blk, type, lock);
    if (!r.ok()) return r.status();
    return reinterpret_cast<const T*>(*r);
  }
  template <typename T>
  Result<T*> WriteAs(uint64_t blk, BlockType type, LockId lock) {
    auto r = Write(blk, type, lock);
    if (!r.ok()) return r.status();
    return reinterpret_cast<T*>(*r);
  }
};

inline LockId SelfLock(LockKind k) { return MakeLockId(k, 0); }
inline LockId ResolveLock(LockId lock, uint64_t blk) {
  return LockIdNumber(lock) == 0 ? MakeLockId(LockIdKind(lock), blk) : lock;
}
inline LockId InodeLock(uint64_t ino) { return MakeLockId(LockKind::kInode, ino); }
inline LockId LeafLock(uint64_t blk) { return MakeLockId(LockKind::kDirLeaf, blk); }
inline LockId AgLock(uint32_t ag) { return MakeLockId(LockKind::kAg, ag); }

}  // namespace agorafs
