#include "fs/super.h"

#include <sys/random.h>

#include <cstdio>
#include <cstring>
#include <ctime>

#include "dir/dir.h"
#include "fs/inode.h"
#include "journal/journal.h"
#include "util/clock.h"

namespace agorafs {

Uuid SuperUuid(const Superblock& sb) {
  Uuid u;
  std::memcpy(u.data(), sb.hdr.uuid, u.size());
  return u;
}

std::string UuidString(const Uuid& u) {
  char s[40];
  std::snprintf(s, sizeof(s),
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
                u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
                u[14], u[15]);
  return s;
}

static Status CheckSuper(const Superblock& sb, uint64_t blk, uint64_t dev_blocks) {
  Uuid u = SuperUuid(sb);
  AGFS_RETURN_IF_ERROR(VerifyBlock(reinterpret_cast<const uint8_t*>(&sb), BlockType::kSuper, blk, u));
  if (sb.version != kFormatVersion) {
    return Err(Code::kNotSupported, "unsupported agorafs format version " +
                                        std::to_string(sb.version));
  }
  if (sb.features_incompat & ~kKnownIncompat) {
    return Err(Code::kNotSupported,
               "filesystem uses features this agorafs does not know (incompat bits " +
                   std::to_string(sb.features_incompat & ~kKnownIncompat) +
                   "): mount it with a newer agorafs");
  }
  if (sb.block_size != kBlockSize) return Err(Code::kCorruption, "superblock: bad block size");
  if (sb.total_blocks > dev_blocks) {
    return Err(Code::kInvalid, "device is smaller (" + std::to_string(dev_blocks) +
                                   " blocks) than the filesystem (" +
                                   std::to_string(sb.total_blocks) + " blocks): truncated image?");
  }
  // Recompute the layout and insist the stored one matches it exactly.
  MkfsParams p;
  p.total_blocks = sb.total_blocks;
  p.node_slots = sb.node_slots;
  p.journal_blocks = sb.journal_blocks;
  p.ag_blocks = sb.ag_blocks;
  auto g = ComputeGeometry(p);
  if (!g.ok()) return Err(Code::kCorruption, "superblock: impossible layout: " + g.status().message());
  Geometry s = GeometryOf(sb);
  if (g->slot_start != s.slot_start || g->journal_start != s.journal_start ||
      g->ag_start != s.ag_start || g->ag_count != s.ag_count ||
      g->bitmap_blocks != s.bitmap_blocks || sb.slot_blocks != g->slot_blocks ||
      sb.root_ino < s.ag_start || sb.root_ino >= s.total_blocks - 1) {
    return Err(Code::kCorruption, "superblock: layout fields are inconsistent");
  }
  return Status::Ok();
}

std::string DetectExisting(BlockDevice* dev) {
  AlignedBuffer b(8192);
  if (dev->Size() < 8192 || !dev->Read(0, b.data(), 8192).ok()) return "";
  const auto* sb = reinterpret_cast<const Superblock*>(b.data());
  if (sb->hdr.magic == kMagic) {
    return "an agorafs filesystem (UUID " + UuidString(SuperUuid(*sb)) + ")";
  }
  uint16_t ext_magic;
  std::memcpy(&ext_magic, b.data() + 1024 + 56, 2);
  if (ext_magic == 0xEF53) return "an ext2/3/4 filesystem";
  if (std::memcmp(b.data(), "XFSB", 4) == 0) return "an XFS filesystem";
  if (std::memcmp(b.data() + 0x1fe, "\x55\xaa", 2) == 0) return "a partition table or boot sector";
  if (std::memcmp(b.data() + 4096 + 0x18, "\x2D\x4C\x33\x46", 4) == 0) return "an OCFS2 filesystem";
  if (std::memcmp(b.data() + 0x40, "_BHRfS_M", 8) == 0) return "a btrfs filesystem";
  return "";
}

Result<Superblock> ReadSuperblock(BlockDevice* dev) {
  uint64_t dev_blocks = dev->Size() / kBlockSize;
  if (dev_blocks < 16) {
    return Err(Code::kInvalid, dev->Name() + ": device is too small to hold agorafs");
  }
  AlignedBuffer b(kBlockSize);
  Status first;
  bool any_magic = false;
  bool all_zero = true;
  uint64_t where[3] = {0, 1, dev_blocks - 1};
  for (int i = 0; i < 3; i++) {
    AGFS_RETURN_IF_ERROR(dev->Read(where[i] * kBlockSize, b.data(), kBlockSize));
    for (size_t k = 0; k < kBlockSize && all_zero; k++) all_zero = b.data()[k] == 0;
    Superblock sb;
    std::memcpy(&sb, b.data(), kBlockSize);
    if (sb.hdr.magic != kMagic) continue;
    any_magic = true;
    // The copy at the end of a larger filesystem is not at dev_blocks-1; copies
    // at 0 and 1 are the ones that matter for a grown or truncated device.
    Status st = CheckSuper(sb, where[i], dev_blocks);
    if (st.ok()) return sb;
    if (first.ok()) first = st;
  }
  if (any_magic) {
    return Err(first.code() == Code::kOk ? Code::kCorruption : first.code(),
               dev->Name() + ": agorafs superblock unusable: " + first.message());
  }
  std::string other = DetectExisting(dev);
  if (!other.empty()) {
    return Err(Code::kInvalid, dev->Name() + ": not agorafs: the device holds " + other);
  }
  if (all_zero) {
    return Err(Code::kInvalid, dev->Name() + ": not agorafs: the device is empty (zeroed); run agorafs mkfs");
  }
  return Err(Code::kInvalid, dev->Name() + ": not agorafs: no agorafs superblock found");
}

static Status WriteBlock(BlockDevice* dev, uint64_t blk, uint8_t* data) {
  SealBlock(data);
  return dev->Write(blk * kBlockSize, data, kBlockSize);
}

static Status ZeroRange(BlockDevice* dev, uint64_t blk, uint64_t count) {
  AlignedBuffer z(256 * kBlockSize);
  while (count > 0) {
    uint64_t n = std::min<uint64_t>(count, 256);
    AGFS_RETURN_IF_ERROR(dev->Write(blk * kBlockSize, z.data(), n * kBlockSize));
    blk += n;
    count -= n;
  }
  return Status::Ok();
}

Result<Superblock> Mkfs(BlockDevice* dev, const MkfsOptions& opts) {
  MkfsParams p = opts.params;
  uint64_t dev_blocks = dev->Size() / kBlockSize;
  if (p.total_blocks == 0) p.total_blocks = dev_blocks;
  if (p.total_blocks > dev_blocks) {
    return Err(Code::kInvalid, "requested size exceeds the device");
  }
  if (opts.label.size() >= 64) return Err(Code::kInvalid, "label longer than 63 bytes");
  auto g = ComputeGeometry(p);
  if (!g.ok()) return Err(g.status().code(), dev->Name() + ": " + g.status().message());
  if (!opts.force) {
    std::string other = DetectExisting(dev);
    if (!other.empty()) {
      return Err(Code::kExists, dev->Name() + " already holds " + other +
                                    "; use --force to overwrite it");
    }
  }

  Superblock sb;
  std::memset(&sb, 0, sizeof(sb));
  Uuid uuid;
  if (getrandom(uuid.data(), uuid.size(), 0) != static_cast<ssize_t>(uuid.size()) ||
      getrandom(sb.cluster_secret, sizeof(sb.cluster_secret), 0) !=
          static_cast<ssize_t>(sizeof(sb.cluster_secret))) {
    return Err(Code::kIOError, "getrandom failed");
  }
  uuid[6] = (uuid[6] & 0x0F) | 0x40;  // RFC 4122 version 4
  uuid[8] = (uuid[8] & 0x3F) | 0x80;
  sb.version = kFormatVersion;
  sb.block_size = kBlockSize;
  sb.features_incompat = kIncompatIntentLocks;
  sb.total_blocks = g->total_blocks;
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  sb.created_ns = RealtimeNs();
  std::strncpy(sb.label, opts.label.c_str(), sizeof(sb.label) - 1);
  sb.node_slots = g->node_slots;
  sb.slot_blocks = g->slot_blocks;
  sb.slot_start = g->slot_start;
  sb.journal_start = g->journal_start;
  sb.journal_blocks = g->journal_blocks;
  sb.ag_start = g->ag_start;
  sb.ag_blocks = g->ag_blocks;
  sb.ag_count = g->ag_count;
  sb.bitmap_blocks = g->bitmap_blocks;
  sb.timing_profile = p.profile;
  bool fast = p.profile == kProfileFast;
  sb.heartbeat_interval_ms = p.heartbeat_interval_ms ? p.heartbeat_interval_ms : (fast ? 500 : 2000);
  sb.io_timeout_ms = p.io_timeout_ms ? p.io_timeout_ms : (fast ? 2000 : 10000);
  sb.dead_after_ms = p.dead_after_ms ? p.dead_after_ms : (fast ? 8000 : 60000);

  // 1. Destroy any old superblock first, so a crash mid-mkfs leaves no valid one.
  AGFS_RETURN_IF_ERROR(ZeroRange(dev, 0, 2));
  AGFS_RETURN_IF_ERROR(ZeroRange(dev, dev_blocks - 1, 1));
  if (g->total_blocks - 1 != dev_blocks - 1) AGFS_RETURN_IF_ERROR(ZeroRange(dev, g->total_blocks - 1, 1));
  AGFS_RETURN_IF_ERROR(dev->Flush());

  // 2. Node slots: heartbeat blocks free, orphan lists empty, the rest zeroed.
  AGFS_RETURN_IF_ERROR(ZeroRange(dev, g->slot_start, uint64_t(g->node_slots) * g->slot_blocks));
  AlignedBuffer blk(kBlockSize);
  for (uint32_t s = 0; s < g->node_slots; s++) {
    std::memset(blk.data(), 0, kBlockSize);
    uint64_t hb = g->SlotBlock(s, kSlotHeartbeat);
    InitHeader(blk.data(), BlockType::kSlot, hb, uuid);
    reinterpret_cast<SlotBlock*>(blk.data())->slot = s;
    AGFS_RETURN_IF_ERROR(WriteBlock(dev, hb, blk.data()));
    for (uint32_t o = 0; o < kSlotOrphanBlocks; o++) {
      std::memset(blk.data(), 0, kBlockSize);
      uint64_t ob = g->SlotBlock(s, kSlotOrphan + o);
      InitHeader(blk.data(), BlockType::kOrphan, ob, uuid);
      AGFS_RETURN_IF_ERROR(WriteBlock(dev, ob, blk.data()));
    }
    AGFS_RETURN_IF_ERROR(Journal::Format(dev, *g, uuid, s));
  }

  // 3. Allocation groups.
  sb.root_ino = g->ag_start + 1 + g->bitmap_blocks;
  for (uint32_t ag = 0; ag < g->ag_count; ag++) {
    uint64_t base = g->AgStart(ag);
    uint32_t size = g->AgSize(ag);
    uint64_t used = 1 + g->bitmap_blocks + (ag == 0 ? 1 : 0);
    for (uint32_t bm = 0; bm < g->bitmap_blocks; bm++) {
      std::memset(blk.data(), 0, kBlockSize);
      InitHeader(blk.data(), BlockType::kBitmap, base + 1 + bm, uuid);
      auto* b = reinterpret_cast<BitmapBlock*>(blk.data());
      b->ag_index = ag;
      b->index = bm;
      for (uint64_t i = uint64_t(bm) * kBitsPerBitmap; i < uint64_t(bm + 1) * kBitsPerBitmap; i++) {
        // Bits for blocks past the AG's end are set so they are never handed out.
        if (i < used || i >= size) {
          uint64_t k = i - uint64_t(bm) * kBitsPerBitmap;
          b->bits[k >> 3] |= uint8_t(1u << (k & 7));
        }
      }
      AGFS_RETURN_IF_ERROR(WriteBlock(dev, base + 1 + bm, blk.data()));
    }
    std::memset(blk.data(), 0, kBlockSize);
    InitHeader(blk.data(), BlockType::kAgHeader, base, uuid);
    auto* h = reinterpret_cast<AgHeader*>(blk.data());
    h->ag_index = ag;
    h->blocks = size;
    h->free_blocks = size - used;
    h->inodes = ag == 0 ? 1 : 0;
    AGFS_RETURN_IF_ERROR(WriteBlock(dev, base, blk.data()));
  }

  // 4. Root directory.
  std::memset(blk.data(), 0, kBlockSize);
  InitHeader(blk.data(), BlockType::kInode, sb.root_ino, uuid);
  auto* root = reinterpret_cast<InodeBlock*>(blk.data());
  uint64_t gen = 1;
  InitInodeCore(root, S_IFDIR | 0755, opts.root_uid, opts.root_gid, gen, ToTs(now));
  root->parent = sb.root_ino;
  root->blocks = 1;  // the inode block itself, as for every inode
  if (getrandom(&root->hash_seed, sizeof(root->hash_seed), 0) != sizeof(root->hash_seed)) {
    return Err(Code::kIOError, "getrandom failed");
  }
  dir::InitEmpty(root);
  AGFS_RETURN_IF_ERROR(WriteBlock(dev, sb.root_ino, blk.data()));
  AGFS_RETURN_IF_ERROR(dev->Flush());

  // 5. Superblocks, last.
  uint64_t copies[3] = {0, 1, g->total_blocks - 1};
  for (uint64_t c : copies) {
    InitHeader(reinterpret_cast<uint8_t*>(&sb), BlockType::kSuper, c, uuid);
    std::memcpy(blk.data(), &sb, kBlockSize);
    AGFS_RETURN_IF_ERROR(WriteBlock(dev, c, blk.data()));
  }
  AGFS_RETURN_IF_ERROR(dev->Flush());
  InitHeader(reinterpret_cast<uint8_t*>(&sb), BlockType::kSuper, 0, uuid);
  SealBlock(reinterpret_cast<uint8_t*>(&sb));
  return sb;
}

}  // namespace agorafs
