#include "format/format.h"

#include "util/hash.h"


#include <algorithm>
#include <cstdio>

namespace agorafs {

const char* BlockTypeName(BlockType t) {
  switch (t) {
    case BlockType::kFree: return "free";
    case BlockType::kSuper: return "superblock";
    case BlockType::kSlot: return "slot";
    case BlockType::kJournalHeader: return "journal header";
    case BlockType::kJournalDesc: return "journal descriptor";
    case BlockType::kJournalCommit: return "journal commit";
    case BlockType::kAgHeader: return "AG header";
    case BlockType::kBitmap: return "bitmap";
    case BlockType::kInode: return "inode";
    case BlockType::kExtentNode: return "extent node";
    case BlockType::kDirTable: return "directory table";
    case BlockType::kDirLeaf: return "directory leaf";
    case BlockType::kXattr: return "xattr";
    case BlockType::kOrphan: return "orphan list";
    case BlockType::kMailHeader: return "mail header";
    case BlockType::kPaxos: return "paxos";
    case BlockType::kAckTable: return "ack table";
    case BlockType::kLockSnapshot: return "lock snapshot";
    case BlockType::kRing: return "message ring";
    case BlockType::kPeerView: return "peer view";
    case BlockType::kOpenTable: return "open-file table";
  }
  return "unknown";
}

void InitHeader(uint8_t* block, BlockType type, uint64_t blocknr, const Uuid& uuid) {
  BlockHeader* h = Header(block);
  h->magic = kMagic;
  h->type = static_cast<uint16_t>(type);
  h->reserved = 0;
  h->checksum = 0;
  h->blocknr = blocknr;
  std::memcpy(h->uuid, uuid.data(), uuid.size());
}

bool IsZeroBlock(const uint8_t* block) {
  return std::all_of(block, block + kBlockSize, [](uint8_t c) { return c == 0; });
}

uint64_t BlockChecksum(const uint8_t* block) {
  Hasher h;
  h.Update(block, offsetof(BlockHeader, checksum));
  static const uint8_t zeros[8] = {};
  h.Update(zeros, sizeof(zeros));
  size_t rest = offsetof(BlockHeader, checksum) + 8;
  h.Update(block + rest, kBlockSize - rest);
  return h.Digest();
}

void SealBlock(uint8_t* block) { Header(block)->checksum = BlockChecksum(block); }

Status VerifyBlock(const uint8_t* block, BlockType type, uint64_t blocknr, const Uuid& uuid) {
  const BlockHeader* h = Header(block);
  char where[96];
  std::snprintf(where, sizeof(where), "%s block %llu: ", BlockTypeName(type),
                static_cast<unsigned long long>(blocknr));
  if (h->magic != kMagic) {
    return Err(Code::kCorruption, std::string(where) + "bad magic");
  }
  if (h->type != static_cast<uint16_t>(type)) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "wrong type %u", h->type);
    return Err(Code::kCorruption, std::string(where) + buf);
  }
  if (h->checksum != BlockChecksum(block)) {
    return Err(Code::kCorruption, std::string(where) + "checksum mismatch");
  }
  if (h->blocknr != blocknr) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "claims to be block %llu",
                  static_cast<unsigned long long>(h->blocknr));
    return Err(Code::kCorruption, std::string(where) + buf);
  }
  if (std::memcmp(h->uuid, uuid.data(), uuid.size()) != 0) {
    return Err(Code::kCorruption, std::string(where) + "belongs to another filesystem");
  }
  return Status::Ok();
}

bool IsForeignBlock(const uint8_t* block, BlockType type, uint64_t blocknr, const Uuid& uuid) {
  const BlockHeader* h = Header(block);
  return h->magic == kMagic && h->type == static_cast<uint16_t>(type) && h->blocknr == blocknr &&
         h->checksum == BlockChecksum(block) &&
         std::memcmp(h->uuid, uuid.data(), uuid.size()) != 0;
}

uint32_t Geometry::AgSize(uint32_t ag) const {
  if (ag + 1 < ag_count) return ag_blocks;
  uint64_t end = total_blocks - 1;  // last block holds a superblock copy
  return static_cast<uint32_t>(std::min<uint64_t>(ag_blocks, end - AgStart(ag)));
}

static uint64_t FloorPow2(uint64_t v) {
  return v == 0 ? 0 : uint64_t(1) << (63 - __builtin_clzll(v));
}

Result<Geometry> ComputeGeometry(const MkfsParams& p) {
  Geometry g;
  g.total_blocks = p.total_blocks;
  if (p.node_slots < kMinNodeSlots || p.node_slots > kMaxNodeSlots) {
    return Err(Code::kInvalid, "node slot count must be between 1 and 1024");
  }
  g.node_slots = p.node_slots;
  g.slot_blocks = kDefaultSlotBlocks;
  g.slot_start = 2;
  g.journal_start = g.slot_start + uint64_t(g.node_slots) * g.slot_blocks;
  if (p.journal_blocks != 0) {
    g.journal_blocks = p.journal_blocks;
  } else {
    uint64_t jb = p.total_blocks / (8ull * g.node_slots);
    g.journal_blocks = static_cast<uint32_t>(std::clamp<uint64_t>(jb, kMinJournalBlocks, 16384));
  }
  if (g.journal_blocks < kMinJournalBlocks) {
    return Err(Code::kInvalid, "journal must be at least 1 MiB");
  }
  uint64_t after_journals = g.journal_start + uint64_t(g.node_slots) * g.journal_blocks;
  g.ag_start = (after_journals + 255) / 256 * 256;  // 1 MiB aligned
  if (p.total_blocks < g.ag_start + 1 + 1024) {
    return Err(Code::kNoSpace, "device too small for this many node slots and journals");
  }
  uint64_t data = p.total_blocks - 1 - g.ag_start;
  uint64_t agb = p.ag_blocks;
  if (agb == 0) agb = std::clamp<uint64_t>(FloorPow2(data / 16), 4096, 262144);
  if (agb < 64 || agb > (uint64_t(1) << 31)) return Err(Code::kInvalid, "bad AG size");
  g.ag_blocks = static_cast<uint32_t>(agb);
  g.bitmap_blocks = static_cast<uint32_t>((agb + kBitsPerBitmap - 1) / kBitsPerBitmap);
  uint64_t count = (data + agb - 1) / agb;
  uint64_t last = data - (count - 1) * agb;
  if (count > 1 && last < 1 + g.bitmap_blocks + 64) count--;  // drop a sliver
  if (count == 0 || count > UINT32_MAX) return Err(Code::kInvalid, "bad AG count");
  g.ag_count = static_cast<uint32_t>(count);
  if (g.AgSize(g.ag_count - 1) < 1 + g.bitmap_blocks + 16) {
    return Err(Code::kNoSpace, "device too small");
  }
  return g;
}

Geometry GeometryOf(const Superblock& sb) {
  Geometry g;
  g.total_blocks = sb.total_blocks;
  g.node_slots = sb.node_slots;
  g.slot_blocks = sb.slot_blocks;
  g.slot_start = sb.slot_start;
  g.journal_start = sb.journal_start;
  g.journal_blocks = sb.journal_blocks;
  g.ag_start = sb.ag_start;
  g.ag_blocks = sb.ag_blocks;
  g.ag_count = sb.ag_count;
  g.bitmap_blocks = sb.bitmap_blocks;
  return g;
}

}  // namespace agorafs
