#include "cache/meta_store.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "util/log_once.h"

namespace agorafs {

MetaStore::MetaStore(BlockDevice* dev, const Superblock& sb, Journal* journal,
                     LockManager* locks, StoreOptions opts)
    : dev_(dev), sb_(sb), g_(GeometryOf(sb)), journal_(journal), locks_(locks), opts_(opts) {
  std::memcpy(uuid_.data(), sb.hdr.uuid, uuid_.size());
  if (opts_.cache_blocks < 256) opts_.cache_blocks = 256;
}

MetaStore::~MetaStore() { Stop(); }

size_t MetaStore::TxnLimit() const {
  // A transaction must fit in half the log, so that a full checkpoint always makes
  // room for it; keep a margin for descriptor blocks.
  size_t cap = journal_->Capacity();
  return std::max<size_t>(16, cap / 3);
}

Status MetaStore::Init() {
  running_seq_ = journal_->last_committed() + 1;
  {
    std::lock_guard<std::mutex> g(mu_);
    AGFS_RETURN_IF_ERROR(LoadAgsLocked());
  }
  if (opts_.background) bg_ = std::thread([this] { BackgroundLoop(); });
  return Status::Ok();
}

Status MetaStore::LoadAgsLocked() {
  ag_free_.assign(g_.ag_count, 0);
  ag_rotor_.assign(g_.ag_count, 0);
  ag_first_free_.assign(g_.ag_count, 0);
  ag_bad_.assign(g_.ag_count, false);
  ag_stale_.assign(g_.ag_count, true);
  free_total_ = 0;
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) AGFS_RETURN_IF_ERROR(LoadAgLocked(ag));
  return Status::Ok();
}

Result<uint64_t> MetaStore::HomeAgFree(uint32_t ag) const {
  AlignedBuffer buf(kBlockSize);
  const uint64_t blk = g_.AgStart(ag);
  AGFS_RETURN_IF_ERROR(dev_->Read(blk * kBlockSize, buf.data(), kBlockSize));
  AGFS_RETURN_IF_ERROR(VerifyBlock(buf.data(), BlockType::kAgHeader, blk, uuid_));
  const auto* h = reinterpret_cast<const AgHeader*>(buf.data());
  if (h->ag_index != ag || h->blocks != g_.AgSize(ag) || h->free_blocks > h->blocks) {
    return Err(Code::kCorruption, "AG header " + std::to_string(ag) + " has impossible counts");
  }
  return uint64_t(h->free_blocks);
}

Status MetaStore::LoadAgLocked(uint32_t ag) {
  auto free = HomeAgFree(ag);
  ag_rotor_[ag] = 0;
  ag_first_free_[ag] = 0;
  if (!free.ok()) {
    // An I/O error leaves the AG stale (allocate nothing there until a later read
    // works); a damaged header makes it unusable until its counts are forgotten
    // again (the next loss of its lock).
    if (free.status().Is(Code::kIOError)) return free.status();
    spdlog::error("allocation group {} unusable: {}", ag, free.status().ToString());
    ag_bad_[ag] = true;
    ag_stale_[ag] = false;
    return Status::Ok();
  }
  ag_free_[ag] = *free;
  free_total_ += *free;
  ag_stale_[ag] = false;
  return Status::Ok();
}

void MetaStore::ForgetAgLocked(uint32_t ag) {
  free_total_ -= std::min<uint64_t>(free_total_, ag_free_[ag]);
  ag_free_[ag] = 0;
  ag_rotor_[ag] = 0;
  ag_first_free_[ag] = 0;
  ag_bad_[ag] = false;
  ag_stale_[ag] = true;
}

Status MetaStore::ReloadAgIfStaleLocked(uint32_t ag) {
  if (!ag_stale_[ag]) return Status::Ok();
  // The allocation counts were dropped with the lock that covers them; the caller
  // holds it again now.
  Status st = LoadAgLocked(ag);
  if (!st.ok()) {
    spdlog::error("reading allocation group header {}: {}", ag, st.ToString());
    return Err(st.code(), "reading allocation group header " + std::to_string(ag) + ": " +
                              st.message());
  }
  return Status::Ok();
}

void MetaStore::Stop() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  bg_cv_.notify_all();
  if (bg_.joinable()) bg_.join();
}

void MetaStore::BackgroundLoop() {
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    bg_cv_.wait_for(lk, std::chrono::milliseconds(opts_.commit_interval_ms));
    if (stop_) break;
    bool work = !dirty_.empty() || !committed_.empty();
    if (!work || !failed_.ok()) continue;
    lk.unlock();
    {
      std::lock_guard<std::mutex> clk(commit_mu_);
      Status st = CommitInternal();
      if (st.ok() && (journal_->FreeBlocks() < journal_->Capacity() / 2 ||
                      BlocksInMemory() > opts_.cache_blocks ||
                      unhomed_copies_ > opts_.cache_blocks / 8)) {
        st = CheckpointInternal();
      }
      if (!st.ok()) spdlog::error("background commit failed: {}", st.ToString());
    }
    lk.lock();
  }
}

// ------------------------------------------------------------------------------
// Handles

MetaStore::Handle::Handle(MetaStore* s, bool ro)
    : s_(s), lk_(s->mu_), read_only_(ro), seq_(s->running_seq_) {
  s_->EvictLocked();
}

MetaStore::Handle::~Handle() { s_->EvictLocked(); }

const Uuid& MetaStore::Handle::uuid() const { return s_->uuid_; }

std::unique_ptr<MetaStore::Handle> MetaStore::Begin(bool read_only, uint32_t credits) {
  for (;;) {
    std::unique_ptr<Handle> h(new Handle(this, read_only));
    if (read_only || !failed_.ok()) return h;
    // An empty transaction always takes the handle, however many credits it asks.
    bool txn_full = !dirty_.empty() && dirty_.size() + credits > TxnLimit();
    // Frees wait for a checkpoint before reuse; once they are a sizeable part of what
    // is left, checkpoint so that allocation does not run dry with space "free".
    const uint64_t usable = free_total_ > pending_total_ ? free_total_ - pending_total_ : 0;
    bool reclaim = pending_total_ > 0 && pending_total_ > usable / 4;
    // Dirty and not-yet-home blocks cannot be evicted: past the budget, write them
    // home first (one handle's blocks may still go over it until its end).
    bool cache_full = BlocksInMemory() > opts_.cache_blocks;
    if (!txn_full && !cache_full && !reclaim) return h;
    h.reset();
    std::lock_guard<std::mutex> clk(commit_mu_);
    Status st = CommitInternal();
    if (st.ok() && (cache_full || reclaim)) st = CheckpointInternal();
    if (!st.ok()) spdlog::error("commit to make room failed: {}", st.ToString());
  }
}

Result<const uint8_t*> MetaStore::Handle::Read(uint64_t blk, BlockType type, LockId lock) {
  auto b = s_->GetLocked(blk, type, lock, false);
  if (!b.ok()) return b.status();
  return static_cast<const uint8_t*>((*b)->data.data());
}

Result<uint8_t*> MetaStore::Handle::Write(uint64_t blk, BlockType type, LockId lock) {
  if (read_only_) return Err(Code::kReadOnly, "write through a read-only handle");
  if (!s_->failed_.ok()) return s_->failed_;
  auto b = s_->GetLocked(blk, type, lock, true);
  if (!b.ok()) return b.status();
  return (*b)->data.data();
}

Result<std::pair<uint64_t, uint8_t*>> MetaStore::Handle::NewBlock(BlockType type, LockId lock,
                                                                  uint64_t hint) {
  if (read_only_) return Err(Code::kReadOnly, "allocation through a read-only handle");
  if (!s_->failed_.ok()) return s_->failed_;
  auto a = s_->AllocLocked(hint, 1, true);
  if (!a.ok()) return a.status();
  uint64_t blk = a->start;
  s_->DropBufferLocked(blk);
  lock = ResolveLock(lock, blk);
  auto b = std::make_unique<Buffer>(&s_->pool_);
  if (!b->data.data()) return Err(Code::kNoMemory, "no memory for a metadata block");
  b->blk = blk;
  b->lock = lock;
  InitHeader(b->data.data(), type, blk, s_->uuid_);
  Buffer* raw = b.get();
  s_->cache_[blk] = std::move(b);
  s_->by_lock_[lock].insert(blk);
  s_->MarkDirty(raw);
  return std::make_pair(blk, raw->data.data());
}

Result<bool> MetaStore::Handle::Allocated(uint64_t blk) {
  const Geometry& g = s_->g_;
  if (blk < g.ag_start || blk >= g.total_blocks - 1) {
    return Err(Code::kCorruption, "block " + std::to_string(blk) + " is outside the data area");
  }
  uint32_t ag = g.AgOf(blk);
  if (ag >= g.ag_count) return Err(Code::kCorruption, "block past the last AG");
  const uint64_t base = g.AgStart(ag);
  const uint64_t off = blk - base;
  if (off < 1 + g.bitmap_blocks) return true;  // the AG's own header and bitmaps
  const uint32_t bm = static_cast<uint32_t>(off / kBitsPerBitmap);
  const uint64_t bmblk = base + 1 + bm;
  const uint64_t bit = off - uint64_t(bm) * kBitsPerBitmap;
  auto set = [&](const uint8_t* data) {
    const auto* bmp = reinterpret_cast<const BitmapBlock*>(data);
    return (bmp->bits[bit >> 3] & (1u << (bit & 7))) != 0;
  };
  // A cached copy is current: it goes when the lock that covers it goes.
  auto it = s_->cache_.find(bmblk);
  if (it != s_->cache_.end() || Covers(s_->locks_->Held(AgLock(ag)), LockMode::kShared)) {
    auto b = s_->GetLocked(bmblk, BlockType::kBitmap, AgLock(ag), false);
    if (!b.ok()) return b.status();
    return set((*b)->data.data());
  }
  // Without the AG's lock (under intent another node may be allocating there) the
  // block is read from home and not cached: a copy kept without the lock would be
  // used, stale, once this node takes the lock to allocate. Home may lag the holder's
  // journal, but not for this bit's question (see the header). A read that overlaps
  // the holder's checkpoint may see a torn block: read again.
  AlignedBuffer buf(kBlockSize);
  Status st;
  for (int attempt = 0; attempt < 3; attempt++) {
    st = s_->dev_->Read(bmblk * kBlockSize, buf.data(), kBlockSize);
    if (st.ok()) st = VerifyBlock(buf.data(), BlockType::kBitmap, bmblk, s_->uuid_);
    if (!st.Is(Code::kCorruption)) break;
  }
  if (!st.ok()) return st;
  return set(buf.data());
}

Result<Allocation> MetaStore::Handle::AllocData(uint64_t hint, uint32_t want) {
  if (read_only_) return Err(Code::kReadOnly, "allocation through a read-only handle");
  if (!s_->failed_.ok()) return s_->failed_;
  return s_->AllocLocked(hint, want, false);
}

Status MetaStore::Handle::Free(uint64_t blk, uint64_t count) {
  if (read_only_) return Err(Code::kReadOnly, "free through a read-only handle");
  if (!s_->failed_.ok()) return s_->failed_;
  return s_->FreeLocked(blk, count);
}

// ------------------------------------------------------------------------------
// Cache

void MetaStore::Touch(Buffer* b) {
  if (b->readahead) {
    b->readahead = false;
    ra_used_++;
    stats_.readahead_used++;
  }
  if (b->in_lru) lru_.splice(lru_.begin(), lru_, b->lru);
}

void MetaStore::MarkDirty(Buffer* b) {
  if (b->dirty) return;
  b->dirty = true;
  dirty_.insert(b->blk);
  if (b->in_lru) {
    lru_.erase(b->lru);
    b->in_lru = false;
  }
}

void MetaStore::DropBufferLocked(uint64_t blk) {
  auto it = cache_.find(blk);
  if (it == cache_.end()) return;
  Buffer* b = it->second.get();
  if (b->readahead) ra_unused_++;
  if (b->in_lru) lru_.erase(b->lru);
  if (b->dirty) dirty_.erase(blk);
  auto bl = by_lock_.find(b->lock);
  if (bl != by_lock_.end()) {
    bl->second.erase(blk);
    if (bl->second.empty()) by_lock_.erase(bl);
  }
  cache_.erase(it);
}

// The budget covers cached blocks and committed copies not yet home together: both
// are block-sized memory the cache= option promises to bound.
size_t MetaStore::BlocksInMemory() const { return cache_.size() + unhomed_copies_; }

void MetaStore::EvictLocked() {
  while (BlocksInMemory() > opts_.cache_blocks && !lru_.empty()) {
    DropBufferLocked(lru_.back());
  }
}

Result<MetaStore::Buffer*> MetaStore::GetLocked(uint64_t blk, BlockType type, LockId lock,
                                                bool for_write) {
  auto it = cache_.find(blk);
  Buffer* b;
  if (it != cache_.end()) {
    b = it->second.get();
    stats_.cache_hits++;
    if (for_write) AGFS_RETURN_IF_ERROR(locks_->Acquire(lock, LockMode::kExclusive));
    if (Header(b->data.data())->type != static_cast<uint16_t>(type)) {
      return Err(Code::kCorruption, std::string(BlockTypeName(type)) + " block " +
                                        std::to_string(blk) + " is cached as a " +
                                        BlockTypeName(BlockType(Header(b->data.data())->type)));
    }
    if (b->lock != lock) {
      return Err(Code::kCorruption, "block " + std::to_string(blk) + " is covered by another lock");
    }
  } else {
    stats_.cache_misses++;
    if (!g_.Journaled(blk)) {
      return Err(Code::kCorruption, std::string(BlockTypeName(type)) + " block " +
                                        std::to_string(blk) + " is outside the data area");
    }
    AGFS_RETURN_IF_ERROR(
        locks_->Acquire(lock, for_write ? LockMode::kExclusive : LockMode::kShared));
    auto nb = std::make_unique<Buffer>(&pool_);
    if (!nb->data.data()) return Err(Code::kNoMemory, "no memory for a metadata block");
    nb->blk = blk;
    nb->lock = lock;
    if (type == BlockType::kInode) {
      AGFS_RETURN_IF_ERROR(ReadInodesAround(blk, nb->data.data()));
    } else {
      AGFS_RETURN_IF_ERROR(dev_->Read(blk * kBlockSize, nb->data.data(), kBlockSize));
    }
    Status st = VerifyBlock(nb->data.data(), type, blk, uuid_);
    if (!st.ok()) {
      std::string msg = st.ToString();
      if (FirstReport(msg)) {
        spdlog::error("{}", msg);
      } else {
        spdlog::debug("{}", msg);
      }
      return st;
    }
    b = nb.get();
    cache_[blk] = std::move(nb);
    by_lock_[lock].insert(blk);
    lru_.push_front(blk);
    b->lru = lru_.begin();
    b->in_lru = true;
  }
  Touch(b);
  if (for_write) MarkDirty(b);
  return b;
}

// Reads `blk` into `out` together with the blocks after it in one I/O, and caches
// those that are valid inodes: inodes created together sit together, so a cold
// `ls -l` or stat of many files costs one read per window instead of one per file.
// A neighbour is cached only if it is not cached already, is not a freed block whose
// newer copy may still be on its way home, and its lock is held. Neighbours go to the
// recent end of the LRU list, just behind `blk`, evicting the least recent blocks
// (also when the cache is full: a scan larger than the cache is what gains most), and
// count as used at their first hit. While most of them are evicted unused (random
// access), only every 32nd miss reads a window, to notice when they pay again.
Status MetaStore::ReadInodesAround(uint64_t blk, uint8_t* out) {
  constexpr uint64_t kWindow = 16;
  uint64_t n = std::min<uint64_t>(kWindow, g_.total_blocks - 1 - blk);
  if (ra_used_ + ra_unused_ > 4096) {
    ra_used_ /= 2;
    ra_unused_ /= 2;
  }
  bool pays = ra_unused_ <= 2 * ra_used_ + 64 || ++ra_misses_ % 32 == 0;
  if (n <= 1 || !pays) {
    return dev_->Read(blk * kBlockSize, out, kBlockSize);
  }
  thread_local AlignedBuffer window(kWindow * kBlockSize);
  AGFS_RETURN_IF_ERROR(dev_->Read(blk * kBlockSize, window.data(), n * kBlockSize));
  std::memcpy(out, window.data(), kBlockSize);
  for (uint64_t k = 1; k < n; k++) {
    uint64_t b2 = blk + k;
    uint64_t skip;
    const uint8_t* src = window.data() + k * kBlockSize;
    if (cache_.count(b2) || PendingFree(b2, &skip)) continue;
    if (Header(src)->type != static_cast<uint16_t>(BlockType::kInode)) continue;
    if (!VerifyBlock(src, BlockType::kInode, b2, uuid_).ok()) continue;
    LockId lock2 = InodeLock(b2);
    if (locks_->Held(lock2) == LockMode::kNone) continue;
    auto nb = std::make_unique<Buffer>(&pool_);
    if (!nb->data.data()) break;
    nb->blk = b2;
    nb->lock = lock2;
    nb->readahead = true;
    std::memcpy(nb->data.data(), src, kBlockSize);
    lru_.push_front(b2);  // the caller then puts `blk` in front of them
    nb->lru = lru_.begin();
    nb->in_lru = true;
    cache_[b2] = std::move(nb);
    by_lock_[lock2].insert(b2);
    stats_.readahead_blocks++;
  }
  return Status::Ok();
}

// ------------------------------------------------------------------------------
// Allocation

bool MetaStore::PendingFree(uint64_t blk, uint64_t* skip_to) const {
  auto it = pending_free_.upper_bound(blk);
  if (it == pending_free_.begin()) return false;
  --it;
  if (blk < it->first + it->second.first) {
    *skip_to = it->first + it->second.first;
    return true;
  }
  return false;
}

Result<Allocation> MetaStore::AllocInAg(uint32_t ag, uint64_t from, uint32_t want) {
  const uint64_t base = g_.AgStart(ag);
  const uint32_t size = g_.AgSize(ag);
  // Nothing below ag_first_free_ is free: start there at the earliest, and move it up
  // when this scan proves more of the AG used (pending frees are not "used").
  const bool from_first = from <= ag_first_free_[ag];
  uint64_t i = std::max<uint64_t>(from, ag_first_free_[ag]);
  uint64_t lowest_pending = UINT64_MAX;
  while (i < size) {
    uint32_t bm = static_cast<uint32_t>(i / kBitsPerBitmap);
    uint64_t bmblk = base + 1 + bm;
    auto rb = GetLocked(bmblk, BlockType::kBitmap, AgLock(ag), false);
    if (!rb.ok()) return rb.status();
    const auto* bmp = reinterpret_cast<const BitmapBlock*>((*rb)->data.data());
    uint64_t bm_end = std::min<uint64_t>(size, uint64_t(bm + 1) * kBitsPerBitmap);
    // Find a free bit in [i, bm_end).
    while (i < bm_end) {
      uint64_t bit = i - uint64_t(bm) * kBitsPerBitmap;
      if ((bit & 7) == 0 && bmp->bits[bit >> 3] == 0xFF) {
        i += 8;
        continue;
      }
      if (bmp->bits[bit >> 3] & (1u << (bit & 7))) {
        i++;
        continue;
      }
      uint64_t skip;
      if (PendingFree(base + i, &skip)) {
        lowest_pending = std::min(lowest_pending, i);
        i = skip - base;
        continue;
      }
      // Free run starting at i.
      uint64_t start = i;
      uint32_t len = 0;
      while (len < want && i < bm_end) {
        uint64_t b2 = i - uint64_t(bm) * kBitsPerBitmap;
        if (bmp->bits[b2 >> 3] & (1u << (b2 & 7))) break;
        if (PendingFree(base + i, &skip)) break;
        len++;
        i++;
      }
      auto wb = GetLocked(bmblk, BlockType::kBitmap, AgLock(ag), true);
      if (!wb.ok()) return wb.status();
      auto* wbmp = reinterpret_cast<BitmapBlock*>((*wb)->data.data());
      for (uint64_t k = start; k < start + len; k++) {
        uint64_t b2 = k - uint64_t(bm) * kBitsPerBitmap;
        wbmp->bits[b2 >> 3] |= uint8_t(1u << (b2 & 7));
      }
      auto hb = GetLocked(base, BlockType::kAgHeader, AgLock(ag), true);
      if (!hb.ok()) return hb.status();
      auto* agh = reinterpret_cast<AgHeader*>((*hb)->data.data());
      if (agh->free_blocks < len) {
        return Err(Code::kCorruption, "AG " + std::to_string(ag) + " free count below bitmap");
      }
      agh->free_blocks -= len;
      ag_free_[ag] -= std::min<uint64_t>(ag_free_[ag], len);
      free_total_ -= std::min<uint64_t>(free_total_, len);
      ag_rotor_[ag] = static_cast<uint32_t>(start + len);
      if (from_first) ag_first_free_[ag] = std::min<uint64_t>(start + len, lowest_pending);
      return Allocation{base + start, len};
    }
  }
  if (from_first) ag_first_free_[ag] = std::min<uint64_t>(size, lowest_pending);
  return Allocation{0, 0};
}

Result<Allocation> MetaStore::AllocLocked(uint64_t hint, uint32_t want, bool metadata) {
  (void)metadata;
  if (want == 0) want = 1;
  uint32_t first_ag = 0;
  uint64_t from = 0;
  if (hint >= g_.ag_start && hint < g_.total_blocks - 1) {
    first_ag = g_.AgOf(hint);
    if (first_ag >= g_.ag_count) first_ag = g_.ag_count - 1;
    from = hint - g_.AgStart(first_ag);
    if (from >= g_.AgSize(first_ag)) from = 0;
  } else {
    from = ag_rotor_[0];
  }
  bool held_all = true;
  for (uint32_t n = 0; n < g_.ag_count; n++) {
    uint32_t ag = (first_ag + n) % g_.ag_count;
    // Only AGs whose lock the caller holds exclusively (under the filesystem lock held
    // exclusively, every AG; under intent, the one AG lock it pinned).
    if (!Covers(locks_->Held(AgLock(ag)), LockMode::kExclusive)) {
      held_all = false;
      continue;
    }
    AGFS_RETURN_IF_ERROR(ReloadAgIfStaleLocked(ag));
    if (ag_bad_[ag] || ag_free_[ag] == 0) continue;
    uint64_t start = n == 0 ? from : ag_rotor_[ag];
    for (int pass = 0; pass < 2; pass++) {
      auto a = AllocInAg(ag, pass == 0 ? start : 0, want);
      if (!a.ok()) {
        if (a.status().Is(Code::kCorruption)) {
          ag_bad_[ag] = true;
          break;
        }
        return a.status();
      }
      if (a->len > 0) return a;
      if (start == 0) break;
    }
  }
  if (!held_all) return Err(Code::kNoSpace, "no free blocks left in the allocation groups held");
  return Err(Code::kNoSpace, "no free blocks left");
}

Status MetaStore::FreeLocked(uint64_t blk, uint64_t count) {
  while (count > 0) {
    if (blk < g_.ag_start || blk >= g_.total_blocks - 1) {
      return Err(Code::kCorruption, "freeing block " + std::to_string(blk) +
                                        " outside the data area");
    }
    uint32_t ag = g_.AgOf(blk);
    if (ag >= g_.ag_count) return Err(Code::kCorruption, "freeing block past the last AG");
    const uint64_t base = g_.AgStart(ag);
    uint64_t off = blk - base;
    if (off < 1 + g_.bitmap_blocks || off >= g_.AgSize(ag)) {
      return Err(Code::kCorruption, "freeing AG metadata block " + std::to_string(blk));
    }
    // The caller must hold the AG's lock exclusively (GetLocked checks it below); the
    // counts are read before the first header change in the cache.
    AGFS_RETURN_IF_ERROR(locks_->Acquire(AgLock(ag), LockMode::kExclusive));
    AGFS_RETURN_IF_ERROR(ReloadAgIfStaleLocked(ag));
    uint32_t bm = static_cast<uint32_t>(off / kBitsPerBitmap);
    uint64_t bm_end = std::min<uint64_t>(g_.AgSize(ag), uint64_t(bm + 1) * kBitsPerBitmap);
    uint64_t n = std::min<uint64_t>(count, bm_end - off);
    auto wb = GetLocked(base + 1 + bm, BlockType::kBitmap, AgLock(ag), true);
    if (!wb.ok()) return wb.status();
    auto* bmp = reinterpret_cast<BitmapBlock*>((*wb)->data.data());
    for (uint64_t k = off; k < off + n; k++) {
      uint64_t b2 = k - uint64_t(bm) * kBitsPerBitmap;
      if (!(bmp->bits[b2 >> 3] & (1u << (b2 & 7)))) {
        return Err(Code::kCorruption, "block " + std::to_string(base + k) + " freed twice");
      }
    }
    for (uint64_t k = off; k < off + n; k++) {
      uint64_t b2 = k - uint64_t(bm) * kBitsPerBitmap;
      bmp->bits[b2 >> 3] &= uint8_t(~(1u << (b2 & 7)));
      DropBufferLocked(base + k);
    }
    auto hb = GetLocked(base, BlockType::kAgHeader, AgLock(ag), true);
    if (!hb.ok()) return hb.status();
    auto* agh = reinterpret_cast<AgHeader*>((*hb)->data.data());
    agh->free_blocks += n;
    ag_first_free_[ag] = std::min<uint64_t>(ag_first_free_[ag], off);
    ag_free_[ag] += n;
    free_total_ += n;
    running_freed_.emplace_back(blk, n);
    pending_free_[blk] = {n, running_seq_};
    pending_total_ += n;
    blk += n;
    count -= n;
  }
  return Status::Ok();
}

// ------------------------------------------------------------------------------
// Commit and checkpoint

Status MetaStore::CommitInternal() {
  std::vector<std::pair<uint64_t, std::shared_ptr<PoolBlock>>> copies;
  std::vector<std::pair<uint64_t, uint64_t>> freed;
  uint64_t seq;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!failed_.ok()) return failed_;
    if (dirty_.empty()) {
      seq = 0;
    } else {
      seq = running_seq_;
      copies.reserve(dirty_.size());
      for (uint64_t blk : dirty_) {
        Buffer* b = cache_[blk].get();
        Header(b->data.data())->seq = seq;
        SealBlock(b->data.data());
        auto copy = std::make_shared<PoolBlock>(&pool_);
        if (!copy->data()) {
          failed_ = Err(Code::kNoMemory, "no memory to commit; node stops writing");
          return failed_;
        }
        std::memcpy(copy->data(), b->data.data(), kBlockSize);
        copies.emplace_back(blk, std::move(copy));
        b->dirty = false;
        b->unhomed_seq = seq;
      }
      dirty_.clear();
      freed = std::move(running_freed_);
      running_freed_.clear();
      running_seq_++;
    }
  }
  if (seq == 0) {
    Status st = dev_->Flush();
    if (!st.ok()) {
      std::lock_guard<std::mutex> g(mu_);
      failed_ = st;
    }
    return st;
  }
  std::sort(copies.begin(), copies.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  if (journal_->FreeBlocks() < Journal::BlocksNeeded(copies.size())) {
    AGFS_RETURN_IF_ERROR(CheckpointInternal());
  }
  std::vector<JournalBlock> jb;
  jb.reserve(copies.size());
  for (auto& [blk, buf] : copies) jb.push_back(JournalBlock{blk, buf->data()});
  auto r = journal_->Commit(jb);
  if (!r.ok()) {
    std::lock_guard<std::mutex> g(mu_);
    failed_ = Err(r.status().code(), "journal commit failed, node stops writing: " +
                                         r.status().message());
    spdlog::critical("{}", failed_.ToString());
    return failed_;
  }
  if (*r != seq) {
    std::lock_guard<std::mutex> g(mu_);
    failed_ = Err(Code::kCorruption, "journal sequence out of step with the store");
    return failed_;
  }
  std::lock_guard<std::mutex> g(mu_);
  stats_.commits++;
  stats_.blocks_journaled += copies.size();
  unhomed_copies_ += copies.size();
  committed_.push_back(Committed{seq, std::move(copies), std::move(freed)});
  return Status::Ok();
}

Status MetaStore::CheckpointInternal() {
  if (committed_.empty()) return Status::Ok();
  std::map<uint64_t, PoolBlock*> latest;
  for (auto& c : committed_) {
    for (auto& [blk, buf] : c.blocks) latest[blk] = buf.get();
  }
  std::vector<JournalBlock> home;
  home.reserve(latest.size());
  for (auto& [blk, buf] : latest) home.push_back(JournalBlock{blk, buf->data()});
  Status st = WriteHome(dev_, home, &home_stage_);
  if (st.ok()) st = dev_->Flush();
  uint64_t last = committed_.back().seq;
  if (st.ok()) st = journal_->Checkpoint(last);
  std::lock_guard<std::mutex> g(mu_);
  if (!st.ok()) {
    failed_ = Err(st.code(), "checkpoint failed, node stops writing: " + st.message());
    spdlog::critical("{}", failed_.ToString());
    return failed_;
  }
  for (auto& [blk, buf] : latest) {
    auto c = cache_.find(blk);
    if (c == cache_.end()) continue;
    Buffer* b = c->second.get();
    if (b->unhomed_seq != 0 && b->unhomed_seq <= last) b->unhomed_seq = 0;
    if (!b->dirty && b->unhomed_seq == 0 && !b->in_lru) {
      lru_.push_front(blk);
      b->lru = lru_.begin();
      b->in_lru = true;
    }
  }
  for (auto pf = pending_free_.begin(); pf != pending_free_.end();) {
    if (pf->second.second <= last) {
      pending_total_ -= std::min<uint64_t>(pending_total_, pf->second.first);
      pf = pending_free_.erase(pf);
    } else {
      ++pf;
    }
  }
  committed_.clear();
  unhomed_copies_ = 0;
  stats_.checkpoints++;
  return Status::Ok();
}

Status MetaStore::Commit() {
  std::lock_guard<std::mutex> clk(commit_mu_);
  return CommitInternal();
}

Status MetaStore::Sync() {
  std::lock_guard<std::mutex> clk(commit_mu_);
  AGFS_RETURN_IF_ERROR(CommitInternal());
  return CheckpointInternal();
}

Status MetaStore::DropLock(LockId lock) {
  for (int attempt = 0;; attempt++) {
    {
      std::lock_guard<std::mutex> clk(commit_mu_);
      AGFS_RETURN_IF_ERROR(CommitInternal());
      AGFS_RETURN_IF_ERROR(CheckpointInternal());
    }
    std::lock_guard<std::mutex> g(mu_);
    auto it = by_lock_.find(lock);
    if (it != by_lock_.end()) {
      bool any_dirty = false;
      for (uint64_t blk : it->second) any_dirty |= cache_[blk]->dirty;
      if (any_dirty) {
        // Changed again meanwhile: commit again. Dropping a dirty block would lose it.
        if (attempt < 100) continue;
        return Err(Code::kBusy, "blocks of the lock keep changing while it is revoked");
      }
      std::vector<uint64_t> blks(it->second.begin(), it->second.end());
      for (uint64_t blk : blks) DropBufferLocked(blk);
    }
    if (LockIdKind(lock) == LockKind::kInode) DropLeavesLocked();
    if (LockIdKind(lock) == LockKind::kAg && LockIdNumber(lock) < g_.ag_count) {
      ForgetAgLocked(static_cast<uint32_t>(LockIdNumber(lock)));
    }
    return Status::Ok();
  }
}

// The leaves of the dropped lock's directory are clean and home by now: nothing
// could change them since its revoke began. The others still changing (dirty, or
// committed and not yet home) stay; they belong to directories whose locks are held.
void MetaStore::DropLeavesLocked() {
  std::vector<uint64_t> blks;
  for (const auto& [lock, set] : by_lock_) {
    if (LockIdKind(lock) != LockKind::kDirLeaf) continue;
    for (uint64_t blk : set) {
      if (cache_[blk]->in_lru) blks.push_back(blk);
    }
  }
  for (uint64_t blk : blks) DropBufferLocked(blk);
}

Status MetaStore::DropAll() {
  for (int attempt = 0;; attempt++) {
    {
      std::lock_guard<std::mutex> clk(commit_mu_);
      AGFS_RETURN_IF_ERROR(CommitInternal());
      AGFS_RETURN_IF_ERROR(CheckpointInternal());
    }
    std::lock_guard<std::mutex> g(mu_);
    if (!dirty_.empty() || !committed_.empty()) {
      // Changed again meanwhile: commit again. Dropping a dirty block would lose it.
      if (attempt < 100) continue;
      return Err(Code::kBusy, "metadata keeps changing while its lock is revoked");
    }
    std::vector<uint64_t> blks;
    blks.reserve(cache_.size());
    for (const auto& [blk, b] : cache_) blks.push_back(blk);
    for (uint64_t blk : blks) DropBufferLocked(blk);
    for (uint32_t ag = 0; ag < g_.ag_count; ag++) ForgetAgLocked(ag);
    return Status::Ok();
  }
}

Result<bool> MetaStore::Reclaim() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (pending_total_ == 0) return false;
  }
  AGFS_RETURN_IF_ERROR(Sync());
  return true;
}

uint64_t MetaStore::FreeBlocks() {
  std::lock_guard<std::mutex> g(mu_);
  // Logged; an AG then counts 0 until a read works.
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) (void)ReloadAgIfStaleLocked(ag);
  return free_total_;
}

uint64_t MetaStore::PeekAgFree(uint32_t ag) {
  if (ag >= g_.ag_count) return 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (ag_bad_[ag]) return 0;
    if (!ag_stale_[ag]) return ag_free_[ag];
  }
  auto free = HomeAgFree(ag);
  return free.ok() ? *free : 0;
}

uint64_t MetaStore::TotalDataBlocks() const {
  uint64_t t = 0;
  for (uint32_t ag = 0; ag < g_.ag_count; ag++) t += g_.AgSize(ag);
  return t;
}

StoreStats MetaStore::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  StoreStats s = stats_;
  s.cached_blocks = cache_.size();
  return s;
}

Status MetaStore::failed() const {
  std::lock_guard<std::mutex> g(mu_);
  return failed_;
}

}  // namespace agorafs
