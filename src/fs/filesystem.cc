// Filesystem: mount, node slot and heartbeat, references, orphans, attributes.
// Namespace operations are in fs/namespace.cc, data in fs/data.cc, xattrs in
// fs/xattr_ops.cc.
#include "fs/filesystem.h"

#include <sys/random.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

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

namespace {
// lock_epoch() when this thread's outermost gate pinned the lock (0 outside gates):
// no revoke to none can happen while the pin is held.
thread_local uint64_t t_gate_epoch = 0;
// What this thread may do under the gates it holds: kNone outside any gate. A shared
// gate taken while the node holds the lock exclusively may write too (the pin keeps
// the node's hold from going down).
thread_local LockMode t_gate = LockMode::kNone;
// Under intent (t_gate == kIntent): the inode locks this thread's InodeGates pinned,
// and in which modes: a first one, and a second one pinned after it (a directory's,
// then a child's). Only their blocks may be read or written.
thread_local LockId t_inode_lock[2] = {0, 0};
thread_local LockMode t_inode_mode[2] = {LockMode::kNone, LockMode::kNone};
// Under intent: the AG lock this thread's AgGate pinned (exclusively), 0 if none.
thread_local LockId t_ag_lock = 0;
}  // namespace

// Under intent, other nodes change other inodes meanwhile: nothing read here is
// promised current beyond the inode lock, which the kernel cannot be told about.
uint64_t GateEpoch() { return t_gate == LockMode::kIntent ? 0 : t_gate_epoch; }

Attr AttrOf(uint64_t ino, const InodeBlock& i) {
  Attr a;
  a.lock_epoch = GateEpoch();
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
// The filesystem lock

namespace {

// The LockManager MetaStore checks: every block access must happen under a gate, and
// under intent only the blocks of the inode lock and the AG lock the thread pinned.
// Held() answers for the thread, which is what MetaStore needs: its inode readahead
// caches no neighbour under intent (their locks may be on their way to another node),
// it allocates only in AGs held exclusively, and it reads a bitmap block of another
// AG from home without caching it (MetaStore::Handle::Allocated).
class GateLocks final : public LockManager {
 public:
  Status Acquire(LockId id, LockMode mode) override {
    if (t_gate == LockMode::kIntent) {
      if (Covers(Held(id), mode)) return Status::Ok();
      return Err(Code::kInvalid, "metadata lock " + std::to_string(LockIdNumber(id)) +
                                      " used under intent without its inode or AG lock");
    }
    if (Covers(t_gate, mode)) return Status::Ok();
    return Err(Code::kInvalid, "metadata lock " + std::to_string(LockIdNumber(id)) +
                                    " used outside the filesystem lock");
  }
  // Under intent a directory's leaf blocks go with its inode lock (until leaf locks
  // are taken of their own): a leaf is reached only through its directory's inode
  // block, which this checks, and MetaStore drops the leaves with any inode lock.
  // The slots' orphan lists may be read: they change only under the filesystem lock
  // held exclusively, which no node holds beside intent, and a node drops its cached
  // copies when it leaves intent (OnRevoke).
  LockMode Held(LockId id) const override {
    if (t_gate != LockMode::kIntent) return t_gate;
    if (id == t_ag_lock && id != 0) return LockMode::kExclusive;
    LockMode m = LockIdKind(id) == LockKind::kSlot ? LockMode::kShared : LockMode::kNone;
    for (int k = 0; k < 2; k++) {
      if (t_inode_lock[k] == 0) continue;
      if (id == t_inode_lock[k] || LockIdKind(id) == LockKind::kDirLeaf) {
        m = Join(m, t_inode_mode[k]);
      }
    }
    return m;
  }
  void SetRevokeCallback(RevokeFn) override {}
};

// The lock service's errors as a filesystem call reports them.
Status GateError(Status st) {
  if (st.Is(Code::kFenced) || st.Is(Code::kAborted)) {
    return Err(Code::kIOError, "this node lost its place in the cluster: " + st.message());
  }
  return st;
}

}  // namespace

bool GateAllowsWrite() { return t_gate == LockMode::kExclusive; }
bool GateIsIntent() { return t_gate == LockMode::kIntent; }

// Intent also when the node holds exclusive: that covers intent now, and a revoke
// down to intent, perhaps already pending, keeps it. Asking shared there would wait
// for that revoke and then ask shared beside intent, that is exclusive again, pulling
// intent away from every other node at each read.
bool Filesystem::ReadsUnderIntent() const {
  if (!intent_locks_) return false;
  const LockMode held = lsvc_->Held(kFsLock);
  return held == LockMode::kIntent || held == LockMode::kExclusive;
}

Filesystem::Gate::Gate(Filesystem* fs, LockMode mode) : fs_(fs) {
  if (Covers(t_gate, mode)) return;
  if (t_gate != LockMode::kNone) {
    st_ = Err(Code::kInvalid, "filesystem lock upgrade inside a gate on one thread");
    return;
  }
  st_ = GateError(fs_->lsvc_->Lock(kFsLock, mode));
  if (!st_.ok()) return;
  pinned_ = true;
  prev_ = t_gate;
  prev_epoch_ = t_gate_epoch;
  t_gate = Join(mode, fs_->lsvc_->Held(kFsLock));
  t_gate_epoch = fs_->lock_epoch_.load();
}

Filesystem::Gate::~Gate() {
  if (!pinned_) return;
  t_gate = prev_;
  t_gate_epoch = prev_epoch_;
  fs_->lsvc_->Unpin(kFsLock);
}

Filesystem::InodeGate::InodeGate(Filesystem* fs, uint64_t ino, LockMode mode) : fs_(fs) {
  LockMode fs_mode = mode;
  if (fs_->intent_locks_ && t_gate == LockMode::kIntent) {
    fs_mode = LockMode::kIntent;
  } else if (fs_->intent_locks_ && t_gate == LockMode::kNone &&
             (mode != LockMode::kShared || fs_->ReadsUnderIntent())) {
    fs_mode = LockMode::kIntent;
  }
  gate_.emplace(fs_, fs_mode);
  st_ = gate_->status();
  if (!st_.ok() || t_gate != LockMode::kIntent) return;
  const LockId id = InodeLock(ino);
  for (int k = 0; k < 2; k++) {
    if (t_inode_lock[k] == id && Covers(t_inode_mode[k], mode)) return;
  }
  if (t_inode_lock[1] != 0 || t_ag_lock != 0 || t_inode_lock[0] == id) {
    st_ = Err(Code::kInvalid, "a third inode lock, an inode lock after an AG lock, or an "
                              "upgrade inside an intent gate on one thread");
    return;
  }
  st_ = GateError(fs_->lsvc_->Lock(id, mode));
  if (!st_.ok()) return;
  pinned_ = id;
  slot_ = t_inode_lock[0] == 0 ? 0 : 1;
  t_inode_lock[slot_] = id;
  t_inode_mode[slot_] = mode;
}

Filesystem::AgGate::AgGate(Filesystem* fs, uint32_t ag) : fs_(fs) {
  if (t_gate != LockMode::kIntent) return;
  const LockId id = AgLock(ag);
  if (t_ag_lock != 0) {
    if (t_ag_lock != id) {
      st_ = Err(Code::kInvalid, "a second AG lock inside an intent gate on one thread");
    }
    return;
  }
  st_ = GateError(fs_->lsvc_->Lock(id, LockMode::kExclusive));
  if (!st_.ok()) return;
  pinned_ = id;
  t_ag_lock = id;
}

Filesystem::AgGate::~AgGate() {
  if (pinned_ == 0) return;
  t_ag_lock = 0;
  fs_->lsvc_->Unpin(pinned_);
}

Filesystem::InodeGate::~InodeGate() {
  if (pinned_ != 0) {
    t_inode_lock[slot_] = 0;
    t_inode_mode[slot_] = LockMode::kNone;
    fs_->lsvc_->Unpin(pinned_);
  }
  gate_.reset();
}

// Runs on the lock service's worker thread once no gate is open on this node.
Status Filesystem::OnRevoke(LockMode to) {
  revokes_++;
  const auto start = std::chrono::steady_clock::now();
  // Whoever gets the lock next must see what is open here. Not fatal when it fails:
  // another node may then free a file open here, which this node answers with ESTALE.
  Status pub = PublishOpens();
  if (!pub.ok()) spdlog::error("{}", pub.ToString());
  // Going down to shared keeps the cache: nobody changes anything beside a shared
  // holder. Going to none, or to intent, keeps nothing: intent holders change inodes
  // under their own inode locks, and everything here was cached under this lock alone.
  const bool keep = to == LockMode::kShared;
  if (!keep) {
    // From here on, attributes read before are no longer promised current; the hook
    // takes back what the kernel caches.
    lock_epoch_++;
    std::lock_guard<std::mutex> g(hook_mu_);
    if (lock_loss_hook_) lock_loss_hook_();
  }
  Status st = keep ? store_->Sync() : store_->DropAll();
  const auto took = std::chrono::steady_clock::now() - start;
  std::lock_guard<std::mutex> g(info_mu_);
  info_.lock_revokes++;
  info_.lock_revoke_us += std::chrono::duration_cast<std::chrono::microseconds>(took).count();
  return st;
}

// Runs on the lock service's worker thread once no InodeGate (AgGate) pins the lock.
// Nothing to take back from the kernel: attributes read under intent got no timeout,
// and those read under the filesystem lock alone went when it moved to intent.
Status Filesystem::OnFineRevoke(LockId id, LockMode to) {
  const auto start = std::chrono::steady_clock::now();
  Status st = to == LockMode::kShared ? store_->Sync() : store_->DropLock(id);
  const auto took = std::chrono::steady_clock::now() - start;
  std::lock_guard<std::mutex> g(info_mu_);
  (LockIdKind(id) == LockKind::kAg ? info_.ag_lock_revokes : info_.inode_lock_revokes)++;
  info_.lock_revoke_us += std::chrono::duration_cast<std::chrono::microseconds>(took).count();
  return st;
}

Status Filesystem::CheckKnown(MetaStore::Handle& h, uint64_t ino) {
  uint64_t gen = 0;
  // Under intent the bitmap block usually lies in an AG whose lock this thread does
  // not hold, and is then read from home (not cached) each time: once per inode and
  // stamp is enough. Only a holder of the filesystem lock exclusively frees inodes:
  // another node only once this one lost the lock (which moves lock_epoch_), this
  // one only at a free (free_epoch_).
  const bool intent = t_gate == LockMode::kIntent;
  const uint64_t epoch = lock_epoch_.load(), free_epoch = free_epoch_.load();
  bool stamped = false;
  {
    std::lock_guard<std::mutex> g(states_mu_);
    auto it = refs_.find(ino);
    if (it == refs_.end()) return Status::Ok();
    gen = it->second.generation;
    stamped = it->second.known_epoch == epoch && it->second.known_free_epoch == free_epoch;
  }
  if (gen == 0) return Status::Ok();
  if (!ValidIno(g_, ino)) return Err(Code::kStaleInode, "inode " + std::to_string(ino) + " out of range");
  // The bitmap first: a freed inode block keeps its last copy at home (a free drops
  // the cached block unwritten), which may still look alive. A damaged bitmap block
  // must not make every inode it covers unreachable: the inode block's own checks
  // below still catch a reused inode.
  if (!intent || !stamped) {
    auto used = h.Allocated(ino);
    if (!used.ok() && !used.status().Is(Code::kCorruption)) return used.status();
    if (used.ok() && !*used) {
      return Err(Code::kStaleInode, "inode " + std::to_string(ino) + " was deleted");
    }
    if (intent && used.ok()) {
      std::lock_guard<std::mutex> g(states_mu_);
      auto it = refs_.find(ino);
      if (it != refs_.end() && it->second.generation == gen) {
        it->second.known_epoch = epoch;
        it->second.known_free_epoch = free_epoch;
      }
    }
  }
  auto r = h.Read(ino, BlockType::kInode, InodeLock(ino));
  if (!r.ok()) {
    // Freed by another node and reused for something else.
    if (r.status().Is(Code::kCorruption)) {
      return Err(Code::kStaleInode, "inode " + std::to_string(ino) + " no longer exists");
    }
    return r.status();
  }
  const auto* I = reinterpret_cast<const InodeBlock*>(*r);
  if (I->generation != gen || (I->nlink == 0 && !(I->flags & kInodeFlagOrphan))) {
    return Err(Code::kStaleInode, "inode " + std::to_string(ino) + " was deleted on another node");
  }
  return Status::Ok();
}

Status Filesystem::CheckKnown(uint64_t ino) {
  auto h = store_->Begin(true);
  return CheckKnown(*h, ino);
}

FsInfo Filesystem::info() const {
  std::lock_guard<std::mutex> g(info_mu_);
  FsInfo fi = info_;
  fi.alloc_ag = alloc_ag_.load();
  return fi;
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
  fs->locks_ = std::make_unique<GateLocks>();
  fs->intent_locks_ = opts.intent_locks && (fs->sb_.features_incompat & kIncompatIntentLocks);

  Membership::Options mo;
  mo.host = *HostName(opts);
  mo.timings = ClusterTimings::FromSuper(fs->sb_);
  if (opts.heartbeat_ms_override) mo.timings.heartbeat_ms = opts.heartbeat_ms_override;
  if (opts.io_timeout_ms_override) mo.timings.io_timeout_ms = opts.io_timeout_ms_override;
  if (opts.dead_after_ms_override) mo.timings.dead_after_ms = opts.dead_after_ms_override;
  mo.timings.poll_ms = opts.poll_ms;
  mo.on_fenced = [] {
    spdlog::critical("this node's lease ran out and another node declared it dead: it has "
                     "stopped writing; unmount and mount again");
  };
  auto m = Membership::Join(fs->dev_.get(), fs->sb_, mo);
  if (!m.ok()) return m.status();
  fs->member_ = std::move(m).value();
  fs->io_ = fs->member_->guarded_device();
  fs->info_.slot = fs->member_->slot();
  fs->info_.generation = fs->member_->generation();
  // Each slot starts at its own share of the AGs, spread evenly, so that nodes moving
  // on from full AGs meet another node's AGs as late as possible.
  fs->home_ag_ = static_cast<uint32_t>(uint64_t(fs->info_.slot) * fs->g_.ag_count /
                                       std::max<uint32_t>(1, fs->g_.node_slots));
  fs->alloc_ag_ = fs->home_ag_;

  LockService::Options lo;
  lo.poll_ms = opts.poll_ms;
  lo.min_hold_ms = opts.min_hold_ms;
  lo.idle_release_us = opts.idle_release_us;
  lo.net_bind = opts.net_bind;
  Filesystem* f = fs.get();
  lo.on_revoke = [f](LockId id, LockMode to) -> Status {
    if (id == kFsLock) return f->OnRevoke(to);
    if (LockIdKind(id) == LockKind::kInode || LockIdKind(id) == LockKind::kAg) {
      return f->OnFineRevoke(id, to);
    }
    return Status::Ok();
  };
  lo.on_recover = [f](uint32_t slot, uint64_t gen) { return f->RecoverSlot(slot, gen); };
  lo.on_fatal = [hook = opts.on_fatal](const Status& st) {
    if (hook) return hook(st);
    // The lock cannot be released safely; survivors recover this node as a crashed one.
    spdlog::critical("cannot give up the filesystem lock safely, stopping: {}", st.ToString());
    std::fflush(nullptr);
    _exit(70);
  };
  auto ls = LockService::Start(fs->dev_.get(), fs->sb_, fs->member_.get(), lo);
  if (!ls.ok()) {
    (void)fs->member_->Leave();
    return ls.status();
  }
  fs->lsvc_ = std::move(ls).value();

  Status st = [&]() -> Status {
    // Waits while a dead node is recovered: the master grants nothing until then.
    Gate gate(f, LockMode::kExclusive);
    AGFS_RETURN_IF_ERROR(gate.status());
    auto j = Journal::Open(f->io_, f->g_, f->uuid_, f->info_.slot, f->info_.generation);
    if (!j.ok()) return j.status();
    f->journal_ = std::move(j).value();
    // Empty unless the previous owner of this slot left without anyone recovering it.
    auto rs = f->journal_->Replay();
    if (!rs.ok()) return rs.status();
    {
      std::lock_guard<std::mutex> g(f->info_mu_);  // RecoverSlot may run meanwhile
      f->info_.replayed_transactions += rs->transactions;
    }
    f->store_ = std::make_unique<MetaStore>(f->io_, f->sb_, f->journal_.get(), f->locks_.get(),
                                            opts.store);
    AGFS_RETURN_IF_ERROR(f->store_->Init());
    // Orphans the previous owner of this slot left (files deleted while open, and
    // truncations a crash interrupted).
    AGFS_RETURN_IF_ERROR(f->FreeOrphans(f->info_.slot, false));
    AGFS_RETURN_IF_ERROR(f->AdoptOrphans());
    return f->store_->Sync();
  }();
  if (!st.ok()) {
    if (f->store_) f->store_->Stop();
    f->unmounted_ = true;
    f->lsvc_->Stop();
    f->lsvc_.reset();
    (void)f->member_->Leave();
    return st;
  }

  fs->janitor_ = std::thread([f] { f->JanitorLoop(); });
  uint64_t seed;
  if (getrandom(&seed, sizeof(seed), 0) != sizeof(seed)) seed = 0;
  fs->next_gen_ = (fs->info_.generation << 32) | (uint64_t(fs->info_.slot & 0xff) << 24) |
                  (seed & 0x00ff0000u);
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
  if (unmounted_) return Status::Ok();
  unmounted_ = true;
  {
    std::lock_guard<std::mutex> g(info_mu_);
    janitor_stop_ = true;
  }
  janitor_cv_.notify_all();
  if (janitor_.joinable()) janitor_.join();
  if (!store_) return Status::Ok();
  Status st = store_->failed();
  {
    Gate gate(this, LockMode::kExclusive);
    if (st.ok()) st = gate.status();
    if (st.ok()) st = FreeOrphans(info_.slot, false);
    // Nothing is open here any more: nobody may pass an orphan on to this slot.
    if (st.ok()) st = PublishOpens(true);
    if (st.ok()) st = store_->Sync();
  }
  store_->Stop();
  // Our blocks are home and the journal is empty: the lock may go without a revoke.
  lsvc_->Stop();
  if (st.ok()) st = member_->Leave();
  if (!st.ok()) {
    // Leave the slot marked mounted: a survivor (or the next mount) replays our journal.
    return Err(st.code(), "unclean unmount (journal will be replayed): " + st.message());
  }
  // What the lock handovers cost this node, for an administrator comparing mounts.
  StoreStats ss = store_->stats();
  FsInfo fi = info();
  spdlog::info("unmounted slot {}: {} filesystem, {} inode and {} AG lock revokes ({} ms in "
               "all); metadata cache {} hits, {} misses; {} journal commits ({} blocks), {} "
               "checkpoints",
               fi.slot, fi.lock_revokes, fi.inode_lock_revokes, fi.ag_lock_revokes,
               fi.lock_revoke_us / 1000,
               ss.cache_hits, ss.cache_misses, ss.commits, ss.blocks_journaled, ss.checkpoints);
  return Status::Ok();
}

// ------------------------------------------------------------------------------
// Recovery of a dead node (run by the lock master while the dead node's locks are
// still held, so nobody else touches what it may have changed).

Status Filesystem::RecoverSlot(uint32_t slot, uint64_t generation) {
  auto j = Journal::Open(io_, g_, uuid_, slot, 0);
  if (!j.ok()) return j.status();
  auto r = (*j)->Replay();
  if (!r.ok()) return r.status();
  std::lock_guard<std::mutex> g(info_mu_);
  info_.replayed_transactions += r->transactions;
  info_.recoveries++;
  recovered_++;  // its open-file table no longer counts once its slot is freed
  adopt_pending_[slot] = {generation, BootNowMs()};
  janitor_cv_.notify_all();
  spdlog::warn("node slot {} died: replayed {} transactions of its journal", slot,
               r->transactions);
  return Status::Ok();
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

void Filesystem::AddRef(uint64_t ino, uint64_t generation, uint64_t n) {
  std::lock_guard<std::mutex> g(states_mu_);
  Refs& r = refs_[ino];
  r.lookups += n;
  // A reused number: the kernel drops its old inode on seeing the new generation.
  if (generation != 0) r.generation = generation;
}

bool Filesystem::DropRefs(uint64_t ino, uint64_t lookups, uint64_t opens, bool* closed) {
  std::lock_guard<std::mutex> g(states_mu_);
  auto it = refs_.find(ino);
  if (it == refs_.end()) return true;
  Refs& r = it->second;
  r.lookups -= std::min(r.lookups, lookups);
  const bool last_open = opens > 0 && r.opens > 0 && r.opens <= opens;
  if (closed) *closed = last_open;
  if (last_open) open_inos_.erase(ino);
  r.opens -= std::min(r.opens, opens);
  if (r.lookups == 0 && r.opens == 0) {
    refs_.erase(it);
    return true;
  }
  return false;
}

void Filesystem::SetLockLossHook(std::function<void()> fn) {
  std::lock_guard<std::mutex> g(hook_mu_);
  lock_loss_hook_ = std::move(fn);
}

bool Filesystem::MarkAttrsCached(uint64_t ino, bool unless_open) {
  std::lock_guard<std::mutex> g(states_mu_);
  auto it = refs_.find(ino);
  if (it == refs_.end()) {
    if (ino != sb_.root_ino) return false;
    it = refs_.emplace(ino, Refs{}).first;  // the kernel's root needs no lookup
  }
  if (unless_open && it->second.opens > 0) return false;
  if (it->second.attrs_cached) return true;
  it->second.attrs_cached = true;
  if (attrs_cached_.size() >= 2 * refs_.size() + 64) {
    // Drop what the kernel forgot, and the older listing of an inode forgotten and
    // marked again, before growing.
    std::sort(attrs_cached_.begin(), attrs_cached_.end());
    attrs_cached_.erase(std::unique(attrs_cached_.begin(), attrs_cached_.end()),
                        attrs_cached_.end());
    std::erase_if(attrs_cached_, [&](uint64_t i) {
      auto r = refs_.find(i);
      return r == refs_.end() || !r->second.attrs_cached;
    });
  }
  attrs_cached_.push_back(ino);
  return true;
}

std::vector<uint64_t> Filesystem::TakeAttrsCached() {
  std::lock_guard<std::mutex> g(states_mu_);
  std::vector<uint64_t> out;
  for (uint64_t ino : attrs_cached_) {
    auto r = refs_.find(ino);
    if (r == refs_.end() || !r->second.attrs_cached) continue;  // forgotten, or listed twice
    r->second.attrs_cached = false;
    out.push_back(ino);
  }
  attrs_cached_.clear();
  return out;
}

bool Filesystem::AttrsMarked(uint64_t ino) {
  std::lock_guard<std::mutex> g(states_mu_);
  auto it = refs_.find(ino);
  return it != refs_.end() && it->second.attrs_cached;
}

bool Filesystem::UnmarkAttrs(uint64_t ino) {
  std::lock_guard<std::mutex> g(states_mu_);
  auto it = refs_.find(ino);
  if (it == refs_.end() || !it->second.attrs_cached) return false;
  it->second.attrs_cached = false;  // its listing in attrs_cached_ is skipped
  return true;
}

bool Filesystem::Referenced(uint64_t ino) {
  std::lock_guard<std::mutex> g(states_mu_);
  return refs_.count(ino) != 0;
}

void Filesystem::Forget(uint64_t ino, uint64_t n) {
  if (DropRefs(ino, n, 0)) MaybeFreeOrphan(ino);
}

// Under intent too: a node that wants to free the file takes the filesystem lock
// exclusively, so this node publishes its opens (OnRevoke) before that.
Status Filesystem::Open(uint64_t ino, int, const Caller&) {
  AGFS_INODE_GATE(Shared, ino);
  std::lock_guard<std::mutex> g(states_mu_);
  if (refs_[ino].opens++ == 0) open_inos_.insert(ino);
  return Status::Ok();
}

void Filesystem::Release(uint64_t ino) {
  bool closed = false;
  bool gone = DropRefs(ino, 0, 1, &closed);
  // Another node may have deleted it meanwhile and left it on our orphan list.
  if (closed && WasPublished(ino)) RequestSweep();
  if (gone) MaybeFreeOrphan(ino);
}

Status Filesystem::AddOrphan(MetaTxn& h, uint32_t slot, uint64_t ino) {
  for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
    uint64_t blk = g_.SlotBlock(slot, kSlotOrphan + i);
    LockId lock = MakeLockId(LockKind::kSlot, slot);
    auto r = h.WriteAs<OrphanBlock>(blk, BlockType::kOrphan, lock);
    if (!r.ok()) {
      // A damaged block is never written: use the other one (fsck rewrites it).
      if (r.status().Is(Code::kCorruption) && i + 1 < kSlotOrphanBlocks) continue;
      return r.status();
    }
    OrphanBlock* ob = *r;
    if (ob->count > kOrphansPerBlock) {
      if (i + 1 < kSlotOrphanBlocks) continue;
      return Err(Code::kCorruption, "orphan list block " + std::to_string(blk) + ": count");
    }
    for (uint32_t k = 0; k < ob->count; k++) {
      if (ob->ino[k] == ino) return Status::Ok();
    }
    if (ob->count < kOrphansPerBlock) {
      ob->ino[ob->count++] = ino;
      return Status::Ok();
    }
  }
  return Err(Code::kNoSpace, std::string(kOrphanListFull));
}

Status Filesystem::RemoveOrphan(MetaTxn& h, uint32_t slot, uint64_t ino) {
  for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
    uint64_t blk = g_.SlotBlock(slot, kSlotOrphan + i);
    LockId lock = MakeLockId(LockKind::kSlot, slot);
    auto r = h.ReadAs<OrphanBlock>(blk, BlockType::kOrphan, lock);
    if (!r.ok()) {
      if (r.status().Is(Code::kCorruption)) continue;  // cannot list it; see OrphansOf
      return r.status();
    }
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
    free_epoch_++;  // CheckKnown asks the bitmap again
    return h->Free(ino, 1);
  }
}

void Filesystem::MaybeFreeOrphan(uint64_t ino) {
  if (!store_ || !store_->failed().ok()) return;
  {
    // Nearly every inode the kernel forgets is no orphan, and a forget storm (the
    // kernel dropping its dentry cache) brings tens of thousands at once: this node's
    // orphan list (two cached blocks) tells without reading the inode or taking the
    // lock exclusively. Only orphans on it are freed here (DisposeOrphan); one added
    // meanwhile is looked at by whoever added it. The list is read under a shared
    // gate, or under intent on a node holding intent: asking shared beside it would
    // take intent from every node at each close.
    Gate list_gate(this, ReadsUnderIntent() ? LockMode::kIntent : LockMode::kShared);
    if (!list_gate.status().ok()) return;
    auto list = OrphansOf(info_.slot);
    if (list.ok() && std::find(list->begin(), list->end(), ino) == list->end()) return;
  }
  Gate gate(this, LockMode::kExclusive);
  if (!gate.status().ok()) return;
  {
    auto h = store_->Begin(true);
    auto used = h->Allocated(ino);
    if (!used.ok() || !*used) return;
    auto ir = RIno(*h, g_, ino);
    if (!ir.ok() || (*ir)->nlink != 0 || !((*ir)->flags & kInodeFlagOrphan)) return;
  }
  if (Referenced(ino)) return;
  // Only the node whose list holds the orphan frees it: another node forgetting an
  // inode someone else deleted must leave it to that node (which may still use it).
  // DisposeOrphan checks that it is on our list, and passes it on to a node that
  // still has it open.
  auto r = DisposeOrphan(info_.slot, ino);
  if (!r.ok()) {
    spdlog::error("freeing orphan inode {}: {}", ino, r.status().ToString());
  } else if (*r) {
    std::lock_guard<std::mutex> g(info_mu_);
    info_.orphans_freed++;
  }
}

Status Filesystem::RetryWhileOrphanListFull(const std::function<Status()>& op) {
  Status st = op();
  for (int waited = 0; waited < kOrphanRoomWaitMs; waited += 10) {
    if (!st.Is(Code::kNoSpace) || st.message() != kOrphanListFull) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    st = op();
  }
  return st;
}

Result<std::vector<uint64_t>> Filesystem::OrphansOf(uint32_t slot) {
  std::vector<uint64_t> inos;
  auto h = store_->Begin(true);
  for (uint32_t i = 0; i < kSlotOrphanBlocks; i++) {
    uint64_t blk = g_.SlotBlock(slot, kSlotOrphan + i);
    auto r = h->ReadAs<OrphanBlock>(blk, BlockType::kOrphan, MakeLockId(LockKind::kSlot, slot));
    if (!r.ok()) {
      if (!r.status().Is(Code::kCorruption)) return r.status();
      // The inodes it lists stay allocated until fsck frees them; the rest of the
      // filesystem (and the other orphan block) keeps working.
      spdlog::error("node slot {}: skipping its orphan list block: {}", slot,
                    r.status().ToString());
      continue;
    }
    uint32_t n = std::min<uint32_t>((*r)->count, kOrphansPerBlock);
    for (uint32_t k = 0; k < n; k++) inos.push_back((*r)->ino[k]);
  }
  return inos;
}

Status Filesystem::FreeOrphans(uint32_t slot, bool only_unreferenced) {
  auto list = OrphansOf(slot);
  if (!list.ok()) return list.status();
  uint64_t freed = 0;
  for (uint64_t ino : *list) {
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
    // Open on another node: it goes onto that node's list instead.
    auto r = DisposeOrphan(slot, ino);
    if (!r.ok()) return r.status();
    if (*r) freed++;
  }
  std::lock_guard<std::mutex> g(info_mu_);
  info_.orphans_freed += freed;
  return Status::Ok();
}

Status Filesystem::AdoptOrphans() {
  Gate gate(this, LockMode::kExclusive);
  AGFS_RETURN_IF_ERROR(gate.status());
  bool adopted = false;
  for (uint32_t s = 0; s < g_.node_slots; s++) {
    if (s == info_.slot) continue;
    // Nobody else writes a slot's orphan list while we hold the lock, and a node that
    // claims a free slot empties its list only under the lock, after its claim: so a
    // slot seen free here may be emptied by us, and one seen claimed is left alone.
    AlignedBuffer b(kBlockSize);
    uint64_t hb = g_.SlotBlock(s, kSlotHeartbeat);
    AGFS_RETURN_IF_ERROR(dev_->Read(hb * kBlockSize, b.data(), kBlockSize));
    if (!VerifyBlock(b.data(), BlockType::kSlot, hb, uuid_).ok()) continue;
    if (reinterpret_cast<const SlotBlock*>(b.data())->state != kSlotFree) continue;
    auto list = OrphansOf(s);
    if (!list.ok()) return list.status();
    const std::vector<uint64_t>& inos = *list;
    for (uint64_t ino : inos) {
      auto h = store_->Begin(false, 8);
      AGFS_RETURN_IF_ERROR(AddOrphan(*h, ino));
      AGFS_RETURN_IF_ERROR(RemoveOrphan(*h, s, ino));
      adopted = true;
    }
    if (!inos.empty()) {
      spdlog::info("adopted {} orphan inodes of free node slot {}", inos.size(), s);
    }
  }
  if (!adopted) return Status::Ok();
  return FreeOrphans(info_.slot, true);
}

void Filesystem::JanitorLoop() {
  // A sweep waits for a moment when this node holds the lock exclusively anyway, so
  // that closing files does not pull the lock away from busy nodes; after
  // kSweepWaitMs it takes the lock itself.
  constexpr uint64_t kSweepWaitMs = 2000;
  // The lock master frees a recovered slot only after RecoverSlot returned, and a
  // node that holds the lock already does not wait for that at its gate: adopt once
  // the heartbeat block shows the slot free (or claimed again: its new owner disposes
  // of the list at mount). Give up after kAdoptWaitMs (the master died meanwhile; the
  // next master recovers the slot again).
  constexpr uint64_t kAdoptWaitMs = 600000;
  uint64_t sweep_since = 0;  // BootNowMs of the oldest unserved sweep request; 0: none
  std::unique_lock<std::mutex> lk(info_mu_);
  for (;;) {
    if (sweep_since != 0 || !adopt_pending_.empty()) {
      janitor_cv_.wait_for(lk, std::chrono::milliseconds(50),
                           [&] { return janitor_stop_ || janitor_sweep_; });
    } else {
      janitor_cv_.wait(lk, [&] {
        return janitor_stop_ || janitor_sweep_ || !adopt_pending_.empty();
      });
    }
    if (janitor_stop_) return;
    if (janitor_sweep_ && sweep_since == 0) sweep_since = std::max<uint64_t>(1, BootNowMs());
    janitor_sweep_ = false;
    auto pending = adopt_pending_;
    lk.unlock();
    bool adopt = false;
    std::vector<uint32_t> done;
    for (const auto& [slot, p] : pending) {
      uint64_t gen = 0;
      auto seen = ReadSlotState(slot, &gen);
      const bool freed = seen.ok() && !(*seen == SlotSeen::kMounted && gen == p.generation);
      if (freed) adopt = true;
      if (freed || BootNowMs() >= p.since_ms + kAdoptWaitMs) done.push_back(slot);
    }
    const bool sweep = sweep_since != 0 &&
                       (adopt || lsvc_->Held(kFsLock) == LockMode::kExclusive ||
                        BootNowMs() >= sweep_since + kSweepWaitMs);
    if (sweep) sweep_since = 0;
    if (adopt) {
      Status st = AdoptOrphans();
      if (!st.ok()) spdlog::error("adopting orphans of a recovered node: {}", st.ToString());
    }
    if (sweep) SweepOrphans();
    lk.lock();
    for (uint32_t slot : done) {
      auto it = adopt_pending_.find(slot);
      if (it != adopt_pending_.end() && it->second.since_ms == pending[slot].since_ms) {
        adopt_pending_.erase(it);
      }
    }
  }
}

// ------------------------------------------------------------------------------
// Attributes

Result<Attr> Filesystem::GetAttr(uint64_t ino) {
  InodeGate gate(this, ino, LockMode::kShared);
  AGFS_RETURN_IF_ERROR(gate.status());
  auto h = store_->Begin(true);
  AGFS_RETURN_IF_ERROR(CheckKnown(*h, ino));
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  if ((*ir)->nlink == 0 && !((*ir)->flags & kInodeFlagOrphan)) {
    return Err(Code::kNotFound, "inode " + std::to_string(ino) + " is free");
  }
  return AttrOf(ino, **ir);
}

Result<FsStat> Filesystem::StatFs() {
  Gate gate(this, LockMode::kShared);
  AGFS_RETURN_IF_ERROR(gate.status());
  FsStat s;
  s.blocks = store_->TotalDataBlocks();
  s.bfree = store_->FreeBlocks();  // reads the AG headers if the lock was away
  // Every free block can become an inode.
  s.files = s.blocks;
  s.ffree = s.bfree;
  return s;
}

Status Filesystem::SyncAll() {
  Gate gate(this, LockMode::kShared);
  AGFS_RETURN_IF_ERROR(gate.status());
  return store_->Commit();
}

}  // namespace agorafs
