// fsck's checker: see checker.h.
#include "fsck/checker.h"

#include <dirent.h>
#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "extent/extent.h"
#include "fs/acl.h"
#include "fs/applock.h"
#include "fs/xattr.h"
#include "fs/inode.h"
#include "fs/super.h"

namespace agorafs::fsck_internal {

namespace {

constexpr size_t kClearCacheAt = 4096;  // cached blocks before DeviceTxn::Clear
constexpr uint64_t kMaxSymlink = 4095;

uint64_t DivUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

const char* TypeName(uint32_t mode) {
  switch (mode & S_IFMT) {
    case S_IFREG: return "regular file";
    case S_IFDIR: return "directory";
    case S_IFLNK: return "symlink";
    case S_IFCHR: return "character device";
    case S_IFBLK: return "block device";
    case S_IFIFO: return "fifo";
    case S_IFSOCK: return "socket";
  }
  return "unknown type";
}

bool KnownType(uint32_t mode) {
  switch (mode & S_IFMT) {
    case S_IFREG: case S_IFDIR: case S_IFLNK: case S_IFCHR: case S_IFBLK: case S_IFIFO:
    case S_IFSOCK:
      return true;
  }
  return false;
}

bool BitSet(const std::vector<uint8_t>& bits, uint64_t i) { return bits[i >> 3] & (1u << (i & 7)); }
void SetBit(std::vector<uint8_t>& bits, uint64_t i) { bits[i >> 3] |= uint8_t(1u << (i & 7)); }

// Cuts the pieces of `in` at logical block `at`: keeps what lies before it (only
// pieces for which pred() is true are cut).
template <typename Pred>
std::vector<Extent> TrimAt(const std::vector<Extent>& in, uint64_t at, Pred pred) {
  std::vector<Extent> out;
  for (const Extent& e : in) {
    if (!pred(e) || e.logical + e.len <= at) {
      out.push_back(e);
    } else if (e.logical < at) {
      Extent c = e;
      c.len = uint32_t(at - e.logical);
      out.push_back(c);
    }
  }
  return out;
}

}  // namespace

const char* OwnName(uint8_t o) {
  switch (o) {
    case kOwnAg: return "AG metadata";
    case kOwnInode: return "an inode";
    case kOwnMeta: return "metadata";
    case kOwnData: return "file data";
  }
  return "nothing";
}

Checker::Checker(BlockDevice* dev, const Superblock& sb, const Overlay* overlay,
                 size_t max_problems)
    : sb_(sb),
      g_(GeometryOf(sb)),
      uuid_(SuperUuid(sb)),
      txn_(dev, g_, uuid_, overlay),
      max_problems_(max_problems) {}

void Checker::AddProblem(const std::string& kind, uint64_t block, uint64_t ino,
                         std::string detail, bool bitmap_only) {
  problem_count_++;
  if (!bitmap_only) structural_ = true;
  if (problems_.size() >= max_problems_) return;
  Problem p;
  p.p.kind = kind;
  p.p.block = block;
  p.p.ino = ino;
  p.p.detail = std::move(detail);
  p.bitmap_only = bitmap_only;
  problems_.push_back(std::move(p));
}

bool Checker::InAg(uint64_t blk) const {
  if (blk < g_.ag_start || blk >= g_.total_blocks - 1) return false;
  uint32_t ag = g_.AgOf(blk);
  return ag < g_.ag_count && blk - g_.AgStart(ag) < g_.AgSize(ag);
}

bool Checker::IsAgMeta(uint64_t blk) const {
  if (!InAg(blk)) return false;
  return blk - g_.AgStart(g_.AgOf(blk)) < 1 + uint64_t(g_.bitmap_blocks);
}

int Checker::BitOf(uint64_t blk) const {
  if (!InAg(blk)) return -1;
  const uint32_t ag = g_.AgOf(blk);
  const uint64_t i = blk - g_.AgStart(ag);
  const AgState& a = ags_[ag];
  if (!a.bm_ok[i / kBitsPerBitmap]) return -1;
  return BitSet(a.bits, i) ? 1 : 0;
}

int Checker::ClaimMeta(uint64_t blk, Own kind) {
  if (!ValidBlock(blk)) return 1;
  if (own_[blk] != kOwnNone) return 2;
  own_[blk] = kind;
  return 0;
}

void Checker::MaybeClear() {
  if (txn_.cached() > kClearCacheAt) txn_.Clear();
}

std::string Checker::PathOf(uint64_t dir) const {
  if (dir == sb_.root_ino) return "/";
  std::vector<const std::string*> parts;
  uint64_t cur = dir;
  for (int depth = 0; depth < 256; depth++) {
    if (cur == sb_.root_ino) break;
    auto it = inodes_.find(cur);
    if (it == inodes_.end() || it->second.entry_parent == 0) {
      std::string s = fmt::format("<inode {}>", cur);
      for (auto p = parts.rbegin(); p != parts.rend(); ++p) s += "/" + **p;
      return s;
    }
    parts.push_back(&it->second.entry_name);
    cur = it->second.entry_parent;
  }
  std::string s;
  for (auto p = parts.rbegin(); p != parts.rend(); ++p) s += "/" + **p;
  return s.empty() ? "/" : s;
}

std::string Checker::Describe(uint64_t ino) const {
  auto it = inodes_.find(ino);
  if (it == inodes_.end() || !it->second.valid) return fmt::format("inode {}", ino);
  if (S_ISDIR(it->second.mode)) return fmt::format("directory {} ({})", ino, PathOf(ino));
  return fmt::format("{} {}", TypeName(it->second.mode), ino);
}

// ---------------------------------------------------------------------------------

Status Checker::Run() {
  own_.assign(g_.total_blocks, kOwnNone);
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) {
    for (uint64_t b = 0; b < 1 + uint64_t(g_.bitmap_blocks); b++) own_[g_.AgStart(ag) + b] = kOwnAg;
  }
  ReadAgs();
  ReadOrphans();
  Walk();
  ApplyClaims();
  FindLost();
  FinalInodeChecks();
  CheckBitmaps();
  return Status::Ok();
}

void Checker::ReadAgs() {
  ags_.resize(g_.ag_count);
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) {
    AgState& a = ags_[ag];
    const uint64_t base = g_.AgStart(ag);
    a.bits.assign(size_t(g_.bitmap_blocks) * kBitmapBytes, 0);
    a.bm_ok.assign(g_.bitmap_blocks, false);
    auto h = txn_.ReadAs<AgHeader>(base, BlockType::kAgHeader, AgLock(ag));
    if (!h.ok()) {
      AddProblem("bad-checksum", base, 0,
                 fmt::format("AG {} header unreadable: {}", ag, h.status().message()), true);
    } else {
      a.hdr_ok = true;
      a.hdr = **h;
      if (a.hdr.ag_index != ag || a.hdr.blocks != g_.AgSize(ag) ||
          a.hdr.free_blocks > a.hdr.blocks) {
        AddProblem("bad-ag", base, 0,
                   fmt::format("AG {} header says index {}, {} blocks, {} free (expected index "
                               "{}, {} blocks)",
                               ag, +a.hdr.ag_index, +a.hdr.blocks, +a.hdr.free_blocks, ag,
                               g_.AgSize(ag)),
                   true);
        a.hdr_ok = false;
      }
    }
    for (uint32_t i = 0; i < g_.bitmap_blocks; i++) {
      uint64_t blk = base + 1 + i;
      auto b = txn_.ReadAs<BitmapBlock>(blk, BlockType::kBitmap, AgLock(ag));
      if (!b.ok()) {
        AddProblem("bad-checksum", blk, 0,
                   fmt::format("AG {} bitmap block {} unreadable: {}", ag, i, b.status().message()),
                   true);
        continue;
      }
      if ((*b)->ag_index != ag || (*b)->index != i) {
        AddProblem("bad-ag", blk, 0,
                   fmt::format("AG {} bitmap block {} claims to be block {} of AG {}", ag, i,
                               +(*b)->index, +(*b)->ag_index),
                   true);
        continue;
      }
      a.bm_ok[i] = true;
      std::memcpy(a.bits.data() + size_t(i) * kBitmapBytes, (*b)->bits, kBitmapBytes);
    }
  }
  txn_.Clear();
}

void Checker::ReadOrphans() {
  for (uint32_t s = 0; s < g_.node_slots; s++) {
    std::vector<uint64_t> inos;
    for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
      uint64_t blk = g_.SlotBlock(s, kSlotOrphan + i);
      auto r = txn_.ReadAs<OrphanBlock>(blk, BlockType::kOrphan, MakeLockId(LockKind::kSlot, s));
      if (!r.ok()) {
        AddProblem("bad-orphan-list", blk, 0,
                   fmt::format("orphan list block {} of slot {} unreadable: {}", i, s,
                               r.status().message()));
        plan_.rewrite_orphan_blocks.push_back(blk);
        continue;
      }
      if ((*r)->count > kOrphansPerBlock) {
        AddProblem("bad-orphan-list", blk, 0,
                   fmt::format("orphan list block {} of slot {} has count {}", i, s, +(*r)->count));
        plan_.clear_orphans.insert(s);
        continue;
      }
      for (uint32_t k = 0; k < (*r)->count; k++) inos.push_back((*r)->ino[k]);
    }
    txn_.Clear();
    std::unordered_set<uint64_t> seen;
    for (uint64_t ino : inos) {
      if (!seen.insert(ino).second) continue;
      if (!ValidBlock(ino)) {
        AddProblem("orphan", ino, ino,
                   fmt::format("orphan list of slot {} names block {}, which cannot be an inode", s,
                               ino));
        plan_.clear_orphans.insert(s);
        continue;
      }
      auto it = inodes_.find(ino);
      if (it != inodes_.end() && it->second.orphan_slot >= 0) {
        AddProblem("orphan", ino, ino,
                   fmt::format("inode {} is on the orphan lists of slots {} and {}", ino,
                               it->second.orphan_slot, s));
        plan_.clear_orphans.insert(s);
        continue;
      }
      inodes_[ino].orphan_slot = int32_t(s);
      Ino& in = ProcessInode(ino);
      if (!in.valid) {
        AddProblem("orphan", ino, ino,
                   fmt::format("orphan list of slot {} names damaged inode {}", s, ino));
        plan_.clear_orphans.insert(s);
      }
    }
  }
}

// Reads, checks and claims one inode and everything it owns except directory
// contents (ProcessDirContents).
Checker::Ino& Checker::ProcessInode(uint64_t ino) {
  Ino& in = inodes_[ino];
  if (in.processed) return in;
  in.processed = true;
  in.lost = lost_walk_;
  MaybeClear();
  auto r = txn_.Read(ino, BlockType::kInode, InodeLock(ino));
  if (!r.ok()) {
    const std::string& m = r.status().message();
    AddProblem(m.find("checksum") != std::string::npos ? "bad-checksum" : "bad-inode", ino, ino, m);
    return in;
  }
  auto Iptr = std::make_unique<InodeBlock>();
  InodeBlock& I = *Iptr;
  std::memcpy(&I, *r, kBlockSize);
  if (!KnownType(I.mode)) {
    AddProblem("bad-inode", ino, ino,
               fmt::format("inode {}: mode {:o} has no known file type", ino, +I.mode));
    return in;
  }
  in.valid = true;
  if (I.nlink == 0 && in.orphan_slot < 0 && BitOf(ino) == 0 && ino != sb_.root_ino) {
    // Freed: whatever still names it is stale. Nothing of it is owned.
    in.free_inode = true;
    in.mode = I.mode;
    return in;
  }
  in.mode = I.mode;
  in.nlink = I.nlink;
  in.flags = I.flags;
  in.data_kind = I.data_kind;
  in.size = I.size;
  in.blocks = I.blocks;
  in.parent = I.parent;
  in.xattr_block = I.xattr_block;
  if (own_[ino] != kOwnNone) {
    // Only a data claim (applied before the walk of unreachable inodes) can be here:
    // the block really holds an inode, the file is fixed by the next round.
    AddProblem("double-use", ino, ino,
               fmt::format("inode {} is also used as {}", ino, OwnName(own_[ino])));
  }
  own_[ino] = kOwnInode;

  const bool is_dir = S_ISDIR(I.mode), is_reg = S_ISREG(I.mode), is_lnk = S_ISLNK(I.mode);
  const uint8_t k = I.data_kind;
  bool kind_ok;
  if (is_dir) {
    kind_ok = k == uint8_t(DataKind::kInline) || k == uint8_t(DataKind::kDirHash);
  } else if (is_reg || is_lnk) {
    kind_ok = k == uint8_t(DataKind::kInline) || k == uint8_t(DataKind::kExtents);
  } else {
    kind_ok = k == uint8_t(DataKind::kInline);
  }
  if (!kind_ok) {
    AddProblem("bad-inode", ino, ino,
               fmt::format("{} {}: data kind {} is not valid for it (its data is lost)",
                           TypeName(I.mode), ino, k));
    in.reset = true;
    if (is_dir) {
      in.rebuild = true;
    } else {
      FixOf(ino).reset_data = true;
    }
  }
  CheckXattrs(ino, I, in);
  if (!is_dir && !in.reset) CheckFileData(ino, I, in);
  return in;
}

void Checker::CheckXattrs(uint64_t ino, const InodeBlock& I, Ino& in) {
  auto tmp = std::make_unique<InodeBlock>();
  std::memcpy(tmp.get(), &I, kBlockSize);
  tmp->xattr_block = 0;
  auto il = xattr::List(txn_, ino, *tmp);
  if (!il.ok()) {
    AddProblem("bad-xattr", ino, ino,
               fmt::format("inode {}: inline extended attributes are damaged (dropped): {}", ino,
                           il.status().message()));
    FixOf(ino).clear_inline_xattr = true;
  }
  if (il.ok()) CheckXattrValues(ino, I, *il);
  if (I.xattr_block == 0) return;
  const uint64_t xb = I.xattr_block;
  std::string why;
  xattr::Entries block_entries;
  if (!ValidBlock(xb)) {
    why = fmt::format("block {} is not in the data area", xb);
  } else {
    tmp->xattr_block = xb;
    tmp->xattr_len = 0;
    auto bl = xattr::List(txn_, ino, *tmp);
    if (!bl.ok()) {
      why = bl.status().message();
    } else if (il.ok() && !xattr::List(txn_, ino, I).ok()) {
      why = "names repeat those of the inline area";
    } else {
      int c = ClaimMeta(xb, kOwnMeta);
      if (c == 2) {
        AddProblem("double-use", xb, ino,
                   fmt::format("inode {}: xattr block {} is also used as {}", ino, xb,
                               OwnName(own_[xb])));
        why = "block used twice";
      }
      block_entries = std::move(bl).value();
    }
  }
  if (why.empty()) {
    in.xattr_kept = true;
    CheckXattrValues(ino, I, block_entries);
    return;
  }
  AddProblem("bad-xattr", xb, ino,
             fmt::format("inode {}: external xattr block {} dropped: {}", ino, xb, why));
  FixOf(ino).drop_xattr_block = true;
}

// Values the filesystem interprets: POSIX ACLs (the kernel would refuse a bad one on
// every permission check) and the application lock table. A bad one is dropped: the
// mode bits still hold, and application locks do not outlive their holders anyway.
void Checker::CheckXattrValues(uint64_t ino, const InodeBlock& I, const xattr::Entries& list) {
  for (const auto& [name, value] : list) {
    std::string why;
    if (name == acl::kAccessName || name == acl::kDefaultName) {
      if (S_ISLNK(I.mode)) {
        why = "an ACL on a symlink";
      } else if (name == acl::kDefaultName && !S_ISDIR(I.mode)) {
        why = "a default ACL on a non-directory";
      } else if (auto a = acl::Decode(value); !a.ok()) {
        why = a.status().message();
      }
    } else if (applock::IsInternalXattr(name)) {
      if (Status st = applock::CheckInternalXattr(name, value); !st.ok()) why = st.message();
    }
    if (why.empty()) continue;
    AddProblem("bad-xattr-value", ino, ino,
               fmt::format("inode {}: extended attribute {} dropped: {}", ino, name, why));
    FixOf(ino).drop_xattrs.push_back(name);
  }
}

void Checker::CheckFileData(uint64_t ino, const InodeBlock& I, Ino& in) {
  const bool special = !S_ISREG(I.mode) && !S_ISLNK(I.mode);
  if (I.data_kind == uint8_t(DataKind::kInline)) {
    uint64_t cap = special ? 0 : kInodeDataSize;
    if (S_ISLNK(I.mode)) cap = std::min<uint64_t>(cap, kMaxSymlink);
    if (I.size > cap) {
      AddProblem("bad-size", ino, ino,
                 fmt::format("{} {}: size {} exceeds its inline data ({} bytes)", TypeName(I.mode),
                             ino, +I.size, cap));
      FixOf(ino).size = cap;
    }
    if (!special) {
      // One memcmp, not a byte loop: every empty file has ~3 KiB of tail to check.
      static const uint8_t kZeros[kInodeDataSize] = {};
      const uint64_t used = std::min<uint64_t>(I.size, cap);
      if (std::memcmp(I.data + used, kZeros, kInodeDataSize - used) != 0) {
        AddProblem("bad-inline", ino, ino,
                   fmt::format("{} {}: bytes after the end of its inline data are not zero",
                               TypeName(I.mode), ino));
        FixOf(ino).zero_inline_tail = true;
      }
    }
    return;
  }
  // Extent tree.
  std::vector<uint64_t> nodes;
  std::vector<Extent> ext;
  Status st = extent::ForEach(
      txn_, ino, I,
      [&](const Extent& e) {
        ext.push_back(e);
        return true;
      },
      &nodes);
  if (!st.ok()) {
    AddProblem("bad-extent", ino, ino,
               fmt::format("{} {}: extent tree damaged ({} extents salvaged): {}",
                           TypeName(I.mode), ino, ext.size(), st.message()));
    in.rewrite = true;
  }
  for (uint64_t n : nodes) {
    int c = ClaimMeta(n, kOwnMeta);
    if (c == 0) continue;
    if (c == 2) {
      AddProblem("double-use", n, ino,
                 fmt::format("{} {}: extent node {} is also used as {}", TypeName(I.mode), ino, n,
                             OwnName(own_[n])));
    } else {
      AddProblem("bad-extent", n, ino,
                 fmt::format("{} {}: extent node {} lies outside the data area", TypeName(I.mode),
                             ino, n));
    }
    in.rewrite = true;
  }
  in.meta_blocks = nodes.size();
  const uint64_t eof = DivUp(I.size, kBlockSize);
  const bool truncating = in.orphan_slot >= 0 && I.nlink > 0;
  bool past_eof = false;
  for (const Extent& e : ext) {
    in.data_blocks += e.len;
    if (e.logical + e.len <= eof) continue;
    if (truncating) {
      in.trim_all = eof;
      in.rewrite = true;
    } else if (!(e.flags & kExtentUnwritten) && !past_eof) {
      past_eof = true;
      AddProblem("bad-extent", ino, ino,
                 fmt::format("{} {}: written data past its end (size {}, extent at file block {} "
                             "+{})",
                             TypeName(I.mode), ino, +I.size, +e.logical, +e.len));
      in.trim_written = eof;
      in.rewrite = true;
    }
  }
  in.claim_begin = claims_.size();
  for (const Extent& e : ext) claims_.push_back(Claim{ino, e, {}, false});
  in.claim_end = claims_.size();
}

void Checker::ProcessDirContents(uint64_t dino) {
  Ino& in = inodes_[dino];
  if (in.contents_done || !in.valid) return;
  in.contents_done = true;
  MaybeClear();
  std::vector<dir::Entry> ents;
  if (!in.reset) {
    auto r = txn_.Read(dino, BlockType::kInode, InodeLock(dino));
    if (!r.ok()) return;  // it was readable a moment ago; nothing changed since
    auto Iptr = std::make_unique<InodeBlock>();
    std::memcpy(Iptr.get(), *r, kBlockSize);
    const InodeBlock& I = *Iptr;
    std::vector<std::string> dprobs;
    (void)dir::Check(txn_, dino, I, &dprobs, [&](const dir::Entry& e) { ents.push_back(e); });
    for (auto& m : dprobs) {
      // A `blocks` field too small is a count to correct (blocks-count), not damage.
      if (m.find("is less than the") != std::string::npos &&
          m.find("directory blocks") != std::string::npos) {
        continue;
      }
      AddProblem("bad-dir", dino, dino, fmt::format("directory {}: {}", PathOf(dino), m));
      in.rebuild = true;
    }
    bool complete = true;
    std::vector<uint64_t> blocks = DirBlocks(txn_, dino, I, &complete);
    for (uint64_t b : blocks) {
      int c = ClaimMeta(b, kOwnMeta);
      if (c == 0) continue;
      if (c == 2) {
        AddProblem("double-use", b, dino,
                   fmt::format("directory {}: block {} is also used as {}", PathOf(dino), b,
                               OwnName(own_[b])));
      } else {
        AddProblem("bad-dir", b, dino,
                   fmt::format("directory {}: block {} lies outside the data area", PathOf(dino),
                               b));
      }
      in.rebuild = true;
    }
    in.meta_blocks = blocks.size();
  }
  if (in.rebuild) {
    // Duplicate names may be salvaged from a damaged overflow chain: keep the first.
    std::unordered_set<std::string> names;
    std::vector<dir::Entry> uniq;
    for (auto& e : ents) {
      if (names.insert(e.name).second) uniq.push_back(std::move(e));
    }
    ents.swap(uniq);
  }
  std::vector<dir::Entry> kept;
  std::vector<std::string> remove;
  std::vector<std::pair<std::string, uint8_t>> retype;
  for (const dir::Entry& e : ents) {
    uint8_t type = e.type;
    bool keep = HandleEntry(dino, e, &type);
    if (!keep) {
      remove.push_back(e.name);
    } else {
      if (type != e.type) retype.emplace_back(e.name, type);
      dir::Entry k = e;
      k.type = type;
      kept.push_back(std::move(k));
    }
  }
  if (in.rebuild) {
    Fix& f = FixOf(dino);
    f.rebuild_dir = true;
    f.entries = std::move(kept);
  } else if (!remove.empty() || !retype.empty()) {
    Fix& f = FixOf(dino);
    f.remove = std::move(remove);
    f.retype = std::move(retype);
  }
}

bool Checker::HandleEntry(uint64_t dino, const dir::Entry& e, uint8_t* type) {
  const uint64_t t = e.ino;
  auto where = [&]() { return fmt::format("directory {}: entry '{}'", PathOf(dino), e.name); };
  if (!ValidBlock(t)) {
    AddProblem("dangling-entry", t, dino,
               fmt::format("{} points at block {}, which cannot be an inode", where(), t));
    return false;
  }
  Ino& ti = ProcessInode(t);
  if (!ti.valid) {
    AddProblem("dangling-entry", t, dino,
               fmt::format("{} points at damaged inode {}", where(), t));
    return false;
  }
  if (ti.free_inode) {
    AddProblem("dangling-entry", t, dino, fmt::format("{} points at free inode {}", where(), t));
    return false;
  }
  const uint8_t want = DirentType(ti.mode);
  if (e.type != want) {
    AddProblem("bad-dirent-type", t, dino,
               fmt::format("{} has type {} but inode {} is a {}", where(), unsigned(e.type), t,
                           TypeName(ti.mode)));
    *type = want;
  }
  if (S_ISDIR(ti.mode)) {
    if (t == sb_.root_ino || t == dino || ti.entry_parent != 0) {
      AddProblem("dir-hardlink", t, dino,
                 fmt::format("{} is a second link to directory {}", where(), t));
      return false;
    }
    if (lost_walk_ && t == walk_root_) {
      AddProblem("dir-hardlink", t, dino,
                 fmt::format("{} names directory {}, which contains it (a cycle)", where(), t));
      return false;
    }
    ti.entry_parent = dino;
    ti.entry_name = e.name;
    ti.refs = 1;
    inodes_[dino].subdirs++;
    if (!ti.contents_done) queue_.push_back(t);
    return true;
  }
  ti.refs++;
  return true;
}

void Checker::Walk() {
  const uint64_t root = sb_.root_ino;
  Ino* r = nullptr;
  if (ValidBlock(root)) r = &ProcessInode(root);
  if (r == nullptr || !r->valid || !S_ISDIR(r->mode)) {
    AddProblem("bad-root", root, root,
               fmt::format("root directory inode {} is damaged or not a directory: everything "
                           "goes to /lost+found",
                           root));
    plan_.root_bad = true;
    if (ValidBlock(root)) own_[root] = kOwnInode;  // rewritten in place by the repair
    return;
  }
  r->entry_parent = root;
  r->refs = 1;
  queue_.push_back(root);
  while (!queue_.empty()) {
    uint64_t d = queue_.front();
    queue_.pop_front();
    ProcessDirContents(d);
  }
}

void Checker::ApplyClaims() {
  for (; claims_applied_ < claims_.size(); claims_applied_++) {
    Claim& c = claims_[claims_applied_];
    const Extent& e = c.e;
    uint64_t bad = 0, dup = 0, first_dup = 0;
    uint8_t dup_as = 0;
    std::vector<Extent> kept;
    Extent cur{};
    bool open = false;
    auto close = [&]() {
      if (open) kept.push_back(cur);
      open = false;
    };
    const uint64_t end = e.physical + e.len;
    if (end < e.physical || end > g_.total_blocks) {
      bad = e.len;
    } else {
      for (uint64_t b = e.physical; b < end; b++) {
        bool ok = false;
        if (!ValidBlock(b)) {
          bad++;
        } else if (own_[b] != kOwnNone) {
          if (dup++ == 0) {
            first_dup = b;
            dup_as = own_[b];
          }
        } else {
          own_[b] = kOwnData;
          ok = true;
        }
        if (ok) {
          if (!open) {
            cur = Extent{e.logical + (b - e.physical), b, 0, e.flags};
            open = true;
          }
          cur.len++;
        } else {
          close();
        }
      }
      close();
    }
    if (bad == 0 && dup == 0) continue;
    Ino& in = inodes_[c.ino];
    in.rewrite = true;
    c.partial = true;
    c.kept = std::move(kept);
    if (bad) {
      AddProblem("bad-extent", e.physical, c.ino,
                 fmt::format("{}: {} blocks of the extent at file block {} (+{}) at block {} lie "
                             "outside the data area",
                             Describe(c.ino), bad, +e.logical, +e.len, +e.physical));
    }
    if (dup) {
      AddProblem("double-use", first_dup, c.ino,
                 fmt::format("{}: {} blocks of the extent at file block {} (+{}) at block {} are "
                             "already used (block {} as {}); dropped from this file",
                             Describe(c.ino), dup, +e.logical, +e.len, +e.physical, first_dup,
                             OwnName(dup_as)));
    }
  }
}

void Checker::FindLost() {
  std::vector<uint64_t> candidates;
  // Linked inodes on orphan lists that no directory names.
  for (auto& [ino, in] : inodes_) {
    if (in.valid && in.orphan_slot >= 0 && in.nlink > 0 && in.refs == 0 &&
        ino != sb_.root_ino) {
      candidates.push_back(ino);
    }
  }
  // Blocks marked in use that nothing owns and that hold an inode.
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) {
    const AgState& a = ags_[ag];
    const uint64_t base = g_.AgStart(ag);
    for (uint64_t i = 1 + g_.bitmap_blocks; i < g_.AgSize(ag); i++) {
      uint64_t b = base + i;
      if (own_[b] != kOwnNone || !a.bm_ok[i / kBitsPerBitmap] || !BitSet(a.bits, i)) continue;
      if (inodes_.count(b)) continue;
      MaybeClear();
      auto r = txn_.ReadAs<InodeBlock>(b, BlockType::kInode, InodeLock(b));
      if (!r.ok()) continue;
      const InodeBlock* I = *r;
      if (!KnownType(I->mode)) {
        AddProblem("bad-inode", b, b,
                   fmt::format("unreferenced inode {} has no known file type; freed", b), true);
      } else if (I->nlink == 0) {
        AddProblem("orphan", b, b,
                   fmt::format("{} {} was unlinked but never freed", TypeName(I->mode), b), true);
      } else {
        candidates.push_back(b);
      }
    }
  }
  std::sort(candidates.begin(), candidates.end());
  lost_walk_ = true;
  for (uint64_t c : candidates) {
    Ino& in = ProcessInode(c);
    in.lost = true;
    walk_root_ = c;
    if (in.valid && S_ISDIR(in.mode) && !in.contents_done) {
      queue_.push_back(c);
      while (!queue_.empty()) {
        uint64_t d = queue_.front();
        queue_.pop_front();
        ProcessDirContents(d);
      }
    }
  }
  lost_walk_ = false;
  ApplyClaims();
  ResolveLost(candidates);
}

// Drops the entry through which `dir` was accepted (breaking a cycle of lost dirs).
void Checker::Detach(uint64_t dir) {
  Ino& in = inodes_[dir];
  uint64_t p = in.entry_parent;
  Fix& f = FixOf(p);
  if (f.rebuild_dir) {
    f.entries.erase(std::remove_if(f.entries.begin(), f.entries.end(),
                                   [&](const dir::Entry& e) { return e.name == in.entry_name; }),
                    f.entries.end());
  } else {
    f.remove.push_back(in.entry_name);
  }
  inodes_[p].subdirs--;
  in.entry_parent = 0;
  in.refs = 0;
  in.entry_name.clear();
}

void Checker::ResolveLost(const std::vector<uint64_t>& candidates) {
  // Directories reached only by the lost walk may form cycles: break them so that
  // every lost directory hangs below one that goes to /lost+found.
  std::unordered_map<uint64_t, int> state;  // 1: on the current path, 2: resolved
  for (auto& [ino, in] : inodes_) {
    if (!in.valid || !in.lost || !S_ISDIR(in.mode) || state[ino] == 2) continue;
    std::vector<uint64_t> path;
    uint64_t cur = ino;
    for (;;) {
      Ino& c = inodes_[cur];
      if (cur == sb_.root_ino || !c.lost || c.entry_parent == 0 || state[cur] == 2) break;
      if (state[cur] == 1) {
        Detach(cur);
        break;
      }
      state[cur] = 1;
      path.push_back(cur);
      cur = c.entry_parent;
    }
    for (uint64_t p : path) state[p] = 2;
  }
  for (uint64_t c : candidates) {
    Ino& in = inodes_[c];
    if (!in.valid || in.lost_top) continue;
    bool top = S_ISDIR(in.mode) ? in.entry_parent == 0 : in.refs == 0;
    if (!top) continue;
    in.lost_top = true;
    plan_.lost.push_back(c);
    AddProblem("unreachable", c, c,
               fmt::format("{} {} (nlink {}) is not reachable from the root; goes to /lost+found "
                           "as #{}",
                           TypeName(in.mode), c, in.nlink, c));
  }
}

void Checker::FinalInodeChecks() {
  std::vector<uint64_t> order;
  order.reserve(inodes_.size());
  for (auto& [ino, in] : inodes_) {
    if (in.valid && !in.free_inode) order.push_back(ino);
  }
  std::sort(order.begin(), order.end());
  // Claims of each inode, for rewrites.
  for (uint64_t ino : order) {
    Ino& in = inodes_[ino];
    const bool is_dir = S_ISDIR(in.mode);
    // Orphan lists.
    if (in.orphan_slot >= 0) {
      const uint32_t s = uint32_t(in.orphan_slot);
      plan_.clear_orphans.insert(s);
      if (in.nlink == 0 && in.refs == 0) {
        AddProblem("orphan", ino, ino,
                   fmt::format("{} {} was unlinked while open and never freed (orphan list of "
                               "slot {})",
                               TypeName(in.mode), ino, s));
        in.freeing = true;
        plan_.fixes.erase(ino);
        continue;
      }
      if (in.nlink == 0) {
        AddProblem("orphan", ino, ino,
                   fmt::format("{} is linked but on the orphan list of slot {}", Describe(ino), s));
      } else {
        AddProblem("orphan", ino, ino,
                   fmt::format("{}: a truncation was not finished (orphan list of slot {})",
                               Describe(ino), s));
      }
    }
    // Link count.
    uint64_t want_nlink = is_dir ? 2 + in.subdirs : in.refs + (in.lost_top ? 1 : 0);
    if (in.nlink != want_nlink) {
      AddProblem("nlink", ino, ino,
                 fmt::format("{}: link count {} but {} expected", Describe(ino), in.nlink,
                             want_nlink));
      FixOf(ino).nlink = uint32_t(std::min<uint64_t>(want_nlink, UINT32_MAX));
    }
    if (in.flags & kInodeFlagOrphan) {
      if (in.orphan_slot < 0) {
        AddProblem("bad-flags", ino, ino,
                   fmt::format("{} is marked orphan but is on no orphan list", Describe(ino)));
      }
      FixOf(ino).clear_orphan_flag = true;
    }
    // Parent.
    if (is_dir && !in.lost_top) {
      uint64_t want = ino == sb_.root_ino ? sb_.root_ino : in.entry_parent;
      if (want != 0 && in.parent != want) {
        AddProblem("bad-parent", ino, ino,
                   fmt::format("{}: parent field {} but it is in directory {}", Describe(ino),
                               in.parent, want));
        FixOf(ino).parent = want;
      }
    }
    // Blocks.
    const uint64_t cur = 1 + in.meta_blocks + in.data_blocks + (in.xattr_block ? 1 : 0);
    if (!in.rewrite && !in.rebuild && !in.reset && in.blocks != cur) {
      AddProblem("blocks-count", ino, ino,
                 fmt::format("{}: blocks {} but it owns {}", Describe(ino), in.blocks, cur));
    }
    if (in.rewrite) {
      Fix& f = FixOf(ino);
      f.rewrite_extents = true;
      std::vector<Extent> ext;
      for (size_t i = in.claim_begin; i < in.claim_end; i++) {
        const Claim& c = claims_[i];
        if (c.partial) {
          ext.insert(ext.end(), c.kept.begin(), c.kept.end());
        } else {
          ext.push_back(c.e);
        }
      }
      if (in.trim_all != UINT64_MAX) {
        ext = TrimAt(ext, in.trim_all, [](const Extent&) { return true; });
      }
      if (in.trim_written != UINT64_MAX) {
        ext = TrimAt(ext, in.trim_written,
                     [](const Extent& e) { return !(e.flags & kExtentUnwritten); });
      }
      f.extents = std::move(ext);
    } else if (!in.rebuild && !in.reset) {
      const uint64_t planned = 1 + in.meta_blocks + in.data_blocks + (in.xattr_kept ? 1 : 0);
      if (planned != in.blocks) FixOf(ino).blocks = planned;
    } else if (in.reset && !is_dir) {
      FixOf(ino).blocks = 1 + (in.xattr_kept ? 1 : 0);
    }
  }
}

std::vector<uint8_t> Checker::WantedBits(uint32_t ag, bool keep_set) const {
  const AgState& a = ags_[ag];
  const uint64_t base = g_.AgStart(ag);
  const uint64_t size = g_.AgSize(ag);
  std::vector<uint8_t> bits(size_t(g_.bitmap_blocks) * kBitmapBytes, 0);
  const uint64_t nbits = uint64_t(g_.bitmap_blocks) * kBitsPerBitmap;
  for (uint64_t i = 0; i < nbits; i++) {
    bool set;
    if (i >= size) {
      set = true;
    } else {
      set = own_[base + i] != kOwnNone;
      if (!set && keep_set && a.bm_ok[i / kBitsPerBitmap]) set = BitSet(a.bits, i);
    }
    if (set) SetBit(bits, i);
  }
  return bits;
}

void Checker::CheckBitmaps() {
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) {
    const AgState& a = ags_[ag];
    const uint64_t base = g_.AgStart(ag);
    const uint64_t size = g_.AgSize(ag);
    const uint64_t nbits = uint64_t(g_.bitmap_blocks) * kBitsPerBitmap;
    uint64_t zeros = 0;
    bool all_ok = true;
    // Runs of leaked / missing bits.
    int run_kind = 0;  // 1 leak, 2 missing
    uint64_t run_start = 0, run_len = 0;
    uint8_t run_own = 0;
    auto flush = [&]() {
      if (run_kind == 1) {
        AddProblem("bitmap-leak", base + run_start, 0,
                   run_len == 1
                       ? fmt::format("block {} is marked in use but nothing owns it", base + run_start)
                       : fmt::format("blocks {}-{} ({}) are marked in use but nothing owns them",
                                     base + run_start, base + run_start + run_len - 1, run_len),
                   true);
      } else if (run_kind == 2) {
        AddProblem("bitmap-missing", base + run_start, 0,
                   run_len == 1 ? fmt::format("block {} ({}) is in use but marked free",
                                              base + run_start, OwnName(run_own))
                                : fmt::format("blocks {}-{} ({}, first one {}) are in use but "
                                              "marked free",
                                              base + run_start, base + run_start + run_len - 1,
                                              run_len, OwnName(run_own)),
                   true);
      }
      run_kind = 0;
      run_len = 0;
    };
    bool tail_clear = false;
    for (uint64_t i = 0; i < nbits; i++) {
      if (!a.bm_ok[i / kBitsPerBitmap]) {
        all_ok = false;
        flush();
        continue;
      }
      const bool bit = BitSet(a.bits, i);
      if (i >= size) {
        if (!bit) tail_clear = true;
        continue;
      }
      if (!bit) zeros++;
      const bool owned = own_[base + i] != kOwnNone;
      int k = (bit && !owned) ? 1 : (!bit && owned) ? 2 : 0;
      if (k != run_kind) {
        flush();
        if (k != 0) {
          run_kind = k;
          run_start = i;
          run_own = own_[base + i];
        }
      }
      if (k != 0) run_len++;
    }
    flush();
    if (tail_clear) {
      AddProblem("bitmap-missing", base + size, 0,
                 fmt::format("AG {}: bits for blocks past its end ({} blocks) are not all set", ag,
                             size),
                 true);
    }
    if (a.hdr_ok && all_ok && a.hdr.free_blocks != zeros) {
      AddProblem("ag-count", base, 0,
                 fmt::format("AG {}: header counts {} free blocks, its bitmap {}", ag,
                             a.hdr.free_blocks, zeros),
                 true);
    }
  }
}

void Checker::FillStats(FsckReport* r) const {
  r->inodes = r->directories = r->files = r->symlinks = r->other = 0;
  for (auto& [ino, in] : inodes_) {
    if (!in.valid || in.freeing || in.free_inode) continue;
    r->inodes++;
    if (S_ISDIR(in.mode)) {
      r->directories++;
    } else if (S_ISREG(in.mode)) {
      r->files++;
    } else if (S_ISLNK(in.mode)) {
      r->symlinks++;
    } else {
      r->other++;
    }
  }
  r->data_blocks_used = r->metadata_blocks_used = r->free_blocks = 0;
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) {
    const uint64_t base = g_.AgStart(ag);
    for (uint64_t i = 0; i < g_.AgSize(ag); i++) {
      uint8_t o = own_[base + i];
      if (o == kOwnNone) {
        r->free_blocks++;
      } else if (o == kOwnData) {
        r->data_blocks_used++;
      } else {
        r->metadata_blocks_used++;
      }
    }
  }
}

}  // namespace agorafs::fsck_internal
