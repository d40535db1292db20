// Corrupt: see corrupt.h.
#include "debug/corrupt.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <random>
#include <set>
#include <unordered_set>

#include "dir/dir.h"
#include "extent/extent.h"
#include "format/format.h"
#include "fs/super.h"
#include "fsck/fsck.h"
#include "fsck/fsck_internal.h"
#include "util/json.h"

namespace agorafs {

namespace {

struct KindName {
  MetaKind kind;
  const char* name;
};
constexpr KindName kKindNames[] = {
    {MetaKind::kInode, "inode"},     {MetaKind::kDir, "dir"},
    {MetaKind::kExtent, "extent"},   {MetaKind::kXattr, "xattr"},
    {MetaKind::kBitmap, "bitmap"},   {MetaKind::kAgHeader, "aghdr"},
    {MetaKind::kJournal, "journal"}, {MetaKind::kSuper, "super"},
    {MetaKind::kOrphan, "orphan"},
};

std::string Join(const std::string& dir, const std::string& name) {
  return dir == "/" ? "/" + name : dir + "/" + name;
}

class Walker {
 public:
  Walker(BlockDevice* dev, const Superblock& sb)
      : dev_(dev), sb_(sb), g_(GeometryOf(sb)), uuid_(SuperUuid(sb)),
        txn_(dev, g_, uuid_, nullptr) {}

  Result<std::vector<MetaBlock>> Run() {
    AGFS_RETURN_IF_ERROR(Fixed());
    AGFS_RETURN_IF_ERROR(Tree());
    return std::move(out_);
  }

 private:
  // Adds `blk` when it verifies as `type`; I/O errors are returned.
  Status AddIfValid(uint64_t blk, BlockType type, MetaKind kind, uint64_t ino,
                    const std::string& path) {
    AlignedBuffer b(kBlockSize);
    AGFS_RETURN_IF_ERROR(dev_->Read(blk * kBlockSize, b.data(), kBlockSize));
    if (!VerifyBlock(b.data(), type, blk, uuid_).ok()) return Status::Ok();
    Add(blk, type, kind, ino, path);
    return Status::Ok();
  }
  void Add(uint64_t blk, BlockType type, MetaKind kind, uint64_t ino, const std::string& path) {
    if (!seen_.insert(blk).second) return;
    out_.push_back(MetaBlock{blk, kind, BlockTypeName(type), ino, path});
  }

  Status Fixed() {
    for (uint64_t c : {uint64_t(0), uint64_t(1), g_.total_blocks - 1}) {
      AGFS_RETURN_IF_ERROR(AddIfValid(c, BlockType::kSuper, MetaKind::kSuper, 0, ""));
    }
    for (uint32_t s = 0; s < g_.node_slots; s++) {
      for (uint32_t i = 0; i < 2; i++) {
        AGFS_RETURN_IF_ERROR(AddIfValid(g_.JournalStart(s) + i, BlockType::kJournalHeader,
                                        MetaKind::kJournal, 0, ""));
      }
      for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
        AGFS_RETURN_IF_ERROR(AddIfValid(g_.SlotBlock(s, kSlotOrphan + i), BlockType::kOrphan,
                                        MetaKind::kOrphan, 0, ""));
      }
    }
    for (uint32_t ag = 0; ag < g_.ag_count; ag++) {
      AGFS_RETURN_IF_ERROR(
          AddIfValid(g_.AgStart(ag), BlockType::kAgHeader, MetaKind::kAgHeader, 0, ""));
      for (uint32_t i = 0; i < g_.bitmap_blocks; i++) {
        AGFS_RETURN_IF_ERROR(
            AddIfValid(g_.AgStart(ag) + 1 + i, BlockType::kBitmap, MetaKind::kBitmap, 0, ""));
      }
    }
    return Status::Ok();
  }

  // Breadth-first from the root; the first path that reaches an inode names it.
  Status Tree() {
    const uint64_t root = sb_.root_ino;
    std::deque<std::pair<uint64_t, std::string>> queue{{root, "/"}};
    std::unordered_set<uint64_t> visited{root};
    InodeBlock ino;
    while (!queue.empty()) {
      auto [nr, path] = queue.front();
      queue.pop_front();
      txn_.Clear();
      auto r = txn_.ReadAs<InodeBlock>(nr, BlockType::kInode, InodeLock(nr));
      if (!r.ok()) {
        if (r.status().Is(Code::kIOError)) return r.status();
        continue;  // already damaged (or not an inode): nothing below it is reachable
      }
      std::memcpy(&ino, *r, sizeof(ino));
      Add(nr, BlockType::kInode, MetaKind::kInode, nr, path);
      if (ino.xattr_block != 0 && g_.InDataArea(ino.xattr_block)) {
        AGFS_RETURN_IF_ERROR(
            AddIfValid(ino.xattr_block, BlockType::kXattr, MetaKind::kXattr, nr, path));
      }
      if (ino.data_kind == uint8_t(DataKind::kExtents)) {
        std::vector<uint64_t> nodes;
        Status st = extent::ForEach(txn_, nr, ino, [](const Extent&) { return true; }, &nodes);
        if (st.Is(Code::kIOError)) return st;
        for (uint64_t n : nodes) {
          AGFS_RETURN_IF_ERROR(AddIfValid(n, BlockType::kExtentNode, MetaKind::kExtent, nr, path));
        }
      }
      if (!S_ISDIR(ino.mode)) continue;
      if (ino.data_kind == uint8_t(DataKind::kDirHash)) {
        bool complete = true;
        for (uint64_t blk : fsck_internal::DirBlocks(txn_, nr, ino, &complete)) {
          auto raw = txn_.Raw(blk);
          if (!raw.ok()) return raw.status();
          const auto type = BlockType(Header(*raw)->type);
          if (type == BlockType::kDirTable || type == BlockType::kDirLeaf) {
            AGFS_RETURN_IF_ERROR(AddIfValid(blk, type, MetaKind::kDir, nr, path));
          }
        }
      }
      std::vector<std::pair<uint64_t, std::string>> children;
      Status st = dir::List(txn_, nr, ino, 0, [&](const dir::Entry& e) {
        children.emplace_back(e.ino, e.name);
        return true;
      });
      if (st.Is(Code::kIOError)) return st;
      for (auto& [child, name] : children) {
        if (visited.insert(child).second) queue.emplace_back(child, Join(path, name));
      }
    }
    return Status::Ok();
  }

  BlockDevice* dev_;
  Superblock sb_;
  Geometry g_;
  Uuid uuid_;
  fsck_internal::DeviceTxn txn_;
  std::vector<MetaBlock> out_;
  std::unordered_set<uint64_t> seen_;
};

}  // namespace

const char* MetaKindName(MetaKind k) {
  for (const auto& kn : kKindNames) {
    if (kn.kind == k) return kn.name;
  }
  return "unknown";
}

bool ParseMetaKind(const std::string& s, MetaKind* out) {
  for (const auto& kn : kKindNames) {
    if (s == kn.name) {
      *out = kn.kind;
      return true;
    }
  }
  return false;
}

std::vector<std::string> MetaKindNames() {
  std::vector<std::string> v;
  for (const auto& kn : kKindNames) v.emplace_back(kn.name);
  return v;
}

Result<std::vector<MetaBlock>> FindMetadata(BlockDevice* dev) {
  AGFS_ASSIGN_OR_RETURN(Superblock sb, ReadSuperblock(dev));
  Walker w(dev, sb);
  return w.Run();
}

Result<CorruptReport> Corrupt(BlockDevice* dev, const CorruptOptions& opts) {
  if (opts.mode == CorruptMode::kFlip && (opts.bits < 1 || opts.bits > 64)) {
    return Err(Code::kInvalid, "bits to flip must be 1..64");
  }
  AGFS_RETURN_IF_ERROR(CheckNoLiveNode(dev, opts.heartbeat_ms_override, "debug corrupt"));
  AGFS_ASSIGN_OR_RETURN(Superblock sb, ReadSuperblock(dev));
  AGFS_ASSIGN_OR_RETURN(std::vector<MetaBlock> all, FindMetadata(dev));
  const uint64_t root = sb.root_ino;
  const bool named = opts.ino != 0 || opts.block != 0;
  std::vector<MetaBlock> match;
  for (const MetaBlock& m : all) {
    if (!opts.any_kind && m.kind != opts.kind) continue;
    if (opts.ino != 0 && m.ino != opts.ino) continue;
    if (opts.block != 0 && m.block != opts.block) continue;
    // The root inode only on request: without it nothing else can be reached.
    if (!named && m.kind == MetaKind::kInode && m.ino == root) continue;
    match.push_back(m);
  }
  if (match.empty()) {
    return Err(Code::kNotFound,
               fmt::format("no valid {} block{}{} found", opts.any_kind ? "metadata"
                                                                        : MetaKindName(opts.kind),
                           opts.ino ? fmt::format(" of inode {}", opts.ino) : "",
                           opts.block ? fmt::format(" at block {}", opts.block) : ""));
  }
  CorruptReport rep;
  rep.candidates = match.size();
  std::mt19937_64 rng(opts.seed);
  std::shuffle(match.begin(), match.end(), rng);
  match.resize(std::min<size_t>(match.size(), std::max<uint32_t>(opts.count, 1)));
  std::sort(match.begin(), match.end(),
            [](const MetaBlock& a, const MetaBlock& b) { return a.block < b.block; });

  AlignedBuffer b(kBlockSize);
  for (const MetaBlock& m : match) {
    if (opts.mode == CorruptMode::kZero) {
      std::memset(b.data(), 0, kBlockSize);
    } else {
      AGFS_RETURN_IF_ERROR(dev->Read(m.block * kBlockSize, b.data(), kBlockSize));
      std::set<uint32_t> bits;
      while (bits.size() < opts.bits) bits.insert(uint32_t(rng() % (kBlockSize * 8)));
      for (uint32_t bit : bits) b.data()[bit / 8] ^= uint8_t(1u << (bit % 8));
    }
    AGFS_RETURN_IF_ERROR(dev->Write(m.block * kBlockSize, b.data(), kBlockSize));
  }
  AGFS_RETURN_IF_ERROR(dev->Flush());
  rep.damaged = std::move(match);
  return rep;
}

std::string CorruptReport::ToText() const {
  std::string s = fmt::format("damaged {} of {} matching blocks:\n", damaged.size(), candidates);
  for (const MetaBlock& m : damaged) {
    s += fmt::format("  block {} ({}, {})", m.block, MetaKindName(m.kind), m.block_type);
    if (m.ino != 0) s += fmt::format(" of inode {} {}", m.ino, m.path);
    s += "\n";
  }
  return s;
}

std::string CorruptReport::ToJson() const {
  std::string s = fmt::format("{{\"candidates\":{},\"damaged\":[", candidates);
  for (size_t i = 0; i < damaged.size(); i++) {
    const MetaBlock& m = damaged[i];
    s += fmt::format("{}{{\"block\":{},\"kind\":\"{}\",\"block_type\":\"{}\",\"ino\":{},"
                     "\"path\":\"{}\"}}",
                     i ? "," : "", m.block, MetaKindName(m.kind), JsonEscape(m.block_type), m.ino,
                     JsonEscape(m.path));
  }
  return s + "]}";
}

}  // namespace agorafs
