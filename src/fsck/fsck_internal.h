// Pieces of fsck shared by its source files (not a public API).
//
// - DeviceTxn: a read-only MetaTxn that reads and verifies blocks straight from the
//   device, optionally through an overlay of blocks (a journal's committed but not yet
//   replayed transactions). Writes, allocations and frees return kReadOnly.
// - ScanJournal: reads a journal the way Journal::Replay would, without writing.
// - WriteExtentTree: replaces an inode's extent tree by one built from a list.
//
// Thread-safety: none; fsck is single-threaded.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "cache/meta_txn.h"
#include "device/block_device.h"
#include "format/format.h"
#include "util/status.h"

namespace agorafs::fsck_internal {

// home block -> newest journaled copy.
using Overlay = std::map<uint64_t, std::shared_ptr<AlignedBuffer>>;

class DeviceTxn final : public MetaTxn {
 public:
  DeviceTxn(BlockDevice* dev, const Geometry& g, const Uuid& uuid, const Overlay* overlay)
      : dev_(dev), g_(g), uuid_(uuid), overlay_(overlay) {}

  bool read_only() const override { return true; }
  const Uuid& uuid() const override { return uuid_; }

  // Like MetaStore: only journaled blocks (data area, orphan lists) are metadata.
  Result<const uint8_t*> Read(uint64_t blk, BlockType type, LockId lock) override;
  Result<uint8_t*> Write(uint64_t, BlockType, LockId) override {
    return Err(Code::kReadOnly, "fsck: write through a read-only transaction");
  }
  Result<std::pair<uint64_t, uint8_t*>> NewBlock(BlockType, LockId, uint64_t) override {
    return Err(Code::kReadOnly, "fsck: allocation through a read-only transaction");
  }
  Result<Allocation> AllocData(uint64_t, uint32_t) override {
    return Err(Code::kReadOnly, "fsck: allocation through a read-only transaction");
  }
  Status Free(uint64_t, uint64_t) override {
    return Err(Code::kReadOnly, "fsck: free through a read-only transaction");
  }

  // The block as stored (overlay first), unverified. Valid until Clear().
  Result<const uint8_t*> Raw(uint64_t blk);
  // Drops every cached block: pointers returned earlier become invalid.
  void Clear() { cache_.clear(); }
  size_t cached() const { return cache_.size(); }

 private:
  struct Cached {
    AlignedBuffer data{kBlockSize};
    uint16_t verified_type = 0xffff;  // type the block last verified as
  };
  Result<Cached*> Get(uint64_t blk);

  BlockDevice* dev_;
  Geometry g_;
  Uuid uuid_;
  const Overlay* overlay_;
  std::unordered_map<uint64_t, std::unique_ptr<Cached>> cache_;
};

struct JournalScan {
  bool header_ok = false;
  int32_t damaged_copy = -1;  // with header_ok: the header copy (0/1) that is unusable
  std::string damaged_why;
  std::string error;          // why the headers are unusable or replay would refuse
  bool replay_refused = false;  // a complete transaction targets a forbidden block
  uint64_t tail_seq = 0;
  uint32_t tail_pos = 0;
  uint64_t transactions = 0;  // complete transactions Replay would apply
  uint64_t blocks = 0;
  Overlay overlay;            // what Replay would write home (latest copy wins)
};

// Never writes. I/O errors are returned; everything else is described in the result.
Result<JournalScan> ScanJournal(BlockDevice* dev, const Geometry& g, const Uuid& uuid,
                                uint32_t slot);

// Replaces ino's extent tree by a fresh one holding `ext` (sorted, non-overlapping),
// allocating node blocks through txn when they do not fit in the root. Old nodes and
// blocks no longer listed are NOT freed (fsck returns them to the bitmaps later).
// Sets ino->blocks to 1 + data + nodes + (xattr block ? 1 : 0). Returns nodes used.
Result<uint64_t> WriteExtentTree(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino,
                                 const std::vector<Extent>& ext);

// Blocks (dir table blocks and leaves, chains included) a hashed directory owns, as
// far as they can be read; `complete` false when some could not.
std::vector<uint64_t> DirBlocks(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d,
                                bool* complete);


}  // namespace agorafs::fsck_internal
