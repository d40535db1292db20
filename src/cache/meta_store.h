// MetaStore: the node's metadata buffer cache, running transaction and block allocator.
//
// What it does
// - Caches verified 4 KiB metadata blocks, each tagged with the lock that covers it.
// - Collects every block changed through a Handle into the running transaction.
//   Commit() seals those blocks (checksum, seq), copies them, and writes the copies
//   to this node's journal (Journal::Commit: write, flush, commit record, flush).
//   Ordered data: the filesystem allocates new data blocks as unwritten extents,
//   writes the data, and only then marks them written in a later handle; the commit
//   flushes the device before its commit record, so metadata never points at data
//   that is not on disk.
// - Checkpoint() writes committed copies home, flushes the device and advances the
//   journal tail. Until a block's newest copy is home the block stays in the cache.
// - Allocates blocks from allocation groups (bitmap + AG header, under the AG's
//   lock): only from AGs whose lock the LockManager says the caller holds
//   exclusively (kNoSpace "... in the allocation groups held" when those are full
//   but others were not tried), and frees only in such AGs. A freed block is not
//   handed out again until the transaction that freed it is checkpointed: replaying
//   an older transaction can then never overwrite it.
// - DropLock(id): commit, checkpoint and drop every block of that lock — what a lock
//   revocation requires before the lock may be released; for an AG lock it also
//   forgets that AG's counts. For an inode lock it also drops every directory leaf
//   block that is clean and home: until leaves have locks of their own, a
//   directory's leaves are used under its inode lock, and the store cannot tell
//   which directory a leaf belongs to. DropAll() does it for every block and forgets
//   every AG's counts (another node may change them). An AG's header is read again by
//   the first allocation or free in it, or by FreeBlocks() (a node that got the lock
//   back only to read or to overwrite in place reads none).
// - Every block read or written is checked against the LockManager (Acquire) on a
//   cache miss, and on every write even when cached.
//
// Thread-safety
// - One mutex (mu_) serialises all metadata access: a Handle holds it from Begin()
//   to its destruction, so filesystem code running under a Handle sees a stable
//   cache. Never call Commit/Checkpoint/Sync/DropLock while holding a Handle.
// - Commit and checkpoint I/O run outside mu_ under commit_mu_ (lock order:
//   commit_mu_ before mu_). A background thread commits every commit_interval_ms
//   and checkpoints when the journal is half full.
// - After a journal or home-write I/O error the store is failed: every new write
//   handle and every commit returns kIOError (the node must stop writing).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cache/block_pool.h"
#include "cache/meta_txn.h"
#include "device/block_device.h"
#include "format/format.h"
#include "journal/journal.h"
#include "lock/lock_manager.h"

namespace agorafs {

// What one cached block costs in memory: its 4 KiB plus bookkeeping (Buffer, the
// cache and LRU entries, the per-lock index: about 380 bytes for an inode block, each
// inode having its own lock). A cache= size is divided by this.
inline constexpr size_t kCacheBytesPerBlock = kBlockSize + 384;

struct StoreOptions {
  // Cached blocks plus committed copies not yet home; default 64 MiB in all.
  size_t cache_blocks = (size_t(64) << 20) / kCacheBytesPerBlock;
  uint32_t commit_interval_ms = 1000;   // background group commit
  bool background = true;               // run the background commit thread
};

struct StoreStats {
  uint64_t commits = 0;
  uint64_t checkpoints = 0;
  uint64_t blocks_journaled = 0;
  uint64_t cache_hits = 0;
  uint64_t cache_misses = 0;
  uint64_t cached_blocks = 0;
  uint64_t readahead_blocks = 0;  // inode blocks cached by reading around a miss
  uint64_t readahead_used = 0;    // ... of which were used before being evicted
};

class MetaStore {
 public:
  MetaStore(BlockDevice* dev, const Superblock& sb, Journal* journal, LockManager* locks,
            StoreOptions opts);
  ~MetaStore();
  MetaStore(const MetaStore&) = delete;
  MetaStore& operator=(const MetaStore&) = delete;

  // Reads every AG header (free counts). Starts the background thread.
  Status Init();
  // Stops the background thread (after a final Sync by the caller).
  void Stop();

  class Handle final : public MetaTxn {
   public:
    ~Handle() override;
    Handle(Handle&&) = delete;
    bool read_only() const override { return read_only_; }
    const Uuid& uuid() const override;
    Result<const uint8_t*> Read(uint64_t blk, BlockType type, LockId lock) override;
    Result<uint8_t*> Write(uint64_t blk, BlockType type, LockId lock) override;
    Result<std::pair<uint64_t, uint8_t*>> NewBlock(BlockType type, LockId lock,
                                                   uint64_t hint) override;
    Result<Allocation> AllocData(uint64_t hint, uint32_t want) override;
    Status Free(uint64_t blk, uint64_t count) override;
    // Whether the allocation bitmap marks `blk` in use (kCorruption outside the data
    // area). A freed metadata block keeps its old contents at home: callers that must
    // know whether an inode still exists ask the bitmap. Without the AG's lock (and
    // no cached copy) the bitmap block is read from home and not cached: right for a
    // bit that only a holder of the lock covering the whole filesystem exclusively
    // may clear (an inode's), since that holder wrote it home before anyone else
    // could ask, while another node may be setting other bits in the same block.
    Result<bool> Allocated(uint64_t blk);
    // Sequence of the running transaction this handle writes into.
    uint64_t seq() const { return seq_; }

   private:
    friend class MetaStore;
    Handle(MetaStore* s, bool ro);
    MetaStore* s_;
    std::unique_lock<std::mutex> lk_;
    bool read_only_;
    uint64_t seq_;
  };

  // Waits while the running transaction is too big to grow by `credits` blocks,
  // committing it if needed, then returns a handle holding mu_.
  std::unique_ptr<Handle> Begin(bool read_only = false, uint32_t credits = 64);

  // Makes every change made before the call durable. OK also when nothing changed
  // (then only the device is flushed).
  Status Commit();
  // Commit, then write everything home and empty the journal.
  Status Sync();
  // When freed blocks wait for a checkpoint, checkpoints so that they can be handed
  // out again; true if there were any. Call without a Handle, after an allocation
  // failed with kNoSpace, then retry once.
  Result<bool> Reclaim();
  // Commit, checkpoint, and drop every cached block covered by `lock`.
  Status DropLock(LockId lock);
  // Commit, checkpoint, and drop every cached block and the in-memory allocation
  // counts: what giving up a lock that covers all metadata requires. The AG headers
  // are read again by the next allocation, free or FreeBlocks().
  Status DropAll();

  // Sum over all AGs (pending frees included); first reads the header of each AG
  // whose counts were forgotten: the caller holds a lock that covers all AG headers
  // (the filesystem lock, shared or exclusive).
  uint64_t FreeBlocks();
  uint64_t TotalDataBlocks() const;     // blocks in all AGs
  // A hint for choosing an AG, under no lock: AG `ag`'s free count as this node knows
  // it, or else as its header at home says (read, not cached; 0 when unreadable).
  // Home lags the journal of a node holding the AG's lock.
  uint64_t PeekAgFree(uint32_t ag);
  StoreStats stats() const;
  Status failed() const;
  const Superblock& super() const { return sb_; }
  const Geometry& geometry() const { return g_; }
  BlockDevice* device() const { return dev_; }
  std::mutex& commit_mutex() { return commit_mu_; }

 private:
  struct Buffer {
    explicit Buffer(BlockPool* pool) : data(pool) {}
    uint64_t blk = 0;
    LockId lock = 0;
    PoolBlock data;
    bool dirty = false;           // changed in the running transaction
    uint64_t unhomed_seq = 0;     // newest committed seq not yet written home (0 = none)
    std::list<uint64_t>::iterator lru;
    bool in_lru = false;
    bool readahead = false;       // cached by ReadInodesAround and not used since
  };
  struct Committed {
    uint64_t seq;
    std::vector<std::pair<uint64_t, std::shared_ptr<PoolBlock>>> blocks;
    std::vector<std::pair<uint64_t, uint64_t>> freed;  // (start, count)
  };

  // All below require mu_ held.
  Result<Buffer*> GetLocked(uint64_t blk, BlockType type, LockId lock, bool for_write);
  void DropLeavesLocked();
  Status ReadInodesAround(uint64_t blk, uint8_t* out);
  void MarkDirty(Buffer* b);
  void Touch(Buffer* b);
  void EvictLocked();
  size_t BlocksInMemory() const;  // cached blocks + committed copies not yet home
  Result<Allocation> AllocLocked(uint64_t hint, uint32_t want, bool metadata);
  Result<Allocation> AllocInAg(uint32_t ag, uint64_t from, uint32_t want);
  Status FreeLocked(uint64_t blk, uint64_t count);
  bool PendingFree(uint64_t blk, uint64_t* skip_to) const;

  Status CommitInternal();
  Status LoadAgsLocked();               // every AG, at Init
  // AG `ag`'s free count as its header at home says: read (not cached), verified and
  // checked for impossible counts (kCorruption). No mutex needed.
  Result<uint64_t> HomeAgFree(uint32_t ag) const;
  Status LoadAgLocked(uint32_t ag);     // one AG's header, read from home
  void ForgetAgLocked(uint32_t ag);     // its lock went: counts unknown until read again
  Status ReloadAgIfStaleLocked(uint32_t ag);
  void DropBufferLocked(uint64_t blk);
  size_t TxnLimit() const;
  Status CheckpointInternal();
  void BackgroundLoop();

  BlockDevice* dev_;
  Superblock sb_;
  Uuid uuid_;
  Geometry g_;
  Journal* journal_;
  LockManager* locks_;
  StoreOptions opts_;
  BlockPool pool_;  // before every Buffer and copy, destroyed after them

  std::mutex commit_mu_;  // serialises journal I/O; taken before mu_
  StageBuffer home_stage_;  // checkpoint's home writes, under commit_mu_
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<uint64_t, std::unique_ptr<Buffer>> cache_;  // GUARDED_BY(mu_)
  std::unordered_map<LockId, std::unordered_set<uint64_t>> by_lock_;
  std::list<uint64_t> lru_;                                       // clean, evictable
  std::unordered_set<uint64_t> dirty_;                            // running txn
  std::vector<std::pair<uint64_t, uint64_t>> running_freed_;
  uint64_t running_seq_ = 1;
  std::deque<Committed> committed_;                                // not yet home
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> pending_free_;  // start -> (len, seq)
  std::vector<uint64_t> ag_free_;
  std::vector<uint32_t> ag_rotor_;   // where the next search in each AG starts
  std::vector<uint64_t> ag_first_free_;  // no free block below this offset in the AG
  std::vector<bool> ag_bad_;         // header unreadable: allocate nothing there
  std::vector<bool> ag_stale_;       // counts dropped with the AG's lock: reload first
  uint64_t free_total_ = 0;          // sum of ag_free_ (stale AGs count 0)
  size_t unhomed_copies_ = 0;
  uint64_t pending_total_ = 0;  // blocks in pending_free_
  Status failed_;
  StoreStats stats_;
  // Readahead feedback, halved now and then so that it follows the workload: blocks
  // read around a miss that were used, and that were evicted unused.
  uint64_t ra_used_ = 0, ra_unused_ = 0;
  uint32_t ra_misses_ = 0;  // inode misses, for the occasional probe while it does not pay

  std::thread bg_;
  bool stop_ = false;
  std::condition_variable bg_cv_;
};

}  // namespace agorafs
