// fsck helpers: read-only device transaction, journal scan, extent tree writer,
// directory block walk. See fsck_internal.h.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "extent/extent.h"
#include "fsck/fsck_internal.h"
#include "util/hash.h"

namespace agorafs::fsck_internal {

// ---------------------------------------------------------------------------------
// DeviceTxn

Result<DeviceTxn::Cached*> DeviceTxn::Get(uint64_t blk) {
  auto it = cache_.find(blk);
  if (it != cache_.end()) return it->second.get();
  if (blk >= dev_->Size() / kBlockSize) {
    return Err(Code::kCorruption, fmt::format("block {} is beyond the device", blk));
  }
  auto c = std::make_unique<Cached>();
  const AlignedBuffer* ov = nullptr;
  if (overlay_ != nullptr) {
    auto o = overlay_->find(blk);
    if (o != overlay_->end()) ov = o->second.get();
  }
  if (ov != nullptr) {
    std::memcpy(c->data.data(), ov->data(), kBlockSize);
  } else {
    AGFS_RETURN_IF_ERROR(dev_->Read(blk * kBlockSize, c->data.data(), kBlockSize));
  }
  Cached* raw = c.get();
  cache_[blk] = std::move(c);
  return raw;
}

Result<const uint8_t*> DeviceTxn::Raw(uint64_t blk) {
  AGFS_ASSIGN_OR_RETURN(Cached * c, Get(blk));
  return static_cast<const uint8_t*>(c->data.data());
}

Result<const uint8_t*> DeviceTxn::Read(uint64_t blk, BlockType type, LockId lock) {
  (void)lock;
  if (!g_.Journaled(blk)) {
    return Err(Code::kCorruption, fmt::format("{} block {} is outside the data area",
                                              BlockTypeName(type), blk));
  }
  AGFS_ASSIGN_OR_RETURN(Cached * c, Get(blk));
  if (c->verified_type != uint16_t(type)) {
    AGFS_RETURN_IF_ERROR(VerifyBlock(c->data.data(), type, blk, uuid_));
    c->verified_type = uint16_t(type);
  }
  return static_cast<const uint8_t*>(c->data.data());
}

// ---------------------------------------------------------------------------------
// Journal scan (mirrors Journal::Open and Journal::Replay, read-only)

namespace {

struct TxnRead {
  bool complete = false;
  std::string stop;
  uint32_t length = 0;
  std::vector<uint64_t> homes;
  std::vector<std::shared_ptr<AlignedBuffer>> data;
};

Status ReadLog(BlockDevice* dev, uint64_t region, uint32_t cap, uint32_t pos, uint8_t* buf) {
  return dev->Read((region + kJournalLogStart + pos % cap) * kBlockSize, buf, kBlockSize);
}

Result<TxnRead> ReadTxn(BlockDevice* dev, uint64_t region, uint32_t cap, const Uuid& uuid,
                        uint32_t pos, uint64_t seq, uint32_t budget) {
  TxnRead t;
  uint32_t used = 0, p = pos, descs = 0;
  AlignedBuffer blk(kBlockSize);
  Hasher hash;
  auto stop = [&](const std::string& why) -> Result<TxnRead> {
    t.stop = fmt::format("transaction {} at log index {}: {}", seq, pos, why);
    return t;
  };
  for (;;) {
    if (used >= budget) return stop("runs past the end of the log");
    p = (pos + used) % cap;
    AGFS_RETURN_IF_ERROR(ReadLog(dev, region, cap, p, blk.data()));
    const uint16_t type = Header(blk.data())->type;
    if (descs > 0 && type == uint16_t(BlockType::kJournalCommit)) break;
    if (descs > 0 && t.homes.size() % kDescEntries != 0) {
      return stop("a partial descriptor is not followed by the commit");
    }
    Status v = VerifyBlock(blk.data(), BlockType::kJournalDesc, region + kJournalLogStart + p, uuid);
    if (!v.ok()) return stop(v.message());
    const auto* d = reinterpret_cast<const JournalDesc*>(blk.data());
    if (d->hdr.seq != seq) return stop(fmt::format("descriptor has seq {}", d->hdr.seq));
    if (d->index != descs) return stop(fmt::format("descriptor has index {}", d->index));
    if (d->count == 0 || d->count > kDescEntries) return stop("bad descriptor count");
    const uint32_t count = d->count;
    hash.Update(blk.data(), kBlockSize);
    used++;
    if (count > budget - used) return stop("runs past the end of the log");
    for (uint32_t i = 0; i < count; i++) t.homes.push_back(d->home[i]);
    for (uint32_t i = 0; i < count; i++) {
      auto b = std::make_shared<AlignedBuffer>(kBlockSize);
      AGFS_RETURN_IF_ERROR(ReadLog(dev, region, cap, (pos + used + i) % cap, b->data()));
      hash.Update(b->data(), kBlockSize);
      t.data.push_back(std::move(b));
    }
    used += count;
    descs++;
  }
  Status v = VerifyBlock(blk.data(), BlockType::kJournalCommit, region + kJournalLogStart + p, uuid);
  if (!v.ok()) return stop(v.message());
  const auto* c = reinterpret_cast<const JournalCommit*>(blk.data());
  if (c->hdr.seq != seq) return stop(fmt::format("commit has seq {}", c->hdr.seq));
  if (c->desc_count != descs || c->data_count != t.homes.size()) {
    return stop("commit counts disagree with the descriptors");
  }
  if (c->body_hash != hash.Digest()) return stop("body hash mismatch");
  t.length = used + 1;
  t.complete = true;
  return t;
}

}  // namespace

Result<JournalScan> ScanJournal(BlockDevice* dev, const Geometry& g, const Uuid& uuid,
                                uint32_t slot) {
  JournalScan js;
  const uint64_t region = g.JournalStart(slot);
  if (g.journal_blocks < kJournalLogStart + 3 ||
      region + g.journal_blocks > dev->Size() / kBlockSize) {
    js.error = "journal region does not fit the device";
    return js;
  }
  const uint32_t cap = g.journal_blocks - kJournalLogStart;
  AlignedBuffer buf(2 * kBlockSize);
  AGFS_RETURN_IF_ERROR(dev->Read(region * kBlockSize, buf.data(), buf.size()));
  const JournalHeader* best = nullptr;
  std::string why[2];
  for (uint32_t i = 0; i < 2; i++) {
    const uint8_t* b = buf.data() + i * kBlockSize;
    const auto* h = reinterpret_cast<const JournalHeader*>(b);
    Status s = VerifyBlock(b, BlockType::kJournalHeader, region + i, uuid);
    if (!s.ok()) {
      why[i] = s.message();
    } else if (h->slot != slot) {
      why[i] = fmt::format("header copy {} names slot {}", i, h->slot);
    } else if (h->tail_pos >= cap || h->tail_seq == 0) {
      why[i] = fmt::format("header copy {} has its tail outside the log", i);
    } else if (best == nullptr || h->update > best->update) {
      best = h;
    }
  }
  if (best == nullptr) {
    js.error = "both header copies are invalid (" + why[0] + "; " + why[1] + ")";
    return js;
  }
  js.header_ok = true;
  for (int32_t i = 0; i < 2; i++) {
    if (!why[i].empty()) {
      js.damaged_copy = i;
      js.damaged_why = why[i];
    }
  }
  js.tail_seq = best->tail_seq;
  js.tail_pos = best->tail_pos;
  uint64_t seq = js.tail_seq;
  uint32_t pos = js.tail_pos, scanned = 0;
  const uint64_t dev_blocks = dev->Size() / kBlockSize;
  for (;;) {
    AGFS_ASSIGN_OR_RETURN(TxnRead t, ReadTxn(dev, region, cap, uuid, pos, seq, cap - scanned));
    if (!t.complete) break;
    for (uint64_t home : t.homes) {
      if (!g.Journaled(home) || home >= dev_blocks) {
        js.replay_refused = true;
        js.error = fmt::format("transaction {} targets block {} outside the data area", seq, home);
        return js;
      }
    }
    for (size_t i = 0; i < t.homes.size(); i++) js.overlay[t.homes[i]] = t.data[i];
    js.transactions++;
    js.blocks += t.homes.size();
    pos = (pos + t.length) % cap;
    scanned += t.length;
    seq++;
  }
  return js;
}

// ---------------------------------------------------------------------------------
// Extent tree writer

Result<uint64_t> WriteExtentTree(MetaTxn& txn, uint64_t ino_nr, InodeBlock* ino,
                                 const std::vector<Extent>& ext) {
  uint64_t data = 0;
  for (const Extent& e : ext) data += e.len;
  extent::InitRoot(ino);
  uint64_t nodes = 0;
  auto finish = [&]() -> Result<uint64_t> {
    ino->blocks = 1 + data + nodes + (ino->xattr_block != 0 ? 1 : 0);
    return nodes;
  };
  if (ext.size() <= kExtentRootLeafMax) {
    ExtentNodeHeader h{0, uint16_t(ext.size()), uint16_t(kExtentRootLeafMax), 0, ino_nr};
    std::memcpy(ino->data, &h, sizeof(h));
    if (!ext.empty()) std::memcpy(ino->data + sizeof(h), ext.data(), ext.size() * sizeof(Extent));
    return finish();
  }
  struct Item {
    uint64_t key;
    uint64_t blk;
  };
  std::vector<Item> level;
  auto new_node = [&](uint16_t depth, uint16_t count, const void* entries,
                      size_t bytes) -> Result<uint64_t> {
    AGFS_ASSIGN_OR_RETURN(auto nb, txn.NewBlock(BlockType::kExtentNode, InodeLock(ino_nr), ino_nr));
    uint8_t* p = nb.second + sizeof(BlockHeader);
    std::memset(p, 0, kPayload);
    ExtentNodeHeader h{depth, count,
                       uint16_t(depth == 0 ? kExtentNodeLeafMax : kExtentNodeIndexMax), 0, ino_nr};
    std::memcpy(p, &h, sizeof(h));
    std::memcpy(p + sizeof(h), entries, bytes);
    nodes++;
    return nb.first;
  };
  for (size_t i = 0; i < ext.size(); i += kExtentNodeLeafMax) {
    size_t n = std::min(kExtentNodeLeafMax, ext.size() - i);
    AGFS_ASSIGN_OR_RETURN(uint64_t blk, new_node(0, uint16_t(n), &ext[i], n * sizeof(Extent)));
    level.push_back(Item{ext[i].logical, blk});
  }
  uint16_t depth = 1;
  while (level.size() > kExtentRootIndexMax) {
    if (depth >= extent::kMaxDepth) return Err(Code::kNoSpace, "extent tree would be too deep");
    std::vector<Item> up;
    for (size_t i = 0; i < level.size(); i += kExtentNodeIndexMax) {
      size_t n = std::min(kExtentNodeIndexMax, level.size() - i);
      std::vector<ExtentIndex> idx(n);
      for (size_t k = 0; k < n; k++) idx[k] = ExtentIndex{level[i + k].key, level[i + k].blk};
      AGFS_ASSIGN_OR_RETURN(uint64_t blk,
                            new_node(depth, uint16_t(n), idx.data(), n * sizeof(ExtentIndex)));
      up.push_back(Item{level[i].key, blk});
    }
    level.swap(up);
    depth++;
  }
  ExtentNodeHeader h{depth, uint16_t(level.size()), uint16_t(kExtentRootIndexMax), 0, ino_nr};
  std::memcpy(ino->data, &h, sizeof(h));
  for (size_t k = 0; k < level.size(); k++) {
    ExtentIndex x{level[k].key, level[k].blk};
    std::memcpy(ino->data + sizeof(h) + k * sizeof(ExtentIndex), &x, sizeof(x));
  }
  return finish();
}

// ---------------------------------------------------------------------------------
// Directory blocks

std::vector<uint64_t> DirBlocks(MetaTxn& txn, uint64_t dir_ino, const InodeBlock& d,
                                bool* complete) {
  std::vector<uint64_t> out;
  *complete = true;
  if (d.data_kind != uint8_t(DataKind::kDirHash)) return out;
  DirRoot root;
  std::memcpy(&root, d.data, sizeof(root));
  if (root.global_depth > kDirMaxDepth) {
    *complete = false;
    return out;
  }
  const uint64_t nslots = uint64_t(1) << root.global_depth;
  const uint64_t ntab = (nslots + kDirTableSlots - 1) / kDirTableSlots;
  std::unordered_set<uint64_t> seen;
  std::vector<uint64_t> primaries;
  for (uint64_t t = 0; t < ntab && t < kDirMaxTableBlocks; t++) {
    uint64_t blk;
    std::memcpy(&blk, d.data + sizeof(DirRoot) + 8 * t, 8);
    if (blk == 0 || !seen.insert(blk).second) {
      *complete = false;
      continue;
    }
    auto r = txn.ReadAs<DirTable>(blk, BlockType::kDirTable, InodeLock(dir_ino));
    if (!r.ok()) {
      *complete = false;
      continue;
    }
    out.push_back(blk);
    for (uint64_t i = 0; i < kDirTableSlots && t * kDirTableSlots + i < nslots; i++) {
      uint64_t p = (*r)->slot[i];
      if (p != 0 && (primaries.empty() || primaries.back() != p)) primaries.push_back(p);
    }
  }
  for (uint64_t p : primaries) {
    if (!seen.insert(p).second) continue;
    auto r = txn.ReadAs<DirLeaf>(p, BlockType::kDirLeaf, LeafLock(p));
    if (!r.ok()) {
      *complete = false;
      continue;
    }
    out.push_back(p);
    uint64_t next = (*r)->next;
    for (size_t n = 0; next != 0 && n < (size_t(1) << 20); n++) {
      if (!seen.insert(next).second) break;
      auto c = txn.ReadAs<DirLeaf>(next, BlockType::kDirLeaf, LeafLock(p));
      if (!c.ok()) {
        *complete = false;
        break;
      }
      out.push_back(next);
      next = (*c)->next;
    }
  }
  return out;
}

}  // namespace agorafs::fsck_internal
