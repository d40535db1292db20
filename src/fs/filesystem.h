// Filesystem: the agorafs core that every FUSE operation calls.
//
// It never sees a fuse_req_t: callers pass a Caller (uid, gid, groups) and inode
// numbers; results are Status/Result values, mapped to errno in src/fuse/. Inode
// numbers are block numbers (format.h); the FUSE adapter maps its root id 1 to
// root_ino().
//
// Coherence and caching: metadata lives in MetaStore (cache + journal); file data goes
// straight to the device with O_DIRECT (the kernel's page cache is the data cache).
// New data blocks are mapped as unwritten extents, written, and only then marked
// written, so a crash never exposes stale blocks (ordered data).
//
// Kernel references: the FUSE adapter calls AddRef for every entry it hands to the
// kernel and Forget for every forget; Open/Release count open files. An inode whose
// link count drops to zero is put on this node's orphan list and freed when its last
// reference goes (or at the next mount after a crash). Open files count across nodes:
// before the lock leaves, a node publishes the inodes it has open in its slot's
// open-file table, and an orphan another node has open moves onto that node's orphan
// list instead of being freed; that node frees it once it is closed there
// (open_table.cc; docs/DESIGN.md "Orphans and open-unlinked files").
//
// Permission checks: the kernel checks mode bits (default_permissions); this class
// checks what the kernel does not: ownership for chown/chmod/utimes in SetAttr,
// sticky directories, xattr namespaces, and it clears suid/sgid where POSIX says.
//
// Cluster: Mount joins the cluster (Membership: a node slot as a disk lease) and
// starts the lock service. Every public method first takes the filesystem lock
// through a Gate: shared to read, exclusive to change anything; read, write in place,
// getattr and fsync may take it in intent beside the inode's own lock instead
// (InodeGate), so that nodes working on different files do not take turns. A node
// holding it exclusive lets all its own threads in at once; another node asking for it makes
// this node commit its journal, write every cached block home and drop its cache
// (MetaStore::DropAll) before the lock moves (see docs/DESIGN.md, "Multi-node
// mount"). Every write to the device passes Membership's lease guard. When a node
// dies, the lock master replays its journal before anyone gets the lock again.
//
// Kernel attribute caching: lock_epoch() moves each time this node gives the
// filesystem lock up entirely or down to intent (a revoke to anything but shared:
// under intent, other nodes change inodes under their own inode locks), just before
// the lock-loss hook runs
// and before the release. Attributes read under a gate carry the epoch of that gate;
// while it has not moved, nobody else can have changed them. The FUSE adapter lets the
// kernel cache such attributes (MarkAttrsCached) and, in the hook, invalidates every
// inode it did (TakeAttrsCached), so no cached attribute outlives the lock. It bounds
// each timeout by LeaseRemainingMs(): a node cut off from the disk loses its kernel
// cache before anyone may declare it dead (see docs/DESIGN.md, "Kernel caches").
//
// Stale inode numbers: the kernel names inodes by number; another node may free an
// inode and its block be reused. Every inode number the kernel holds is remembered
// with the generation handed out for it; a call naming an inode whose generation
// changed (or that was freed) answers kStale (ESTALE) and touches nothing.
//
// Thread-safety: every public method may be called concurrently from FUSE worker
// threads. Metadata is serialised by MetaStore's handle mutex; data I/O on one inode
// is serialised against truncate by a per-inode reader/writer lock (lock order:
// filesystem gate, inode io lock, MetaStore handle).
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cache/meta_store.h"
#include "cluster/lock_service.h"
#include "cluster/membership.h"
#include "device/block_device.h"
#include "format/format.h"
#include "fs/applock.h"
#include "fs/xattr.h"
#include "journal/journal.h"
#include "lock/lock_manager.h"

namespace agorafs {

struct Caller {
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t pid = 0;
  std::vector<uint32_t> groups;  // supplementary groups (may be empty)
  uint32_t umask = 0;
  bool InGroup(uint32_t g) const;
  bool root() const { return uid == 0; }
};

struct Attr {
  uint64_t ino = 0;
  uint64_t generation = 0;
  uint32_t mode = 0;
  uint32_t nlink = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint64_t rdev = 0;
  uint64_t size = 0;
  uint64_t blocks = 0;  // in 512-byte units, as st_blocks
  struct timespec atime{}, mtime{}, ctime{}, btime{};
  // Filesystem::lock_epoch() of the gate these were read under (0: outside any gate).
  // They are current for as long as lock_epoch() still has this value.
  uint64_t lock_epoch = 0;
  void ToStat(struct stat* st) const;
};

struct SetAttrRequest {
  bool mode = false, uid = false, gid = false, size = false;
  bool atime = false, mtime = false, atime_now = false, mtime_now = false;
  bool ctime = false;
  uint32_t new_mode = 0, new_uid = 0, new_gid = 0;
  uint64_t new_size = 0;
  struct timespec new_atime{}, new_mtime{}, new_ctime{};
  bool has_open_file = false;  // truncate through an open file descriptor (ftruncate)
};

struct FsStat {
  uint64_t blocks = 0, bfree = 0, files = 0, ffree = 0;
  uint32_t bsize = kBlockSize, namemax = kMaxNameLen;
};

struct DirEntryOut {
  std::string name;
  uint64_t ino;
  uint8_t type;   // DT_*
  uint64_t next;  // offset to resume after this entry; entries may share one
  bool has_attr = false;  // with_attrs asked and the inode was readable
  Attr attr;
};

struct MountOptions {
  StoreOptions store;
  bool direct_io_device = true;       // O_DIRECT on the device
  std::string host;                   // for the slot; default gethostname()
  // Cluster timings; zero fields take the superblock's values (tests shorten them).
  uint32_t heartbeat_ms_override = 0;
  uint32_t io_timeout_ms_override = 0;
  uint32_t dead_after_ms_override = 0;
  uint32_t poll_ms = 5;     // message ring polling when the network channel is silent
  // A node that keeps using the filesystem lock keeps it this long after a grant
  // before it yields to another node (an idle node yields at once), so that nodes
  // taking turns get work done between handovers.
  uint32_t min_hold_ms = 20;
  // ... unless it has not used the lock for this long: then it yields at once.
  uint32_t idle_release_us = 500;
  // On images with kIncompatIntentLocks: read, write in place, getattr and fsync take
  // the filesystem lock in intent plus the inode's own lock (Filesystem::InodeGate).
  // Off (mount option `nointent`): they take the filesystem lock as every other call
  // does; for comparisons and diagnosis, other nodes are not affected.
  bool intent_locks = true;
  std::string net_bind;     // "ip:port" for the network hint channel; empty = disk only
  // The filesystem lock cannot be given up safely (its revoke failed): by default the
  // process exits (status 70) and survivors recover the node like a crashed one. Tests
  // that run several nodes in one process set this instead; the node must then be
  // torn down without being used again, like a crashed one.
  std::function<void(const Status&)> on_fatal;
};

// The filesystem lock: the whole filesystem is one cluster lock for now, shared to
// read, exclusive to change (docs/DESIGN.md, "Next: finer locks", for its intent
// mode). Its id lives in the kSuper kind, which nothing else uses at run time.
inline constexpr LockId kFsLock = MakeLockId(LockKind::kSuper, 1);

struct FsInfo {
  uint32_t slot = 0;
  uint64_t generation = 0;
  uint64_t replayed_transactions = 0;
  uint64_t orphans_freed = 0;
  uint64_t orphans_handed_over = 0;  // deleted here, still open on another node
  uint64_t recoveries = 0;         // dead nodes whose journals this node replayed
  uint64_t lock_revokes = 0;       // times this node gave the filesystem lock up/down
  uint64_t inode_lock_revokes = 0;  // times this node gave an inode lock up/down
  uint64_t ag_lock_revokes = 0;    // times this node gave an AG lock up/down
  uint32_t alloc_ag = 0;           // where writes under intent allocate now
  uint64_t lock_revoke_us = 0;     // time all kinds took: commit, write home, drop
};

class Filesystem {
 public:
  // Opens the filesystem on `dev`: reads the superblock, joins the cluster (claims a
  // node slot), starts the lock service, takes the filesystem lock (waiting while a
  // dead node is being recovered), replays this slot's journal and frees the orphans
  // its previous owner left.
  static Result<std::unique_ptr<Filesystem>> Mount(std::unique_ptr<BlockDevice> dev,
                                                   const MountOptions& opts);
  ~Filesystem();
  // Commits, writes everything home, frees orphans, releases the slot. Idempotent.
  Status Unmount();

  uint64_t root_ino() const { return sb_.root_ino; }
  const Superblock& super() const { return sb_; }
  FsInfo info() const;
  MetaStore* store() { return store_.get(); }
  LockService* lock_service() { return lsvc_.get(); }
  Membership* membership() { return member_.get(); }
  // Non-OK once the node stopped writing (journal I/O error).
  Status health() const { return store_->failed(); }

  // Kernel references. `generation` is the one handed to the kernel with the entry.
  void AddRef(uint64_t ino, uint64_t generation, uint64_t n = 1);
  void Forget(uint64_t ino, uint64_t n);

  // Kernel attribute caching (see the header comment).
  uint64_t lock_epoch() const { return lock_epoch_.load(); }
  uint64_t LeaseRemainingMs() const { return member_->LeaseRemainingMs(); }
  // `fn` runs on the lock service's worker thread when this node gives the lock up
  // entirely or down to intent, after lock_epoch() moved and before the release;
  // nullptr clears it.
  void SetLockLossHook(std::function<void()> fn);
  // Remembers that the kernel caches attributes of `ino`; false (nothing remembered,
  // hand out no timeout) when the kernel holds no reference to it, or when
  // `unless_open` and this node has it open (Open without Release). The mark goes when
  // the kernel forgets the inode.
  bool MarkAttrsCached(uint64_t ino, bool unless_open = false);
  // Every inode marked since the last call; clears the marks.
  std::vector<uint64_t> TakeAttrsCached();
  // Whether `ino` is marked; UnmarkAttrs also clears the mark (true if it was set).
  bool AttrsMarked(uint64_t ino);
  bool UnmarkAttrs(uint64_t ino);
  Status Open(uint64_t ino, int flags, const Caller& c);
  void Release(uint64_t ino);

  Result<Attr> GetAttr(uint64_t ino);
  // `epoch`, if given, receives the lock epoch under which the answer was read,
  // also when it is kNotFound (0 if the gate could not be taken): a missing name is
  // as current as a found one while lock_epoch() has not moved.
  Result<Attr> Lookup(uint64_t parent, std::string_view name, uint64_t* epoch = nullptr);
  Result<Attr> SetAttr(const Caller& c, uint64_t ino, const SetAttrRequest& r);
  Result<Attr> Mknod(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode,
                     uint64_t rdev);
  Result<Attr> Mkdir(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode);
  Result<Attr> Symlink(const Caller& c, uint64_t parent, std::string_view name,
                       std::string_view target);
  Result<std::string> Readlink(uint64_t ino);
  Status Unlink(const Caller& c, uint64_t parent, std::string_view name);
  Status Rmdir(const Caller& c, uint64_t parent, std::string_view name);
  // flags: RENAME_NOREPLACE, RENAME_EXCHANGE (linux/fs.h values)
  Status Rename(const Caller& c, uint64_t parent, std::string_view name, uint64_t newparent,
                std::string_view newname, unsigned flags);
  Result<Attr> Link(const Caller& c, uint64_t ino, uint64_t newparent, std::string_view newname);

  // Reads up to len bytes at off into buf; returns bytes read (short at EOF).
  Result<size_t> Read(uint64_t ino, uint64_t off, size_t len, char* buf);
  // With `append`, `off` is ignored and the data goes at the end of file as it is on
  // disk now (O_APPEND writers on several nodes never overwrite each other).
  Result<size_t> Write(const Caller& c, uint64_t ino, uint64_t off, const char* buf, size_t len,
                       bool append = false);
  Status Fsync(uint64_t ino, bool datasync);
  Status SyncAll();
  // mode: 0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE,
  // FALLOC_FL_ZERO_RANGE.
  Status Fallocate(const Caller& c, uint64_t ino, int mode, uint64_t off, uint64_t len);
  Result<uint64_t> Lseek(uint64_t ino, uint64_t off, int whence);
  Result<size_t> CopyFileRange(const Caller& c, uint64_t ino_in, uint64_t off_in,
                               uint64_t ino_out, uint64_t off_out, size_t len);

  // Lists entries after `off` ("." is offset 1, ".." 2, then name hashes) until fn
  // returns false. With with_attrs each entry carries its inode's attributes. fn runs
  // while the metadata handle is held: it must not call back into Filesystem (AddRef
  // excepted). Several entries can share one `next` (a hash collision):
  // a caller that stops inside such a group must drop the entries of the group it
  // already took, since resuming from that offset re-delivers the whole group.
  Status ReadDir(uint64_t ino, uint64_t off, bool with_attrs,
                 const std::function<bool(const DirEntryOut&)>& fn);
  Result<FsStat> StatFs();

  Status SetXattr(const Caller& c, uint64_t ino, std::string_view name, std::string_view value,
                  int flags);
  // Returns the value; kRange when `size` is non-zero and too small.
  Result<std::string> GetXattr(const Caller& c, uint64_t ino, std::string_view name);
  Result<std::string> ListXattr(const Caller& c, uint64_t ino);  // NUL-separated
  Status RemoveXattr(const Caller& c, uint64_t ino, std::string_view name);

  // Application locks, cluster-wide (applock_ops.cc; docs/DESIGN.md "Application
  // locks"). `want` gives kind, type, range, owner (the kernel's lock_owner) and pid;
  // this node's slot and generation are filled in here. Lock changes touch no times.
  // TestLock: the first live lock of another owner that conflicts with `want` (shared
  // gate), or one of type kUnlock; a holder on another node is reported with pid 0.
  Result<AppLock> TestLock(uint64_t ino, AppLock want);
  // SetLock: takes (read/write) or drops (kUnlock) `want` under the exclusive gate, and
  // prunes the entries of node generations that are gone. kAgain when a live lock of
  // another owner conflicts (nothing else changed, but see `wait`), kNoLocks when the
  // table is full.
  // `wait`: the caller waits on kAgain and asks again (F_SETLKW). A POSIX request
  // then stays recorded as waiting (cluster-wide, on the root inode) until a call
  // grants it or CancelLockWait; and instead of kAgain it gets kDeadlock (recorded no
  // more) when some holder of a conflicting lock waits, directly or through other
  // waiting owners, for a lock this owner holds.
  Status SetLock(uint64_t ino, AppLock want, bool wait = false);
  // The waiting request `want` (as given to SetLock) stopped waiting without a grant:
  // interrupted, unmounted, or failed. Nothing if it is not recorded.
  Status CancelLockWait(uint64_t ino, AppLock want);
  // Drops every lock of `kind` that `owner` of this node holds on `ino` (close/release).
  // Free when this node never locked `ino` since it mounted.
  Status ReleaseLocks(uint64_t ino, AppLockKind kind, uint64_t owner);
  // False only when membership positively knows that node generation is gone.
  bool LockOwnerLive(uint32_t slot, uint64_t generation) const;

 private:
  // Per-inode locks for data I/O; exists only while some operation uses it.
  struct InodeState {
    std::shared_mutex io;   // shared: read/write data; exclusive: truncate/punch
    std::mutex write_mu;    // serialises writers (appends, size updates)
  };
  // Kernel references (FUSE lookup counts and open files), one small entry per inode
  // the kernel knows: it can hold hundreds of thousands.
  struct Refs {
    uint64_t lookups = 0;
    uint64_t opens = 0;
    uint64_t generation = 0;  // as handed to the kernel (0: unknown, not checked)
    bool attrs_cached = false;  // MarkAttrsCached since the last TakeAttrsCached
    // The last write here had to allocate (or mark blocks written): the next one takes
    // an AG lock at once instead of trying the inode lock alone first.
    bool write_allocates = false;
    // Under intent, CheckKnown found the inode allocated at this stamp (lock_epoch_
    // and free_epoch_); it asks the bitmap again once either moved (0: never).
    uint64_t known_epoch = 0;
    uint64_t known_free_epoch = 0;
  };

 public:
  // The filesystem lock, taken by every public method (see the header comment).
  // Nested gates on one thread cost nothing; asking for exclusive while the thread
  // holds only shared is refused (it could deadlock).
  class Gate {
   public:
    Gate(Filesystem* fs, LockMode mode);
    ~Gate();
    Gate(const Gate&) = delete;
    Gate& operator=(const Gate&) = delete;
    const Status& status() const { return st_; }

   private:
    Filesystem* fs_;
    LockMode prev_ = LockMode::kNone;
    uint64_t prev_epoch_ = 0;
    bool pinned_ = false;
    Status st_;
  };

  // The gate of a call that reads (`mode` shared) or changes (exclusive) one inode's
  // data and attributes in place: read, write within written extents, getattr, fsync.
  // With intent locks (MountOptions::intent_locks on an image with
  // kIncompatIntentLocks), a thread outside any gate takes the filesystem lock in
  // intent and the inode's own lock in `mode`, so nodes working on different files
  // hold the filesystem lock together. It takes intent except for a read on a node
  // that holds nothing or shared (that asks shared, which other readers and lookups
  // share); also on an exclusive hold, which a revoke down to intent then keeps
  // (docs/DESIGN.md, "Intent and inode locks"). Whenever the mode pinned covers
  // `mode` by itself (shared or exclusive), no inode lock is taken: nobody else can
  // hold intent then. Inside another gate, as Gate. At most two inode locks per
  // thread: a second InodeGate inside the first pins another inode's lock, which the
  // caller must take with no MetaStore handle open and only where it cannot close a
  // cycle (a directory's child after the directory; never the other way round), and
  // never after an AgGate. Under intent, attributes carry no lock epoch (the kernel
  // gets no timeout for them) and MetaStore may touch only the blocks of the pinned
  // inode locks (a directory's leaf blocks go with its inode lock) and of an AG lock
  // pinned by an AgGate inside.
  class InodeGate {
   public:
    InodeGate(Filesystem* fs, uint64_t ino, LockMode mode);
    ~InodeGate();
    InodeGate(const InodeGate&) = delete;
    InodeGate& operator=(const InodeGate&) = delete;
    const Status& status() const { return st_; }

   private:
    Filesystem* fs_;
    std::optional<Gate> gate_;
    LockId pinned_ = 0;  // the inode lock this gate pinned, 0 if none
    int slot_ = 0;       // which of the thread's two inode-lock slots it went into
    Status st_;
  };

  // Inside an InodeGate that took intent: pins AG `ag`'s lock exclusively for the
  // rest of the scope, so that MetaStore may allocate (and free) in that AG and no
  // other. Outside intent it does nothing (the filesystem lock held exclusively
  // covers every AG; anything less allocates nothing). One AG lock per thread, taken
  // with no MetaStore handle open (AG locks come last in the lock order).
  class AgGate {
   public:
    AgGate(Filesystem* fs, uint32_t ag);
    ~AgGate();
    AgGate(const AgGate&) = delete;
    AgGate& operator=(const AgGate&) = delete;
    const Status& status() const { return st_; }

   private:
    Filesystem* fs_;
    LockId pinned_ = 0;
    Status st_;
  };

 private:
  Filesystem() = default;
  // After a Gate: kStale when the kernel's inode `ino` no longer exists as it knew it.
  Status CheckKnown(MetaStore::Handle& h, uint64_t ino);
  Status CheckKnown(uint64_t ino);
  std::shared_ptr<InodeState> State(uint64_t ino);
  void MaybeFreeOrphan(uint64_t ino);
  // Whether a read outside any gate should take the filesystem lock in intent rather
  // than shared: with intent locks on, when this node holds intent or exclusive.
  bool ReadsUnderIntent() const;
  // Unlink, Rmdir and Rename put an inode the kernel still references on this node's
  // orphan list, and the kernel's forget that lets it be freed comes after the reply,
  // queued behind every other forget (after the kernel dropped its dentry cache, tens
  // of thousands). When `op` fails with kNoSpace while the list is full, this waits
  // (polling every 10 ms, outside any gate) up to kOrphanRoomWaitMs for room and
  // runs it again; the list fills for good only with that many deleted files still
  // open, and then the caller gets ENOSPC. `op` must change nothing when it fails
  // there (each adds to the list before anything else).
  static constexpr int kOrphanRoomWaitMs = 2000;
  static constexpr std::string_view kOrphanListFull =
      "orphan list full (too many deleted files still referenced)";
  Status RetryWhileOrphanListFull(const std::function<Status()>& op);
  Status UnlinkOnce(const Caller& c, uint64_t parent, std::string_view name);
  Status RmdirOnce(const Caller& c, uint64_t parent, std::string_view name);
  Status RenameOnce(const Caller& c, uint64_t parent, std::string_view name, uint64_t newparent,
                    std::string_view newname, unsigned flags);

  // Helpers used under a MetaStore handle (implemented in fs/*.cc).
  friend class FsOps;

  Superblock sb_{};
  Geometry g_{};
  Uuid uuid_{};
  std::unique_ptr<BlockDevice> dev_;   // the raw device (reads, superblock)
  BlockDevice* io_ = nullptr;          // every write: through the lease guard
  std::unique_ptr<Membership> member_;
  std::unique_ptr<LockService> lsvc_;
  std::unique_ptr<LockManager> locks_;  // what MetaStore checks: the gate
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<MetaStore> store_;
  FsInfo info_;
  std::atomic<uint64_t> next_gen_{1};
  MountOptions opts_;

  std::mutex states_mu_;
  std::unordered_map<uint64_t, Refs> refs_;                          // GUARDED_BY(states_mu_)
  std::unordered_set<uint64_t> open_inos_;  // refs_ entries with opens > 0; GUARDED_BY(states_mu_)
  // Inodes marked attrs_cached, in marking order; entries whose refs_ entry is gone
  // or unmarked are skipped, and dropped when the list grows past twice refs_'
  // size. 8 bytes an inode instead of a second hash table.        GUARDED_BY(states_mu_)
  std::vector<uint64_t> attrs_cached_;
  std::atomic<uint64_t> lock_epoch_{1};
  std::mutex hook_mu_;
  std::function<void()> lock_loss_hook_;  // GUARDED_BY(hook_mu_)
  std::unordered_map<uint64_t, std::weak_ptr<InodeState>> states_;  // GUARDED_BY(states_mu_)

  // Inodes on which this node (this mount) may hold application locks; every entry of
  // this node's generation was written by this process, so an inode missing here has
  // none and close/release skip it.                       GUARDED_BY(applock_mu_)
  std::mutex applock_mu_;
  std::unordered_set<uint64_t> applock_inos_;

  // Cluster (filesystem.cc).
  bool unmounted_ = false;
  mutable std::mutex info_mu_;
  // Janitor: adopts the orphans of recovered nodes once the lock is granted again.
  std::thread janitor_;
  std::condition_variable janitor_cv_;
  bool janitor_stop_ = false;
  struct AdoptPending {
    uint64_t generation;  // of the recovered node
    uint64_t since_ms;    // BootNowMs of the recovery
  };
  std::map<uint32_t, AdoptPending> adopt_pending_;  // recovered slots not yet adopted
  bool janitor_sweep_ = false;  // a file this node had published as open was closed
  Status RecoverSlot(uint32_t slot, uint64_t generation);
  Status OnRevoke(LockMode to);
  // An inode or AG lock goes down to `to`: its blocks are written home, and dropped
  // unless `to` is shared.
  Status OnFineRevoke(LockId id, LockMode to);
  bool intent_locks_ = false;  // InodeGate takes intent (set at mount)
  // Under intent, the AG a write that allocates locks first: this node's own,
  // home_ag_ (slot * AG count / slots), until it fills, then the next one with room,
  // and home again once space may have been freed (data.cc, InEachAg).
  uint32_t home_ag_ = 0;
  std::atomic<uint32_t> alloc_ag_{0};
  std::atomic<uint64_t> alloc_epoch_{0};  // lock_epoch_ when alloc_ag_ last moved
  // Moves when this node frees an inode (CheckKnown's stamp under intent).
  std::atomic<uint64_t> free_epoch_{1};

  // References and orphans (filesystem.cc).
  // true: no refs left. *closed (if given): the last open went.
  bool DropRefs(uint64_t ino, uint64_t lookups, uint64_t opens, bool* closed = nullptr);
  bool Referenced(uint64_t ino);
  Status AddOrphan(MetaTxn& h, uint64_t ino) { return AddOrphan(h, info_.slot, ino); }
  Status AddOrphan(MetaTxn& h, uint32_t slot, uint64_t ino);
  Status RemoveOrphan(MetaTxn& h, uint32_t slot, uint64_t ino);
  Status FreeInode(uint32_t orphan_slot, uint64_t ino);
  Status FreeOrphans(uint32_t slot, bool only_unreferenced);
  Result<std::vector<uint64_t>> OrphansOf(uint32_t slot);
  // Moves the orphans of every slot nobody owns (free: its node left or was recovered)
  // onto this node's list and frees those not referenced here.
  Status AdoptOrphans();
  void JanitorLoop();

  // Open-file tables and orphans open elsewhere (open_table.cc).
  struct RemoteOpens {
    std::unordered_map<uint64_t, uint32_t> where;  // inode -> a slot that has it open
    std::vector<uint32_t> anywhere;  // slots whose table overflowed or is unreadable
  };
  std::vector<uint64_t> OpenHere();  // sorted
  bool OpenLocally(uint64_t ino);
  // Writes this node's open inodes to its table if they changed since the last
  // publication (`leaving`: an empty table). Called before the lock leaves the node.
  Status PublishOpens(bool leaving = false);
  // True when the table on disk may list `ino` (then its close asks for a sweep).
  bool WasPublished(uint64_t ino);
  enum class SlotSeen { kFree, kMounted, kUnknown };
  // From the slot's heartbeat block on disk; *generation set when it verifies.
  Result<SlotSeen> ReadSlotState(uint32_t slot, uint64_t* generation);
  Status LoadRemoteOpens(RemoteOpens* out);
  // Exclusive gate: a slot of another node that may have `ino` open, or none.
  Result<std::optional<uint32_t>> OpenElsewhere(uint64_t ino);
  // Exclusive gate, no local opens: frees the orphan `ino` of `list_slot`'s list
  // (true), or moves it onto the list of a node that has it open (false); false also
  // when it is no longer an orphan there.
  Result<bool> DisposeOrphan(uint32_t list_slot, uint64_t ino);
  // Frees or passes on every orphan of this node's list that is not open here.
  void SweepOrphans();
  void RequestSweep();

  std::mutex open_table_mu_;
  std::vector<uint64_t> published_;  // sorted; GUARDED_BY(open_table_mu_)
  bool published_overflow_ = false;  // GUARDED_BY(open_table_mu_)
  bool published_valid_ = true;      // false after a failed write; GUARDED_BY(open_table_mu_)
  uint64_t publication_ = 0;         // GUARDED_BY(open_table_mu_)
  std::mutex remote_mu_;
  RemoteOpens remote_;               // GUARDED_BY(remote_mu_)
  bool remote_valid_ = false;        // GUARDED_BY(remote_mu_)
  uint64_t remote_at_ = 0;           // revokes_ when remote_ was read; GUARDED_BY(remote_mu_)
  std::atomic<uint64_t> revokes_{0};  // every OnRevoke, to shared or to none
  std::atomic<uint64_t> recovered_{0};  // every RecoverSlot

  // Application locks (applock_ops.cc).
  Status StoreLockTable(MetaTxn& h, uint64_t ino, const applock::Table& t, xattr::Entries list,
                        const AppLock& want);
  // The root inode's xattrs, the raw wait list among them ("" if none) and its
  // entries (empty, logged, when it does not decode).
  struct LockWaits {
    xattr::Entries xattrs;
    std::string stored;
    applock::Waits waits;
  };
  Result<LockWaits> ReadLockWaits(MetaTxn& h);
  // Adds (or with add false removes) the wait of `l` on `ino` in `lw` (as read in this
  // handle) and stores it, pruning the waits of node generations that are gone; the
  // root inode is not written when nothing changes.
  Status UpdateLockWaits(MetaTxn& h, LockWaits lw, uint64_t ino, const AppLock& l, bool add);
  // Whether `want` waiting on `ino` (whose table is `t`) closes a cycle of waiters.
  Result<bool> WouldDeadlock(MetaTxn& h, uint64_t ino, const applock::Table& t,
                             const AppLock& want, const applock::Waits& waits);

  // Data (data.cc).
  // Unmaps every block at or past new_size, in bounded transactions; the inode is on
  // the orphan list of `slot` meanwhile so that a crash finishes the job at mount.
  Status TruncateBlocks(uint32_t slot, uint64_t ino, uint64_t new_size);
  Status Truncate(const Caller& c, uint64_t ino, uint64_t new_size, bool update_times);
  Status ConvertInlineToExtents(MetaTxn& h, uint64_t ino, InodeBlock* I);
  // Zeroes, on the device, the bytes of `from`'s block from `from` to the block's end
  // if that block holds written data. Bytes past the end of file may hold anything:
  // a crash between a write's data reaching the device and its commit leaves them
  // there. So every call that moves the end of file up zeroes them first (truncate,
  // fallocate) or treats them as zeros (write), and truncate down zeroes them too.
  Status ZeroPartialBlock(MetaTxn& h, uint64_t ino, const InodeBlock& I, uint64_t from);
  Result<Attr> CreateNode(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode,
                          uint64_t rdev, std::string_view symlink_target);
  Result<Attr> CreateNodeOnce(const Caller& c, uint64_t parent, std::string_view name,
                              uint32_t mode, uint64_t rdev, std::string_view symlink_target);
  // Under an InodeGate that took intent: runs `f` (which allocates) with an AgGate on
  // this node's current AG, and on the next AG that may have room while `f` fails
  // with kNoSpace, each AG at most once; then returns that kNoSpace (the caller runs
  // `f` under the filesystem lock held exclusively). In data.cc.
  template <typename F>
  auto InEachAg(F f) -> decltype(f());
  // `*allocated` (if given) tells whether the write had to allocate blocks, convert
  // inline data or mark blocks written. With `in_place_only` it then changes nothing
  // and returns 0; otherwise it allocates in the AGs the caller's gates cover (the
  // AgGate's, or every AG under the filesystem lock held exclusively).
  Result<size_t> WriteOnce(const Caller& c, uint64_t ino, uint64_t off, const char* buf,
                           size_t len, bool append, bool in_place_only = false,
                           bool* allocated = nullptr);
  Status FallocateOnce(const Caller& c, uint64_t ino, int mode, uint64_t off, uint64_t len);
  uint64_t NextGeneration() { return next_gen_++; }
};

}  // namespace agorafs
