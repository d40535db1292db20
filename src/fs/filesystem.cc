// Filesystem: mount, node slot and heartbeat, references, orphans, attributes.
// Namespace operations are in fs/namespace.cc, data in fs/data.cc, xattrs in
// fs/xattr_ops.cc.
#include "fs/filesystem.h"

#include <sys/random.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>

#include "dir/dir.h"
#include "extent/extent.h"
#include "fs/fs_internal.h"
#include "fs/inode.h"
#include "fs/super.h"
#include "util/clock.h"

namespace agorafs {

bool Caller::InGroup(uint32_t g) const {
  if (g == gid) return true;
  for (uint32_t x : groups) {
    if (x == g) return true;
  }
  return false;
}

void Attr::ToStat(struct stat* st) const {
  std::memset(st, 0, sizeof(*st));
  st->st_ino = ino;
  st->st_mode = mode;
  st->st_nlink = nlink;
  st->st_uid = uid;
  st->st_gid = gid;
  st->st_rdev = rdev;
  st->st_size = static_cast<off_t>(size);
  st->st_blocks = static_cast<blkcnt_t>(blocks);
  st->st_blksize = kBlockSize;
  st->st_atim = atime;
  st->st_mtim = mtime;
  st->st_ctim = ctime;
}

Attr AttrOf(uint64_t ino, const InodeBlock& i) {
  Attr a;
  a.ino = ino;
  a.generation = i.generation;
  a.mode = i.mode;
  a.nlink = i.nlink;
  a.uid = i.uid;
  a.gid = i.gid;
  a.rdev = i.rdev;
  a.size = i.size;
  a.blocks = i.blocks * (kBlockSize / 512);
  a.atime = FromTs(i.atime);
  a.mtime = FromTs(i.mtime);
  a.ctime = FromTs(i.ctime);
  a.btime = FromTs(i.btime);
  return a;
}

bool ValidIno(const Geometry& g, uint64_t ino) {
  return ino >= g.ag_start && ino < g.total_blocks - 1;
}

Result<const InodeBlock*> RIno(MetaTxn& h, const Geometry& g, uint64_t ino) {
  if (!ValidIno(g, ino)) return Err(Code::kNotFound, "inode " + std::to_string(ino) + " out of range");
  auto r = h.ReadAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
  if (!r.ok()) return r.status();
  return *r;
}

Result<InodeBlock*> WIno(MetaTxn& h, const Geometry& g, uint64_t ino) {
  if (!ValidIno(g, ino)) return Err(Code::kNotFound, "inode " + std::to_string(ino) + " out of range");
  auto r = h.WriteAs<InodeBlock>(ino, BlockType::kInode, InodeLock(ino));
  if (!r.ok()) return r.status();
  return *r;
}

// ------------------------------------------------------------------------------
// Mount

static Result<std::string> HostName(const MountOptions& o) {
  if (!o.host.empty()) return o.host;
  char h[65] = {};
  if (gethostname(h, sizeof(h) - 1) != 0) return std::string("unknown");
  return std::string(h);
}

Result<std::unique_ptr<Filesystem>> Filesystem::Mount(std::unique_ptr<BlockDevice> dev,
                                                      const MountOptions& opts) {
  auto sbr = ReadSuperblock(dev.get());
  if (!sbr.ok()) return sbr.status();
  std::unique_ptr<Filesystem> fs(new Filesystem());
  fs->opts_ = opts;
  fs->sb_ = *sbr;
  fs->g_ = GeometryOf(fs->sb_);
  fs->uuid_ = SuperUuid(fs->sb_);
  fs->dev_ = std::move(dev);
  fs->locks_ = std::make_unique<LocalLockManager>();

  AGFS_RETURN_IF_ERROR(fs->ClaimSlot());
  auto j = Journal::Open(fs->dev_.get(), fs->g_, fs->uuid_, fs->info_.slot, fs->info_.generation);
  if (!j.ok()) return j.status();
  fs->journal_ = std::move(j).value();
  auto rs = fs->journal_->Replay();
  if (!rs.ok()) return rs.status();
  fs->info_.replayed_transactions += rs->transactions;

  fs->store_ = std::make_unique<MetaStore>(fs->dev_.get(), fs->sb_, fs->journal_.get(),
                                           fs->locks_.get(), opts.store);
  AGFS_RETURN_IF_ERROR(fs->store_->Init());
  fs->locks_->SetRevokeCallback(
      [f = fs.get()](LockId id, LockMode) { return f->store_->DropLock(id); });

  // Orphans: ours (left by a crash of this slot's previous owner) and those of
  // crashed slots we recovered.
  for (uint32_t s : fs->recovered_) AGFS_RETURN_IF_ERROR(fs->FreeOrphans(s, false));
  AGFS_RETURN_IF_ERROR(fs->FreeOrphans(fs->info_.slot, false));
  AGFS_RETURN_IF_ERROR(fs->store_->Sync());
  // Release the crashed slots only now that their journals and orphans are handled.
  for (uint32_t s : fs->recovered_) AGFS_RETURN_IF_ERROR(fs->WriteSlotState(s, kSlotFree, nullptr));

  uint64_t seed;
  if (getrandom(&seed, sizeof(seed), 0) != sizeof(seed)) seed = 0;
  fs->next_gen_ = (fs->info_.generation << 32) | (seed & 0xffff0000u);
  fs->hb_thread_ = std::thread([f = fs.get()] { f->HeartbeatLoop(); });
  spdlog::info("mounted {} as node slot {} generation {} ({} journal transactions replayed)",
               fs->dev_->Name(), fs->info_.slot, fs->info_.generation,
               fs->info_.replayed_transactions);
  return fs;
}

Filesystem::~Filesystem() {
  Status st = Unmount();
  if (!st.ok()) spdlog::error("unmount: {}", st.ToString());
}

Status Filesystem::Unmount() {
  {
    std::lock_guard<std::mutex> g(hb_mu_);
    if (unmounted_) return Status::Ok();
    unmounted_ = true;
    hb_stop_ = true;
  }
  hb_cv_.notify_all();
  if (hb_thread_.joinable()) hb_thread_.join();
  if (!store_) return Status::Ok();
  Status st = store_->failed();
  if (st.ok()) st = FreeOrphans(info_.slot, false);
  if (st.ok()) st = store_->Sync();
  store_->Stop();
  if (st.ok()) st = WriteSlotState(info_.slot, kSlotFree, nullptr);
  if (st.ok()) st = dev_->Flush();
  if (!st.ok()) {
    // Leave the slot marked mounted: the next mount replays our journal.
    return Err(st.code(), "unclean unmount (journal will be replayed): " + st.message());
  }
  return Status::Ok();
}

// ------------------------------------------------------------------------------
// Node slots

Result<SlotBlock> Filesystem::ReadSlot(uint32_t slot) {
  AlignedBuffer b(kBlockSize);
  uint64_t blk = g_.SlotBlock(slot, kSlotHeartbeat);
  AGFS_RETURN_IF_ERROR(dev_->Read(blk * kBlockSize, b.data(), kBlockSize));
  AGFS_RETURN_IF_ERROR(VerifyBlock(b.data(), BlockType::kSlot, blk, uuid_));
  SlotBlock s;
  std::memcpy(&s, b.data(), kBlockSize);
  return s;
}

Status Filesystem::WriteSlotState(uint32_t slot, uint32_t state, const SlotBlock* base) {
  AlignedBuffer b(kBlockSize);
  uint64_t blk = g_.SlotBlock(slot, kSlotHeartbeat);
  SlotBlock s;
  if (base) {
    s = *base;
  } else {
    auto cur = ReadSlot(slot);
    if (cur.ok()) {
      s = *cur;
    } else {
      std::memset(&s, 0, sizeof(s));
      s.slot = slot;
    }
  }
  s.state = state;
  std::memcpy(b.data(), &s, kBlockSize);
  InitHeader(b.data(), BlockType::kSlot, blk, uuid_);
  SealBlock(b.data());
  AGFS_RETURN_IF_ERROR(dev_->Write(blk * kBlockSize, b.data(), kBlockSize));
  return dev_->Flush();
}

Status Filesystem::ClaimSlot() {
  std::vector<SlotBlock> slots(g_.node_slots);
  std::vector<bool> ok(g_.node_slots, false);
  bool any_mounted = false;
  for (uint32_t s = 0; s < g_.node_slots; s++) {
    auto r = ReadSlot(s);
    if (!r.ok()) {
      if (r.status().Is(Code::kIOError)) return r.status();
      spdlog::error("node slot {} unreadable, skipped: {}", s, r.status().ToString());
      continue;
    }
    slots[s] = *r;
    ok[s] = true;
    any_mounted |= r->state == kSlotMounted;
  }
  if (any_mounted) {
    // A mounted slot whose counter moves belongs to a live node: refuse. One that
    // stands still for two heartbeat intervals belongs to a crashed node: recover it.
    uint32_t interval = opts_.heartbeat_ms_override ? opts_.heartbeat_ms_override
                                                    : sb_.heartbeat_interval_ms;
    std::this_thread::sleep_for(std::chrono::milliseconds(2 * interval + 200));
    for (uint32_t s = 0; s < g_.node_slots; s++) {
      if (!ok[s] || slots[s].state != kSlotMounted) continue;
      auto r = ReadSlot(s);
      if (!r.ok()) return r.status();
      if (r->counter != slots[s].counter || r->generation != slots[s].generation) {
        std::string host(r->host, strnlen(r->host, sizeof(r->host)));
        return Err(Code::kBusy, dev_->Name() + " is mounted by host '" + host + "' (node slot " +
                                    std::to_string(s) +
                                    "); sharing a device between live nodes needs the cluster "
                                    "lock manager, which this version does not have yet");
      }
    }
    for (uint32_t s = 0; s < g_.node_slots; s++) {
      if (!ok[s] || slots[s].state != kSlotMounted) continue;
      spdlog::warn("node slot {} (host '{}') was left mounted: replaying its journal", s,
                   std::string(slots[s].host, strnlen(slots[s].host, sizeof(slots[s].host))));
      AGFS_RETURN_IF_ERROR(RecoverSlot(s));
      recovered_.push_back(s);
    }
  }
  // Take the first free slot (a recovered one is reused only if nothing else is free).
  int chosen = -1;
  for (uint32_t s = 0; s < g_.node_slots && chosen < 0; s++) {
    if (ok[s] && slots[s].state == kSlotFree) chosen = int(s);
  }
  for (uint32_t s : recovered_) {
    if (chosen < 0) chosen = int(s);
  }
  if (chosen < 0) return Err(Code::kBusy, "no free node slot on " + dev_->Name());
  uint32_t slot = uint32_t(chosen);
  recovered_.erase(std::remove(recovered_.begin(), recovered_.end(), slot), recovered_.end());
  info_.slot = slot;
  info_.generation = slots[slot].generation + 1;
  SlotBlock mine = slots[slot];
  std::memset(&mine, 0, sizeof(mine));
  mine.slot = slot;
  mine.generation = info_.generation;
  mine.counter = 1;
  mine.mount_ns = RealtimeNs();
  auto host = HostName(opts_);
  std::strncpy(mine.host, host->c_str(), sizeof(mine.host) - 1);
  mine.state = kSlotMounted;  // the heartbeat rewrites the block from this copy
  hb_counter_ = 1;
  slot_block_ = mine;
  return WriteSlotState(slot, kSlotMounted, &mine);
}

Status Filesystem::RecoverSlot(uint32_t slot) {
  auto j = Journal::Open(dev_.get(), g_, uuid_, slot, 0);
  if (!j.ok()) return j.status();
  auto r = (*j)->Replay();
  if (!r.ok()) return r.status();
  info_.replayed_transactions += r->transactions;
  return Status::Ok();
}

void Filesystem::HeartbeatLoop() {
  uint32_t interval = opts_.heartbeat_ms_override ? opts_.heartbeat_ms_override
                                                  : sb_.heartbeat_interval_ms;
  std::unique_lock<std::mutex> lk(hb_mu_);
  while (!hb_stop_) {
    hb_cv_.wait_for(lk, std::chrono::milliseconds(interval));
    if (hb_stop_) break;
    slot_block_.counter = ++hb_counter_;
    SlotBlock s = slot_block_;
    lk.unlock();
    AlignedBuffer b(kBlockSize);
    uint64_t blk = g_.SlotBlock(info_.slot, kSlotHeartbeat);
    std::memcpy(b.data(), &s, kBlockSize);
    InitHeader(b.data(), BlockType::kSlot, blk, uuid_);
    SealBlock(b.data());
    Status st = dev_->Write(blk * kBlockSize, b.data(), kBlockSize);
    if (!st.ok()) spdlog::error("heartbeat write failed: {}", st.ToString());
    lk.lock();
  }
}

// ------------------------------------------------------------------------------
// References and orphans

std::shared_ptr<Filesystem::InodeState> Filesystem::State(uint64_t ino) {
  std::lock_guard<std::mutex> g(states_mu_);
  auto& w = states_[ino];
  if (auto sp = w.lock()) return sp;
  // The last user's release removes the entry, so the map holds only inodes in use.
  std::shared_ptr<InodeState> sp(new InodeState, [this, ino](InodeState* p) {
    {
      std::lock_guard<std::mutex> lg(states_mu_);
      auto it = states_.find(ino);
      if (it != states_.end() && it->second.expired()) states_.erase(it);
    }
    delete p;
  });
  w = sp;
  return sp;
}

void Filesystem::AddRef(uint64_t ino, uint64_t n) {
  std::lock_guard<std::mutex> g(states_mu_);
  refs_[ino].lookups += n;
}

bool Filesystem::DropRefs(uint64_t ino, uint64_t lookups, uint64_t opens) {
  std::lock_guard<std::mutex> g(states_mu_);
  auto it = refs_.find(ino);
  if (it == refs_.end()) return true;
  Refs& r = it->second;
  r.lookups -= std::min(r.lookups, lookups);
  r.opens -= std::min(r.opens, opens);
  if (r.lookups == 0 && r.opens == 0) {
    refs_.erase(it);
    return true;
  }
  return false;
}

bool Filesystem::Referenced(uint64_t ino) {
  std::lock_guard<std::mutex> g(states_mu_);
  return refs_.count(ino) != 0;
}

void Filesystem::Forget(uint64_t ino, uint64_t n) {
  if (DropRefs(ino, n, 0)) MaybeFreeOrphan(ino);
}

Status Filesystem::Open(uint64_t ino, int, const Caller&) {
  std::lock_guard<std::mutex> g(states_mu_);
  refs_[ino].opens++;
  return Status::Ok();
}

void Filesystem::Release(uint64_t ino) {
  if (DropRefs(ino, 0, 1)) MaybeFreeOrphan(ino);
}

Status Filesystem::AddOrphan(MetaTxn& h, uint64_t ino) {
  for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
    uint64_t blk = g_.SlotBlock(info_.slot, kSlotOrphan + i);
    LockId lock = MakeLockId(LockKind::kSlot, info_.slot);
    auto r = h.WriteAs<OrphanBlock>(blk, BlockType::kOrphan, lock);
    if (!r.ok()) return r.status();
    OrphanBlock* ob = *r;
    if (ob->count > kOrphansPerBlock) return Err(Code::kCorruption, "orphan list count");
    for (uint32_t k = 0; k < ob->count; k++) {
      if (ob->ino[k] == ino) return Status::Ok();
    }
    if (ob->count < kOrphansPerBlock) {
      ob->ino[ob->count++] = ino;
      return Status::Ok();
    }
  }
  return Err(Code::kNoSpace, "orphan list full (too many unlinked files still open)");
}

Status Filesystem::RemoveOrphan(MetaTxn& h, uint32_t slot, uint64_t ino) {
  for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
    uint64_t blk = g_.SlotBlock(slot, kSlotOrphan + i);
    LockId lock = MakeLockId(LockKind::kSlot, slot);
    auto r = h.ReadAs<OrphanBlock>(blk, BlockType::kOrphan, lock);
    if (!r.ok()) return r.status();
    const OrphanBlock* ro = *r;
    uint32_t n = std::min<uint32_t>(ro->count, kOrphansPerBlock);
    for (uint32_t k = 0; k < n; k++) {
      if (ro->ino[k] != ino) continue;
      auto w = h.WriteAs<OrphanBlock>(blk, BlockType::kOrphan, lock);
      if (!w.ok()) return w.status();
      (*w)->ino[k] = (*w)->ino[n - 1];
      (*w)->ino[n - 1] = 0;
      (*w)->count = n - 1;
      return Status::Ok();
    }
  }
  return Status::Ok();
}

// Frees every block of an inode with no links; bounded work per handle.
Status Filesystem::FreeInode(uint32_t orphan_slot, uint64_t ino) {
  for (;;) {
    auto h = store_->Begin(false, 96);
    auto ir = WIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    InodeBlock* I = *ir;
    if (I->nlink != 0) {
      // Linked again or never unlinked: just forget it as an orphan.
      I->flags &= ~kInodeFlagOrphan;
      return RemoveOrphan(*h, orphan_slot, ino);
    }
    if (I->data_kind == uint8_t(DataKind::kExtents)) {
      extent::PunchBudget budget;
      budget.max_blocks = 1u << 20;
      budget.max_extents = 256;
      auto r = extent::PunchStep(*h, ino, I, 0, UINT64_MAX, budget);
      if (!r.ok()) return r.status();
      if (*r < extent::kMaxFileBlocks) continue;  // more to free in a new handle
    } else if (I->data_kind == uint8_t(DataKind::kDirHash)) {
      AGFS_RETURN_IF_ERROR(dir::FreeAll(*h, ino, I));
    }
    if (I->xattr_block) {
      AGFS_RETURN_IF_ERROR(h->Free(I->xattr_block, 1));
      I->xattr_block = 0;
    }
    AGFS_RETURN_IF_ERROR(RemoveOrphan(*h, orphan_slot, ino));
    I->flags &= ~kInodeFlagOrphan;
    return h->Free(ino, 1);
  }
}

void Filesystem::MaybeFreeOrphan(uint64_t ino) {
  if (!store_ || !store_->failed().ok()) return;
  {
    auto h = store_->Begin(true);
    auto ir = RIno(*h, g_, ino);
    if (!ir.ok() || (*ir)->nlink != 0 || !((*ir)->flags & kInodeFlagOrphan)) return;
  }
  if (Referenced(ino)) return;
  auto st = State(ino);
  std::unique_lock<std::shared_mutex> io(st->io);
  Status s = FreeInode(info_.slot, ino);
  io.unlock();
  if (!s.ok()) spdlog::error("freeing orphan inode {}: {}", ino, s.ToString());
}

Status Filesystem::FreeOrphans(uint32_t slot, bool only_unreferenced) {
  std::vector<uint64_t> inos;
  {
    auto h = store_->Begin(true);
    for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
      uint64_t blk = g_.SlotBlock(slot, kSlotOrphan + i);
      auto r = h->ReadAs<OrphanBlock>(blk, BlockType::kOrphan, MakeLockId(LockKind::kSlot, slot));
      if (!r.ok()) return r.status();
      uint32_t n = std::min<uint32_t>((*r)->count, kOrphansPerBlock);
      for (uint32_t k = 0; k < n; k++) inos.push_back((*r)->ino[k]);
    }
  }
  uint64_t freed = 0;
  for (uint64_t ino : inos) {
    if (only_unreferenced && Referenced(ino)) continue;
    {
      // Truncations that a crash interrupted: finish them.
      auto h = store_->Begin(true);
      auto ir = RIno(*h, g_, ino);
      if (!ir.ok()) {
        spdlog::error("orphan inode {} unreadable: {}", ino, ir.status().ToString());
        continue;
      }
      if ((*ir)->nlink != 0) {
        uint64_t size = (*ir)->size;
        h.reset();
        AGFS_RETURN_IF_ERROR(TruncateBlocks(slot, ino, size));
        continue;
      }
    }
    AGFS_RETURN_IF_ERROR(FreeInode(slot, ino));
    freed++;
  }
  info_.orphans_freed += freed;
  return Status::Ok();
}

// ------------------------------------------------------------------------------
// Attributes

Result<Attr> Filesystem::GetAttr(uint64_t ino) {
  auto h = store_->Begin(true);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  if ((*ir)->nlink == 0 && !((*ir)->flags & kInodeFlagOrphan)) {
    return Err(Code::kNotFound, "inode " + std::to_string(ino) + " is free");
  }
  return AttrOf(ino, **ir);
}

Result<FsStat> Filesystem::StatFs() {
  FsStat s;
  s.blocks = store_->TotalDataBlocks();
  s.bfree = store_->FreeBlocks();
  // Every free block can become an inode.
  s.files = s.blocks;
  s.ffree = s.bfree;
  return s;
}

Status Filesystem::SyncAll() { return store_->Commit(); }

}  // namespace agorafs
