// fsck driver: superblock copies, node slots and journals; the repair rounds; the
// report. The per-object checks are in checker.cc.
#include "fsck/fsck.h"
#include "util/clock.h"
#include "util/json.h"

#include <dirent.h>
#include <fmt/format.h>
#include <sys/random.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>
#include <thread>
#include <tuple>

#include "cache/meta_store.h"
#include "dir/dir.h"
#include "fs/inode.h"
#include "fs/super.h"
#include "fs/xattr.h"
#include "fsck/checker.h"
#include "fsck/fsck_internal.h"
#include "journal/journal.h"
#include "lock/lock_manager.h"

namespace agorafs {

using fsck_internal::Checker;
using fsck_internal::Fix;
using fsck_internal::Overlay;
using fsck_internal::Plan;
using fsck_internal::Problem;

namespace {

constexpr int kMaxRounds = 6;
constexpr uint32_t kFsckSlot = 0;  // the slot whose journal repairs go through

Problem MakeProblem(std::string kind, uint64_t block, uint64_t ino, std::string detail) {
  Problem p;
  p.p.kind = std::move(kind);
  p.p.block = block;
  p.p.ino = ino;
  p.p.detail = std::move(detail);
  return p;
}

std::string HostOf(const SlotBlock& s) { return std::string(s.host, strnlen(s.host, sizeof(s.host))); }

Status WriteSealed(BlockDevice* dev, uint64_t blk, uint8_t* data) {
  SealBlock(data);
  return dev->Write(blk * kBlockSize, data, kBlockSize);
}

// ---------------------------------------------------------------------------------
// Superblock copies, node slots, journals.

struct Global {
  std::vector<Problem> problems;
  std::vector<uint64_t> bad_super;      // copies to rewrite
  std::vector<uint32_t> bad_slots;      // heartbeat blocks to rewrite (free)
  std::vector<uint32_t> crashed;        // left mounted by a node that is gone
  std::vector<uint32_t> format_journal;  // headers unusable
  std::vector<uint32_t> replay;         // journals to replay
  std::vector<uint32_t> refused;        // replay refuses: replay what it can, then format
  std::vector<std::pair<uint32_t, uint32_t>> header_copies;  // (slot, copy) to rewrite
  Overlay overlay;
};

Result<SlotBlock> ReadSlot(BlockDevice* dev, const Geometry& g, const Uuid& uuid, uint32_t s,
                           std::string* why) {
  AlignedBuffer b(kBlockSize);
  uint64_t blk = g.SlotBlock(s, kSlotHeartbeat);
  AGFS_RETURN_IF_ERROR(dev->Read(blk * kBlockSize, b.data(), kBlockSize));
  SlotBlock sb;
  std::memcpy(&sb, b.data(), kBlockSize);
  Status v = VerifyBlock(b.data(), BlockType::kSlot, blk, uuid);
  if (!v.ok()) {
    *why = v.message();
  } else if (sb.slot != s) {
    *why = fmt::format("names slot {}", uint32_t(sb.slot));
  } else if (sb.state != kSlotFree && sb.state != kSlotMounted) {
    *why = fmt::format("unknown state {}", uint32_t(sb.state));
  } else {
    why->clear();
  }
  return sb;
}

Status WriteSlot(BlockDevice* dev, const Geometry& g, const Uuid& uuid, uint32_t s,
                 uint32_t state, const std::string& host) {
  std::string why;
  auto cur = ReadSlot(dev, g, uuid, s, &why);
  if (!cur.ok()) return cur.status();
  SlotBlock sb = *cur;
  if (!why.empty()) {
    std::memset(&sb, 0, sizeof(sb));
    sb.slot = s;
  }
  sb.state = state;
  if (state == kSlotMounted) {
    sb.generation++;
    sb.counter = 1;
    sb.mount_ns = RealtimeNs();
    std::memset(sb.host, 0, sizeof(sb.host));
    std::strncpy(sb.host, host.c_str(), sizeof(sb.host) - 1);
  }
  AlignedBuffer b(kBlockSize);
  std::memcpy(b.data(), &sb, kBlockSize);
  const uint64_t blk = g.SlotBlock(s, kSlotHeartbeat);
  InitHeader(b.data(), BlockType::kSlot, blk, uuid);
  AGFS_RETURN_IF_ERROR(WriteSealed(dev, blk, b.data()));
  return dev->Flush();
}

// kBusy when one of the `mounted` slots (as read in `before`) is alive: a live node
// moves its counter every interval; a crashed one stands still.
Status WaitForLiveNode(BlockDevice* dev, const Superblock& sb, const std::vector<SlotBlock>& before,
                       const std::vector<uint32_t>& mounted, uint32_t heartbeat_ms_override,
                       const char* tool) {
  if (mounted.empty()) return Status::Ok();
  const Geometry g = GeometryOf(sb);
  const Uuid uuid = SuperUuid(sb);
  uint32_t interval = heartbeat_ms_override ? heartbeat_ms_override : sb.heartbeat_interval_ms;
  std::this_thread::sleep_for(std::chrono::milliseconds(2 * uint64_t(interval) + 200));
  for (uint32_t s : mounted) {
    std::string why;
    AGFS_ASSIGN_OR_RETURN(SlotBlock now, ReadSlot(dev, g, uuid, s, &why));
    if (why.empty() && (now.counter != before[s].counter ||
                        now.generation != before[s].generation || now.state != before[s].state)) {
      return Err(Code::kBusy, fmt::format("{} is mounted by host '{}' (node slot {}): unmount "
                                          "it everywhere before running {}",
                                          dev->Name(), HostOf(now), s, tool));
    }
  }
  return Status::Ok();
}

Result<Global> CheckGlobal(BlockDevice* dev, const Superblock& sb, const FsckOptions& opts) {
  Global gl;
  const Geometry g = GeometryOf(sb);
  const Uuid uuid = SuperUuid(sb);
  AlignedBuffer b(kBlockSize), want(kBlockSize);

  // Superblock copies.
  for (uint64_t c : {uint64_t(0), uint64_t(1), g.total_blocks - 1}) {
    AGFS_RETURN_IF_ERROR(dev->Read(c * kBlockSize, b.data(), kBlockSize));
    std::memcpy(want.data(), &sb, kBlockSize);
    InitHeader(want.data(), BlockType::kSuper, c, uuid);
    SealBlock(want.data());
    if (std::memcmp(b.data(), want.data(), kBlockSize) == 0) continue;
    Status v = VerifyBlock(b.data(), BlockType::kSuper, c, uuid);
    gl.problems.push_back(MakeProblem(
        "bad-super", c, 0,
        fmt::format("superblock copy at block {} {}", c,
                    v.ok() ? "differs from the one in use" : "is damaged: " + v.message())));
    gl.bad_super.push_back(c);
  }

  // Node slots.
  std::vector<SlotBlock> slots(g.node_slots);
  std::vector<uint32_t> mounted;
  for (uint32_t s = 0; s < g.node_slots; s++) {
    std::string why;
    AGFS_ASSIGN_OR_RETURN(slots[s], ReadSlot(dev, g, uuid, s, &why));
    if (!why.empty()) {
      gl.problems.push_back(MakeProblem("bad-slot", g.SlotBlock(s, kSlotHeartbeat), 0,
                                        fmt::format("node slot {} heartbeat block: {}", s, why)));
      gl.bad_slots.push_back(s);
      continue;
    }
    if (slots[s].state == kSlotMounted) mounted.push_back(s);
  }
  AGFS_RETURN_IF_ERROR(WaitForLiveNode(dev, sb, slots, mounted, opts.heartbeat_ms_override,
                                       "fsck"));

  // Journals.
  for (uint32_t s = 0; s < g.node_slots; s++) {
    AGFS_ASSIGN_OR_RETURN(auto js, fsck_internal::ScanJournal(dev, g, uuid, s));
    const uint64_t region = g.JournalStart(s);
    const bool is_mounted = std::find(mounted.begin(), mounted.end(), s) != mounted.end();
    if (!js.header_ok) {
      gl.problems.push_back(
          MakeProblem("bad-journal", region, 0, fmt::format("journal of slot {}: {}", s, js.error)));
      gl.format_journal.push_back(s);
    } else if (js.damaged_copy >= 0) {
      gl.problems.push_back(MakeProblem(
          "bad-journal", region + uint64_t(js.damaged_copy), 0,
          fmt::format("journal of slot {}: header copy {} is unusable ({}); the other is used",
                      s, js.damaged_copy, js.damaged_why)));
      gl.header_copies.push_back({s, uint32_t(js.damaged_copy)});
    }
    if (js.header_ok && js.replay_refused) {
      gl.problems.push_back(MakeProblem(
          "bad-journal", region, 0,
          fmt::format("journal of slot {}: replay would stop at a damaged transaction: {}", s,
                      js.error)));
      gl.refused.push_back(s);
    }
    if (is_mounted) {
      gl.crashed.push_back(s);
      gl.problems.push_back(MakeProblem(
          "journal-needs-replay", region, 0,
          fmt::format("journal of slot {} needs replay: the slot was left mounted by host '{}', "
                      "which is gone ({} committed transactions, {} blocks)",
                      s, HostOf(slots[s]), js.transactions, js.blocks)));
      if (js.header_ok && !js.replay_refused) gl.replay.push_back(s);
    } else if (js.transactions > 0) {
      gl.problems.push_back(MakeProblem(
          "journal-needs-replay", region, 0,
          fmt::format("journal of slot {} needs replay: it holds {} committed transactions ({} "
                      "blocks) that were never written home",
                      s, js.transactions, js.blocks)));
      if (!js.replay_refused) gl.replay.push_back(s);
    }
    for (auto& [home, data] : js.overlay) gl.overlay[home] = data;
  }
  return gl;
}

Status RepairGlobal(BlockDevice* dev, const Superblock& sb, const Global& gl,
                    FsckReport* report) {
  const Geometry g = GeometryOf(sb);
  const Uuid uuid = SuperUuid(sb);
  AlignedBuffer b(kBlockSize);
  for (uint64_t c : gl.bad_super) {
    std::memcpy(b.data(), &sb, kBlockSize);
    InitHeader(b.data(), BlockType::kSuper, c, uuid);
    AGFS_RETURN_IF_ERROR(WriteSealed(dev, c, b.data()));
  }
  for (uint32_t s : gl.bad_slots) {
    std::memset(b.data(), 0, kBlockSize);
    uint64_t blk = g.SlotBlock(s, kSlotHeartbeat);
    InitHeader(b.data(), BlockType::kSlot, blk, uuid);
    reinterpret_cast<SlotBlock*>(b.data())->slot = s;
    AGFS_RETURN_IF_ERROR(WriteSealed(dev, blk, b.data()));
  }
  AGFS_RETURN_IF_ERROR(dev->Flush());
  for (uint32_t s : gl.format_journal) AGFS_RETURN_IF_ERROR(Journal::Format(dev, g, uuid, s));
  for (auto [s, copy] : gl.header_copies) {
    // The damaged copy becomes the good one with the update before it: same tail, and
    // the good copy stays the newest (the journal writes copy `update % 2`).
    const uint64_t region = g.JournalStart(s);
    AGFS_RETURN_IF_ERROR(
        dev->Read((region + (1 - copy)) * kBlockSize, b.data(), kBlockSize));
    auto* h = reinterpret_cast<JournalHeader*>(b.data());
    if (h->update > 0) h->update--;
    InitHeader(b.data(), BlockType::kJournalHeader, region + copy, uuid);
    AGFS_RETURN_IF_ERROR(WriteSealed(dev, region + copy, b.data()));
  }
  AGFS_RETURN_IF_ERROR(dev->Flush());
  std::vector<uint32_t> replay = gl.replay;
  replay.insert(replay.end(), gl.refused.begin(), gl.refused.end());
  for (uint32_t s : replay) {
    auto j = Journal::Open(dev, g, uuid, s, 0);
    if (!j.ok()) return j.status();
    auto r = (*j)->Replay();
    if (r.ok()) {
      report->journal_transactions_replayed += r->transactions;
    } else if (r.status().Is(Code::kCorruption)) {
      // What could be replayed was; the rest is unusable: start the journal afresh.
      AGFS_RETURN_IF_ERROR(dev->Flush());
      AGFS_RETURN_IF_ERROR(Journal::Format(dev, g, uuid, s));
    } else {
      return r.status();
    }
  }
  return dev->Flush();
}

// ---------------------------------------------------------------------------------
// Repairs through the journal.

class Repairer {
 public:
  Repairer(BlockDevice* dev, const Superblock& sb)
      : dev_(dev), sb_(sb), g_(GeometryOf(sb)), uuid_(SuperUuid(sb)) {}
  ~Repairer() { (void)CloseStore(); }

  Status Start() {
    auto j = Journal::Open(dev_, g_, uuid_, kFsckSlot, 0);
    if (!j.ok()) return j.status();
    journal_ = std::move(j).value();
    auto r = journal_->Replay();
    if (!r.ok()) return r.status();
    return Status::Ok();
  }

  // Applies one round's plan. `notes` collects fixes that failed (they stay problems).
  Status ApplyRound(const Checker& c, std::vector<std::string>* notes);

 private:
  Status OpenStore() {
    store_ = std::make_unique<MetaStore>(dev_, sb_, journal_.get(), &locks_,
                                         StoreOptions{4096, 1000, false});
    return store_->Init();
  }
  Status CloseStore() {
    if (!store_) return Status::Ok();
    Status st = store_->failed();
    if (st.ok()) st = store_->Sync();
    store_->Stop();
    store_.reset();
    return st;
  }
  // kIOError and a failed store end the repair; anything else is noted.
  Status Note(const Status& st, const std::string& what, std::vector<std::string>* notes) {
    if (st.ok()) return st;
    if (st.Is(Code::kIOError) || !store_->failed().ok()) {
      return Err(st.code(), what + ": " + st.message());
    }
    notes->push_back(what + ": " + st.ToString());
    return Status::Ok();
  }

  Status WriteRoot();
  Status DirectFixes(const Checker& c);
  Status ClearOrphans(const Plan& p);
  Status FixBitmaps(const Checker& c, bool exact);
  Status FixInode(uint64_t ino, const Fix& f);
  Status FixDir(uint64_t ino, const Fix& f, std::vector<std::string>* notes);
  Status AttachLost(const std::vector<uint64_t>& lost, std::vector<std::string>* notes);

  BlockDevice* dev_;
  Superblock sb_;
  Geometry g_;
  Uuid uuid_;
  LocalLockManager locks_;
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<MetaStore> store_;
};

Status Repairer::WriteRoot() {
  AlignedBuffer b(kBlockSize);
  InitHeader(b.data(), BlockType::kInode, sb_.root_ino, uuid_);
  auto* root = reinterpret_cast<InodeBlock*>(b.data());
  InitInodeCore(root, S_IFDIR | 0755, 0, 0, 1, NowTs());
  root->parent = sb_.root_ino;
  root->blocks = 1;
  if (getrandom(&root->hash_seed, sizeof(root->hash_seed), 0) != sizeof(root->hash_seed)) {
    root->hash_seed = 0x9E3779B97F4A7C15ull;
  }
  dir::InitEmpty(root);
  AGFS_RETURN_IF_ERROR(WriteSealed(dev_, sb_.root_ino, b.data()));
  return dev_->Flush();
}

// Blocks that cannot be read cannot go through the journal (the cache verifies
// them first): they are rebuilt in place while no store is open.
Status Repairer::DirectFixes(const Checker& c) {
  AlignedBuffer b(kBlockSize);
  for (uint64_t blk : c.plan().rewrite_orphan_blocks) {
    std::memset(b.data(), 0, kBlockSize);
    InitHeader(b.data(), BlockType::kOrphan, blk, uuid_);
    AGFS_RETURN_IF_ERROR(WriteSealed(dev_, blk, b.data()));
  }
  const bool exact = !c.structural();
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) {
    const auto& a = c.ags()[ag];
    bool all_ok = a.hdr_ok;
    for (bool ok : a.bm_ok) all_ok = all_ok && ok;
    if (all_ok) continue;
    const uint64_t base = g_.AgStart(ag);
    std::vector<uint8_t> bits = c.WantedBits(ag, !exact);
    for (uint32_t i = 0; i < g_.bitmap_blocks; i++) {
      if (a.bm_ok[i]) continue;
      std::memset(b.data(), 0, kBlockSize);
      InitHeader(b.data(), BlockType::kBitmap, base + 1 + i, uuid_);
      auto* bm = reinterpret_cast<BitmapBlock*>(b.data());
      bm->ag_index = ag;
      bm->index = i;
      std::memcpy(bm->bits, bits.data() + size_t(i) * kBitmapBytes, kBitmapBytes);
      AGFS_RETURN_IF_ERROR(WriteSealed(dev_, base + 1 + i, b.data()));
    }
    if (!a.hdr_ok) {
      uint64_t zeros = 0;
      for (uint64_t i = 0; i < g_.AgSize(ag); i++) zeros += !(bits[i >> 3] & (1u << (i & 7)));
      std::memset(b.data(), 0, kBlockSize);
      InitHeader(b.data(), BlockType::kAgHeader, base, uuid_);
      auto* h = reinterpret_cast<AgHeader*>(b.data());
      h->ag_index = ag;
      h->blocks = g_.AgSize(ag);
      h->free_blocks = zeros;
      AGFS_RETURN_IF_ERROR(WriteSealed(dev_, base, b.data()));
    }
  }
  return dev_->Flush();
}

Status Repairer::ClearOrphans(const Plan& p) {
  for (uint32_t s : p.clear_orphans) {
    auto h = store_->Begin(false, 4);
    for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
      auto w = h->WriteAs<OrphanBlock>(g_.SlotBlock(s, kSlotOrphan + i), BlockType::kOrphan,
                                       MakeLockId(LockKind::kSlot, s));
      if (!w.ok()) return w.status();
      (*w)->count = 0;
      (*w)->pad = 0;
      std::memset((*w)->ino, 0, sizeof((*w)->ino));
    }
  }
  return Status::Ok();
}

Status Repairer::FixBitmaps(const Checker& c, bool exact) {
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) {
    const auto& a = c.ags()[ag];
    const uint64_t base = g_.AgStart(ag);
    std::vector<uint8_t> bits = c.WantedBits(ag, !exact);
    uint64_t zeros = 0;
    for (uint64_t i = 0; i < g_.AgSize(ag); i++) zeros += !(bits[i >> 3] & (1u << (i & 7)));
    bool header = !a.hdr_ok || a.hdr.free_blocks != zeros;
    std::vector<uint32_t> changed;
    for (uint32_t i = 0; i < g_.bitmap_blocks; i++) {
      if (!a.bm_ok[i] || std::memcmp(a.bits.data() + size_t(i) * kBitmapBytes,
                                     bits.data() + size_t(i) * kBitmapBytes, kBitmapBytes) != 0) {
        changed.push_back(i);
      }
    }
    if (!header && changed.empty()) continue;
    auto h = store_->Begin(false, uint32_t(std::min<size_t>(changed.size() + 2, 64)));
    for (uint32_t i : changed) {
      auto w = h->WriteAs<BitmapBlock>(base + 1 + i, BlockType::kBitmap, AgLock(ag));
      if (!w.ok()) return w.status();
      std::memcpy((*w)->bits, bits.data() + size_t(i) * kBitmapBytes, kBitmapBytes);
    }
    auto w = h->WriteAs<AgHeader>(base, BlockType::kAgHeader, AgLock(ag));
    if (!w.ok()) return w.status();
    (*w)->ag_index = ag;
    (*w)->blocks = g_.AgSize(ag);
    (*w)->free_blocks = zeros;
  }
  return Status::Ok();
}

Status Repairer::FixInode(uint64_t ino, const Fix& f) {
  uint32_t credits = 8;
  if (f.rewrite_extents) {
    credits += uint32_t(std::min<size_t>(48, 2 * (f.extents.size() / kExtentNodeLeafMax + 1)));
  }
  auto h = store_->Begin(false, credits);
  auto w = h->WriteAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
  if (!w.ok()) return w.status();
  InodeBlock* I = *w;
  if (f.drop_xattr_block) I->xattr_block = 0;
  if (f.clear_inline_xattr) {
    std::memset(I->xattr, 0, kInodeXattrSize);
    I->xattr_len = 0;
  }
  if (f.reset_data) {
    std::memset(I->data, 0, kInodeDataSize);
    I->data_kind = uint8_t(DataKind::kInline);
    I->size = 0;
  }
  if (f.size) I->size = *f.size;
  if (f.zero_inline_tail && I->data_kind == uint8_t(DataKind::kInline)) {
    uint64_t used = std::min<uint64_t>(I->size, kInodeDataSize);
    std::memset(I->data + used, 0, kInodeDataSize - used);
  }
  if (f.nlink) I->nlink = *f.nlink;
  if (f.parent) I->parent = *f.parent;
  if (f.clear_orphan_flag) I->flags &= ~kInodeFlagOrphan;
  if (f.blocks) I->blocks = *f.blocks;
  if (f.rewrite_extents) {
    auto r = fsck_internal::WriteExtentTree(*h, ino, I, f.extents);
    if (!r.ok()) return r.status();
  }
  if (f.rebuild_dir) {
    dir::InitEmpty(I);
    I->blocks = 1 + (I->xattr_block != 0 ? 1 : 0);
  }
  if (!f.drop_xattrs.empty()) {
    auto l = xattr::List(*h, ino, *I);
    if (!l.ok()) return l.status();
    xattr::Entries kept;
    for (auto& e : *l) {
      if (std::find(f.drop_xattrs.begin(), f.drop_xattrs.end(), e.first) == f.drop_xattrs.end()) {
        kept.push_back(std::move(e));
      }
    }
    AGFS_RETURN_IF_ERROR(xattr::Store(*h, ino, I, kept));
  }
  return Status::Ok();
}

Status Repairer::FixDir(uint64_t dino, const Fix& f, std::vector<std::string>* notes) {
  auto dir_op = [&](const std::string& what, auto&& fn) -> Status {
    auto h = store_->Begin(false, 64);
    auto w = h->WriteAs<InodeBlock>(dino, BlockType::kInode, InodeLock(dino));
    Status st = w.ok() ? fn(*h, *w) : w.status();
    return Note(st, fmt::format("directory {}: {}", dino, what), notes);
  };
  if (f.rebuild_dir) {
    for (const dir::Entry& e : f.entries) {
      AGFS_RETURN_IF_ERROR(dir_op("re-adding '" + e.name + "'", [&](MetaTxn& h, InodeBlock* D) {
        Status st = dir::Add(h, dino, D, e.name, e.ino, e.type);
        return st.Is(Code::kExists) ? Status::Ok() : st;
      }));
    }
    return Status::Ok();
  }
  for (const std::string& name : f.remove) {
    AGFS_RETURN_IF_ERROR(dir_op("removing '" + name + "'", [&](MetaTxn& h, InodeBlock* D) {
      Status st = dir::Remove(h, dino, D, name);
      return st.Is(Code::kNotFound) ? Status::Ok() : st;
    }));
  }
  for (const auto& retype : f.retype) {
    // Named copies: a lambda may not capture structured bindings before clang 16.
    const std::string& name = retype.first;
    const uint8_t type = retype.second;
    AGFS_RETURN_IF_ERROR(dir_op("retyping '" + name + "'", [&](MetaTxn& h, InodeBlock* D) {
      auto e = dir::Lookup(h, dino, *D, name);
      if (!e.ok()) return e.status();
      return dir::Replace(h, dino, D, name, e->ino, type);
    }));
  }
  return Status::Ok();
}

Status Repairer::AttachLost(const std::vector<uint64_t>& lost, std::vector<std::string>* notes) {
  if (lost.empty()) return Status::Ok();
  const uint64_t root = sb_.root_ino;
  uint64_t lf = 0;
  {
    auto h = store_->Begin(false, 16);
    auto rw = h->WriteAs<InodeBlock>(root, BlockType::kInode, InodeLock(root));
    if (!rw.ok()) return Note(rw.status(), "lost+found: root", notes);
    InodeBlock* R = *rw;
    auto e = dir::Lookup(*h, root, *R, "lost+found");
    if (e.ok()) {
      auto lr = h->ReadAs<InodeBlock>(e->ino, BlockType::kInode, InodeLock(e->ino));
      if (!lr.ok() || !S_ISDIR((*lr)->mode)) {
        return Note(Err(Code::kExists, "/lost+found exists and is not a usable directory"),
                    "lost+found", notes);
      }
      lf = e->ino;
    } else if (e.status().Is(Code::kNotFound)) {
      auto nb = h->NewBlock(BlockType::kInode, SelfLock(LockKind::kInode), root);
      if (!nb.ok()) return Note(nb.status(), "creating /lost+found", notes);
      lf = nb->first;
      auto* I = reinterpret_cast<InodeBlock*>(nb->second);
      uint64_t gen = 0;
      if (getrandom(&gen, sizeof(gen), 0) != sizeof(gen)) gen = lf;
      InitInodeCore(I, S_IFDIR | 0700, 0, 0, gen, NowTs());
      I->blocks = 1;
      I->parent = root;
      if (getrandom(&I->hash_seed, sizeof(I->hash_seed), 0) != sizeof(I->hash_seed)) {
        I->hash_seed = lf * 0x9E3779B97F4A7C15ull;
      }
      dir::InitEmpty(I);
      Status st = dir::Add(*h, root, R, "lost+found", lf, DT_DIR);
      if (!st.ok()) {
        (void)h->Free(lf, 1);
        return Note(st, "creating /lost+found", notes);
      }
      R->nlink++;
      R->mtime = R->ctime = NowTs();
    } else {
      return Note(e.status(), "looking up /lost+found", notes);
    }
  }
  for (uint64_t ino : lost) {
    auto h = store_->Begin(false, 64);
    auto lw = h->WriteAs<InodeBlock>(lf, BlockType::kInode, InodeLock(lf));
    if (!lw.ok()) return Note(lw.status(), "lost+found", notes);
    auto xw = h->WriteAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
    if (!xw.ok()) {
      AGFS_RETURN_IF_ERROR(Note(xw.status(), fmt::format("attaching inode {}", ino), notes));
      continue;
    }
    InodeBlock* L = *lw;
    InodeBlock* X = *xw;
    std::string name = fmt::format("#{}", ino);
    for (int n = 1; dir::Lookup(*h, lf, *L, name).ok() && n < 1000; n++) {
      name = fmt::format("#{}.{}", ino, n);
    }
    Status st = dir::Add(*h, lf, L, name, ino, DirentType(X->mode));
    if (!st.ok()) {
      AGFS_RETURN_IF_ERROR(Note(st, fmt::format("attaching inode {}", ino), notes));
      continue;
    }
    if (S_ISDIR(X->mode)) {
      X->parent = lf;
      L->nlink++;
    }
    L->mtime = L->ctime = NowTs();
  }
  return Status::Ok();
}

Status Repairer::ApplyRound(const Checker& c, std::vector<std::string>* notes) {
  const Plan& p = c.plan();
  if (p.root_bad) {
    // Everything else is re-planned next round, against the new root.
    const uint64_t r = sb_.root_ino;
    const uint32_t ag = g_.AgOf(r);
    if (ag >= g_.ag_count || r - g_.AgStart(ag) < 1 + uint64_t(g_.bitmap_blocks) ||
        r - g_.AgStart(ag) >= g_.AgSize(ag)) {
      return Err(Code::kCorruption, fmt::format("the superblock names block {} as the root inode, "
                                                "which cannot hold one",
                                                r));
    }
    return WriteRoot();
  }
  AGFS_RETURN_IF_ERROR(DirectFixes(c));
  AGFS_RETURN_IF_ERROR(OpenStore());
  AGFS_RETURN_IF_ERROR(ClearOrphans(p));
  AGFS_RETURN_IF_ERROR(FixBitmaps(c, !c.structural()));
  AGFS_RETURN_IF_ERROR(CloseStore());
  if (!c.structural()) return Status::Ok();
  // The allocator now sees every owned block as used: allocations are safe.
  AGFS_RETURN_IF_ERROR(OpenStore());
  for (const auto& [ino, f] : p.fixes) {
    AGFS_RETURN_IF_ERROR(Note(FixInode(ino, f), fmt::format("inode {}", ino), notes));
  }
  for (const auto& [ino, f] : p.fixes) AGFS_RETURN_IF_ERROR(FixDir(ino, f, notes));
  AGFS_RETURN_IF_ERROR(AttachLost(p.lost, notes));
  return CloseStore();
}

// ---------------------------------------------------------------------------------

using Key = std::tuple<std::string, uint64_t, uint64_t>;
Key KeyOf(const FsckProblem& p) { return Key{p.kind, p.ino, p.block}; }

void AddAll(std::vector<FsckProblem>* out, const std::vector<Problem>& in) {
  for (const Problem& p : in) out->push_back(p.p);
}

}  // namespace

Status CheckNoLiveNode(BlockDevice* dev, uint32_t heartbeat_ms_override, const char* tool) {
  AGFS_ASSIGN_OR_RETURN(Superblock sb, ReadSuperblock(dev));
  const Geometry g = GeometryOf(sb);
  const Uuid uuid = SuperUuid(sb);
  std::vector<SlotBlock> slots(g.node_slots);
  std::vector<uint32_t> mounted;
  for (uint32_t s = 0; s < g.node_slots; s++) {
    std::string why;
    AGFS_ASSIGN_OR_RETURN(slots[s], ReadSlot(dev, g, uuid, s, &why));
    if (why.empty() && slots[s].state == kSlotMounted) mounted.push_back(s);
  }
  return WaitForLiveNode(dev, sb, slots, mounted, heartbeat_ms_override, tool);
}

Result<FsckReport> Fsck(BlockDevice* dev, const FsckOptions& opts) {
  AGFS_ASSIGN_OR_RETURN(Superblock sb, ReadSuperblock(dev));
  const Geometry g = GeometryOf(sb);
  const Uuid uuid = SuperUuid(sb);
  FsckReport rep;
  AGFS_ASSIGN_OR_RETURN(Global gl, CheckGlobal(dev, sb, opts));
  AddAll(&rep.problems, gl.problems);

  if (!opts.repair) {
    Checker c(dev, sb, &gl.overlay, opts.max_problems);
    AGFS_RETURN_IF_ERROR(c.Run());
    AddAll(&rep.problems, c.problems());
    rep.problems_omitted = c.problem_count() - c.problems().size();
    rep.omitted_unrepaired = rep.problems_omitted;
    c.FillStats(&rep);
  } else {
    AGFS_RETURN_IF_ERROR(RepairGlobal(dev, sb, gl, &rep));
    // Hold slot 0 while writing through its journal (see fsck.h).
    AGFS_RETURN_IF_ERROR(WriteSlot(dev, g, uuid, kFsckSlot, kSlotMounted, "fsck"));
    Repairer r(dev, sb);
    AGFS_RETURN_IF_ERROR(r.Start());
    std::set<Key> seen;
    for (const auto& p : rep.problems) seen.insert(KeyOf(p));
    std::vector<std::string> notes;
    bool clean = false;
    uint64_t omitted = 0;
    std::unique_ptr<Checker> last;
    for (int round = 0; round < kMaxRounds; round++) {
      last = std::make_unique<Checker>(dev, sb, nullptr, opts.max_problems);
      AGFS_RETURN_IF_ERROR(last->Run());
      for (const Problem& p : last->problems()) {
        if (round > 0 && p.bitmap_only) continue;  // consequences of the last round
        if (!seen.insert(KeyOf(p.p)).second) continue;
        rep.problems.push_back(p.p);
      }
      if (round == 0) omitted = last->problem_count() - last->problems().size();
      if (last->clean()) {
        clean = true;
        break;
      }
      notes.clear();
      AGFS_RETURN_IF_ERROR(r.ApplyRound(*last, &notes));
    }
    // Release the slots: crashed ones are recovered now, and ours.
    for (uint32_t s : gl.crashed) {
      if (s != kFsckSlot) AGFS_RETURN_IF_ERROR(WriteSlot(dev, g, uuid, s, kSlotFree, ""));
    }
    AGFS_RETURN_IF_ERROR(WriteSlot(dev, g, uuid, kFsckSlot, kSlotFree, ""));

    // Verify: what a fresh check finds now is what is left.
    std::set<Key> left;
    std::vector<FsckProblem> leftovers;
    FsckOptions vo = opts;
    vo.repair = false;
    AGFS_ASSIGN_OR_RETURN(Global vg, CheckGlobal(dev, sb, vo));
    for (const Problem& p : vg.problems) leftovers.push_back(p.p);
    if (!clean) {
      last = std::make_unique<Checker>(dev, sb, nullptr, opts.max_problems);
      AGFS_RETURN_IF_ERROR(last->Run());
      for (const Problem& p : last->problems()) leftovers.push_back(p.p);
    }
    for (const auto& p : leftovers) left.insert(KeyOf(p));
    for (auto& p : rep.problems) p.repaired = !left.count(KeyOf(p));
    for (auto& p : leftovers) {
      if (!seen.count(KeyOf(p))) rep.problems.push_back(p);
    }
    if (!leftovers.empty()) {
      for (const std::string& n : notes) {
        rep.problems.push_back(FsckProblem{"repair-failed", 0, 0, n, false});
      }
    }
    rep.problems_omitted = omitted;
    rep.omitted_unrepaired = clean && leftovers.empty() ? 0 : omitted;
    last->FillStats(&rep);
  }
  if (rep.problems.size() > opts.max_problems) {
    uint64_t extra = rep.problems.size() - opts.max_problems;
    for (size_t i = opts.max_problems; i < rep.problems.size(); i++) {
      if (!rep.problems[i].repaired) rep.omitted_unrepaired++;
    }
    rep.problems.resize(opts.max_problems);
    rep.problems_omitted += extra;
  }
  return rep;
}

// ---------------------------------------------------------------------------------
// Report

std::string FsckReport::ToText() const {
  std::string s;
  uint64_t repaired = 0;
  for (const auto& p : problems) {
    std::string where;
    if (p.ino != 0) where += fmt::format(" inode {}", p.ino);
    if ((p.block != 0 && p.block != p.ino) || p.kind == "bad-super") {
      where += fmt::format(" block {}", p.block);
    }
    s += fmt::format("{}{}: {}{}\n", p.kind, where, p.detail, p.repaired ? " [repaired]" : "");
    repaired += p.repaired;
  }
  if (problems_omitted > 0) s += fmt::format("... and {} more problems not listed\n", problems_omitted);
  const uint64_t total = problems.size() + problems_omitted;
  if (journal_transactions_replayed > 0) {
    s += fmt::format("journal transactions replayed: {}\n", journal_transactions_replayed);
  }
  if (total == 0) {
    s += "clean";
  } else {
    uint64_t left = problems.size() - repaired + omitted_unrepaired;
    s += fmt::format("{} problems, {} repaired, {} left", total, total - left, left);
  }
  s += fmt::format(
      ": {} inodes ({} directories, {} files, {} symlinks, {} other); blocks: {} data, {} "
      "metadata, {} free\n",
      inodes, directories, files, symlinks, other, data_blocks_used, metadata_blocks_used,
      free_blocks);
  return s;
}

std::string FsckReport::ToJson() const {
  std::string s = fmt::format("{{\"clean\":{},\"exit_code\":{},\"problems\":[",
                              problems.empty() && problems_omitted == 0 ? "true" : "false",
                              ExitCode());
  for (size_t i = 0; i < problems.size(); i++) {
    const auto& p = problems[i];
    s += fmt::format("{}{{\"kind\":\"{}\",\"block\":{},\"ino\":{},\"detail\":\"{}\",\"repaired\":{}}}",
                     i ? "," : "", JsonEscape(p.kind), p.block, p.ino, JsonEscape(p.detail),
                     p.repaired ? "true" : "false");
  }
  s += fmt::format(
      "],\"problems_omitted\":{},\"inodes\":{},\"directories\":{},\"files\":{},\"symlinks\":{},"
      "\"other\":{},\"data_blocks_used\":{},\"metadata_blocks_used\":{},\"free_blocks\":{},"
      "\"journal_transactions_replayed\":{}}}",
      problems_omitted, inodes, directories, files, symlinks, other, data_blocks_used,
      metadata_blocks_used, free_blocks, journal_transactions_replayed);
  return s;
}

int FsckReport::ExitCode() const {
  if (problems.empty() && problems_omitted == 0) return 0;
  if (omitted_unrepaired > 0) return 4;
  for (const auto& p : problems) {
    if (!p.repaired) return 4;
  }
  return 1;
}

}  // namespace agorafs
