// Corrupt: damages chosen metadata blocks of an agorafs image, for tests.
//
// What it does
// - FindMetadata walks the filesystem's real structures through the same modules the
//   filesystem uses (directory tree from the root inode with dir::List, extent trees
//   with extent::ForEach, hashed directories' table and leaf blocks, xattr blocks) and
//   the fixed regions (superblock copies, AG headers and bitmaps, journal header
//   copies, orphan-list blocks), and returns every metadata block it reaches with its
//   type and, for per-inode structures, the owning inode and one path naming it.
//   Only blocks that verify (VerifyBlock) are listed: already damaged ones are not.
// - Corrupt picks `count` distinct blocks of the chosen kind (seeded, reproducible),
//   restricted to one inode's blocks (`ino`) or to one block (`block`) when given,
//   and damages each in place: kFlip flips `bits` random bits (each flip makes the
//   block fail verification: the checksum covers every byte, the checksum field
//   included), kZero writes zeros over the whole block. Then it flushes.
//   The root inode is picked only when named by `ino` or `block`.
// - The report lists exactly the blocks it damaged.
//
// Failure: kBusy when a live node has the device mounted (the same heartbeat check
// fsck makes; nothing is written); kNotFound when no block of the kind matches;
// kIOError from the device; kCorruption when no superblock can be read. Blocks held
// in a journal that still needs replay are damaged at home only: the next replay may
// rewrite them, so use it on cleanly unmounted images.
//
// Thread-safety: single-threaded, on a device nobody else writes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "device/block_device.h"
#include "util/status.h"

namespace agorafs {

enum class MetaKind : uint8_t {
  kInode,     // inode blocks
  kDir,       // hashed directories' table and leaf blocks
  kExtent,    // extent tree node blocks (below the root in the inode)
  kXattr,     // xattr blocks
  kBitmap,    // AG bitmap blocks
  kAgHeader,  // AG header blocks
  kJournal,   // journal header copies (blocks 0 and 1 of every slot's journal)
  kSuper,     // superblock and its copies
  kOrphan,    // orphan-list blocks of the node slots
};
// "inode", "dir", "extent", "xattr", "bitmap", "aghdr", "journal", "super", "orphan".
const char* MetaKindName(MetaKind k);
bool ParseMetaKind(const std::string& s, MetaKind* out);
std::vector<std::string> MetaKindNames();

struct MetaBlock {
  uint64_t block = 0;
  MetaKind kind = MetaKind::kInode;
  std::string block_type;  // BlockTypeName of its header, e.g. "directory leaf"
  uint64_t ino = 0;        // owning inode (0 for the fixed regions)
  std::string path;        // a path naming the owner ("/" for the root), "" when none
};

// Every metadata block reachable as described above, in walk order.
Result<std::vector<MetaBlock>> FindMetadata(BlockDevice* dev);

enum class CorruptMode : uint8_t { kFlip, kZero };

struct CorruptOptions {
  bool any_kind = false;  // with `block`: whatever kind that block is
  MetaKind kind = MetaKind::kInode;
  uint32_t count = 1;     // blocks to damage; fewer when fewer match
  CorruptMode mode = CorruptMode::kFlip;
  uint32_t bits = 4;      // kFlip: bits flipped per block (1..64)
  uint64_t seed = 1;
  uint64_t ino = 0;       // only blocks owned by this inode (0: any)
  uint64_t block = 0;     // only this block (0: any)
  uint32_t heartbeat_ms_override = 0;  // liveness check interval; 0: the superblock's
};

struct CorruptReport {
  uint64_t candidates = 0;          // blocks that matched before picking
  std::vector<MetaBlock> damaged;   // in block order
  std::string ToText() const;
  std::string ToJson() const;
};

Result<CorruptReport> Corrupt(BlockDevice* dev, const CorruptOptions& opts);

}  // namespace agorafs
