// Filesystem: file data — read, write, truncate, fallocate, lseek, copy_file_range.
//
// Data blocks are read and written directly on the device (O_DIRECT) through an
// aligned per-thread bounce buffer. Newly allocated blocks are mapped unwritten, the
// data is written, and a second handle marks them written and extends the size, so a
// crash at any point exposes zeros, never stale blocks.
#include <linux/falloc.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cstring>
#include <mutex>
#include <shared_mutex>

#include "extent/extent.h"
#include "fs/filesystem.h"
#include "fs/fs_internal.h"
#include "fs/inode.h"

namespace agorafs {

namespace {

uint8_t* Bounce(size_t bytes) {
  thread_local AlignedBuffer buf;
  if (buf.size() < bytes) buf = AlignedBuffer(std::max<size_t>(bytes, 256 * 1024));
  return buf.data();
}

uint64_t DivUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

bool Written(const extent::Mapping& m) {
  return !m.hole() && !(m.flags & kExtentUnwritten);
}

void KillPriv(const Caller& c, InodeBlock* I) {
  if (c.root()) return;
  if (I->mode & S_ISUID) I->mode &= ~S_ISUID;
  if ((I->mode & S_ISGID) && (I->mode & S_IXGRP)) I->mode &= ~S_ISGID;
}

}  // namespace

Status Filesystem::ConvertInlineToExtents(MetaTxn& h, uint64_t ino, InodeBlock* I) {
  if (I->data_kind != uint8_t(DataKind::kInline)) return Status::Ok();
  uint64_t size = I->size;
  if (size > kInodeDataSize) return Err(Code::kCorruption, "inline data longer than its area");
  AlignedBuffer block(kBlockSize);
  std::memcpy(block.data(), I->data, size);
  uint8_t saved[kInodeDataSize];
  std::memcpy(saved, I->data, kInodeDataSize);
  uint64_t saved_blocks = I->blocks;
  std::memset(I->data, 0, kInodeDataSize);
  extent::InitRoot(I);
  if (size == 0) return Status::Ok();
  auto r = extent::MapOrAllocate(h, ino, I, 0, 1, false, ino);
  Status st = r.ok() ? Status::Ok() : r.status();
  // Written while the handle is held: no commit can include the new extent before
  // the data is on the device.
  if (st.ok()) st = io_->Write(r->m.physical * kBlockSize, block.data(), kBlockSize);
  if (!st.ok()) {
    if (r.ok()) {
      Status fs = h.Free(r->m.physical, 1);
      if (!fs.ok()) spdlog::error("undoing inline conversion: {}", fs.ToString());
    }
    std::memcpy(I->data, saved, kInodeDataSize);
    I->data_kind = uint8_t(DataKind::kInline);
    I->blocks = saved_blocks;
    return st;
  }
  return Status::Ok();
}

// Zeroes bytes [from, to) that lie in one block, if that block holds written data.
static Status ZeroInBlock(BlockDevice* dev, MetaTxn& h, uint64_t ino, const InodeBlock& I,
                          uint64_t from, uint64_t to) {
  uint64_t lblk = from / kBlockSize;
  auto m = extent::Lookup(h, ino, I, lblk);
  if (!m.ok()) return m.status();
  if (!Written(*m)) return Status::Ok();
  AlignedBuffer b(kBlockSize);
  uint64_t phys = m->physical * kBlockSize;
  AGFS_RETURN_IF_ERROR(dev->Read(phys, b.data(), kBlockSize));
  std::memset(b.data() + from % kBlockSize, 0, to - from);
  return dev->Write(phys, b.data(), kBlockSize);
}

Status Filesystem::ZeroPartialBlock(MetaTxn& h, uint64_t ino, const InodeBlock& I,
                                    uint64_t from) {
  if (from % kBlockSize == 0) return Status::Ok();
  return ZeroInBlock(io_, h, ino, I, from, (from / kBlockSize + 1) * kBlockSize);
}

Result<size_t> Filesystem::Read(uint64_t ino, uint64_t off, size_t len, char* buf) {
  AGFS_INODE_GATE(Shared, ino);
  auto st = State(ino);
  std::shared_lock<std::shared_mutex> io(st->io);
  std::vector<extent::Mapping> maps;
  bool touch_atime = false;
  {
    auto h = store_->Begin(true);
    auto ir = RIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    const InodeBlock* I = *ir;
    if (IsDir(*I)) return Err(Code::kIsDir, "read of a directory");
    Timespec64 now = NowTs();
    // relatime: update atime when it is older than mtime/ctime or a day old.
    auto le = [](const Timespec64& a, const Timespec64& b) {
      return a.sec < b.sec || (a.sec == b.sec && a.nsec <= b.nsec);
    };
    touch_atime = le(I->atime, I->mtime) || le(I->atime, I->ctime) || now.sec - I->atime.sec > 86400;
    if (off >= I->size || len == 0) {
      len = 0;
    } else {
      len = static_cast<size_t>(std::min<uint64_t>(len, I->size - off));
      if (I->data_kind == uint8_t(DataKind::kInline)) {
        if (I->size > kInodeDataSize) return Err(Code::kCorruption, "inline data too long");
        std::memcpy(buf, I->data + off, len);
      } else if (I->data_kind != uint8_t(DataKind::kExtents)) {
        return Err(Code::kCorruption, "inode " + std::to_string(ino) + ": bad data kind");
      } else {
        uint64_t first = off / kBlockSize, last = (off + len - 1) / kBlockSize;
        for (uint64_t l = first; l <= last;) {
          auto m = extent::Lookup(*h, ino, *I, l);
          if (!m.ok()) return m.status();
          extent::Mapping mm = *m;
          mm.len = static_cast<uint32_t>(std::min<uint64_t>(mm.len, last - l + 1));
          maps.push_back(mm);
          l += mm.len;
        }
      }
    }
  }
  for (const auto& m : maps) {
    uint64_t mstart = std::max<uint64_t>(off, m.logical * kBlockSize);
    uint64_t mend = std::min<uint64_t>(off + len, (m.logical + m.len) * kBlockSize);
    if (!Written(m)) {
      std::memset(buf + (mstart - off), 0, mend - mstart);
      continue;
    }
    uint64_t a0 = mstart / kBlockSize * kBlockSize;
    uint64_t a1 = DivUp(mend, kBlockSize) * kBlockSize;
    uint8_t* b = Bounce(a1 - a0);
    uint64_t phys = (m.physical + (a0 / kBlockSize - m.logical)) * kBlockSize;
    AGFS_RETURN_IF_ERROR(io_->Read(phys, b, a1 - a0));
    std::memcpy(buf + (mstart - off), b + (mstart - a0), mend - mstart);
  }
  io.unlock();
  // atime is best effort: only while this node holds the lock exclusively anyway, so
  // that reading never pulls the lock away from another node.
  if (touch_atime && len > 0 && store_->failed().ok() && GateAllowsWrite()) {
    auto h = store_->Begin(false, 4);
    auto ir = WIno(*h, g_, ino);
    if (ir.ok()) (*ir)->atime = NowTs();
  }
  return len;
}

// The node's cursor stays where the last allocation worked, so the common case reads
// nothing and takes an AG lock it already holds. Moving on, AGs whose header at home
// says full are skipped without taking their lock (home lags a holder's journal, so a
// header may promise room that is gone: the attempt then moves on). Blocks are freed
// only under the filesystem lock held exclusively, which this node saw as a lock loss
// (lock_epoch_ moved): then its home AG may have room again, and it goes back there.
template <typename F>
auto Filesystem::InEachAg(F f) -> decltype(f()) {
  const uint32_t n = g_.ag_count;
  const uint64_t epoch = lock_epoch_.load();
  uint32_t start = alloc_ag_.load();
  if (start != home_ag_ && alloc_epoch_.exchange(epoch) != epoch &&
      store_->PeekAgFree(home_ag_) > 0) {
    start = home_ag_;
    alloc_ag_.store(start);
  }
  decltype(f()) r = Err(Code::kNoSpace, "no free blocks left in any allocation group");
  for (uint32_t k = 0; k < n; k++) {
    const uint32_t ag = (start + k) % n;
    if (k > 0 && store_->PeekAgFree(ag) == 0) continue;
    {
      AgGate ag_gate(this, ag);
      AGFS_RETURN_IF_ERROR(ag_gate.status());
      r = f();
    }
    // Full (or the extent tree needs more than it has): what this attempt allocated
    // stays mapped unwritten, and the next one goes on from there.
    if (StatusOf(r).Is(Code::kNoSpace)) continue;
    if (k > 0) {
      alloc_ag_.store(ag);
      alloc_epoch_.store(epoch);
    }
    return r;
  }
  return r;
}

// A write first tries the inode's own lock (InodeGate): enough when it lands on blocks
// already written, the case of a VM image or database file rewritten in place. One
// that must allocate, convert inline data or mark blocks written finds that out
// before changing anything and starts over with an AG lock as well (AgGate): this
// node's own AG first, the next one when that is full. The node remembers per inode
// that the last write allocated and then takes the AG lock at once (an appender would
// otherwise try twice). Without intent (the node holds the filesystem lock
// exclusively, the image predates intent locks, or every AG was full) the write runs
// under the filesystem lock held exclusively, which covers every AG.
Result<size_t> Filesystem::Write(const Caller& c, uint64_t ino, uint64_t off, const char* buf,
                                 size_t len, bool append) {
  auto remember = [&](bool allocated) {
    std::lock_guard<std::mutex> g(states_mu_);
    auto it = refs_.find(ino);
    if (it != refs_.end()) it->second.write_allocates = allocated;
  };
  if (intent_locks_) {
    bool try_in_place = true;
    {
      std::lock_guard<std::mutex> g(states_mu_);
      auto it = refs_.find(ino);
      try_in_place = it == refs_.end() || !it->second.write_allocates;
    }
    AGFS_INODE_GATE(Exclusive, ino);
    if (GateAllowsWrite()) {  // the filesystem lock itself, exclusively
      bool allocated = false;
      auto r = RetryOnNoSpace(store_.get(), [&] {
        return WriteOnce(c, ino, off, buf, len, append, false, &allocated);
      });
      if (r.ok()) remember(allocated);
      return r;
    }
    if (try_in_place) {
      bool allocated = false;
      auto r = WriteOnce(c, ino, off, buf, len, append, true, &allocated);
      if (!r.ok() || !allocated) {
        if (r.ok()) remember(false);
        return r;
      }
    }
    bool allocated = false;
    auto r = InEachAg([&] { return WriteOnce(c, ino, off, buf, len, append, false, &allocated); });
    if (r.ok()) remember(allocated);
    if (!r.status().Is(Code::kNoSpace)) return r;
    // Every AG tried one by one: the exclusive lock sees them all at once, and frees
    // waiting for a checkpoint too, before it answers ENOSPC.
  }
  AGFS_GATE(Exclusive, ino);
  bool allocated = false;
  auto r = RetryOnNoSpace(store_.get(), [&] {
    return WriteOnce(c, ino, off, buf, len, append, false, &allocated);
  });
  if (r.ok() && intent_locks_) remember(allocated);
  return r;
}

Result<size_t> Filesystem::WriteOnce(const Caller& c, uint64_t ino, uint64_t off,
                                     const char* buf, size_t len, bool append,
                                     bool in_place_only, bool* allocated) {
  if (allocated) *allocated = false;
  if (len == 0) return size_t(0);
  auto st = State(ino);
  std::unique_lock<std::mutex> wl(st->write_mu);
  if (append) {
    // The kernel's idea of the end of file may be another node's old one: the true end
    // is read here, under the filesystem lock and the inode's write mutex.
    auto h = store_->Begin(true);
    auto ir = RIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    off = (*ir)->size;
  }
  if (off > kMaxFileSize || len > kMaxFileSize - off) return Err(Code::kTooBig, "file too large");
  std::shared_lock<std::shared_mutex> io(st->io);
  const uint64_t end = off + len;
  std::vector<extent::Mapping> maps;
  uint64_t old_size = 0;
  {
    auto h = store_->Begin(false, 64);
    auto ir = WIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    InodeBlock* I = *ir;
    if (IsDir(*I)) return Err(Code::kIsDir, "write to a directory");
    if (!IsReg(*I) && !IsLnk(*I)) return Err(Code::kInvalid, "write to a special file");
    if (I->data_kind == uint8_t(DataKind::kInline)) {
      if (end <= kInodeDataSize) {
        if (off > I->size) std::memset(I->data + I->size, 0, off - I->size);
        std::memcpy(I->data + off, buf, len);
        if (end > I->size) I->size = end;
        TouchData(I, NowTs());
        KillPriv(c, I);
        return len;
      }
      if (allocated) *allocated = true;
      if (in_place_only) return size_t(0);
      AGFS_RETURN_IF_ERROR(ConvertInlineToExtents(*h, ino, I));
    }
    old_size = I->size;
    uint64_t first = off / kBlockSize, last = (end - 1) / kBlockSize;
    for (uint64_t l = first; in_place_only && l <= last;) {
      auto m = extent::Lookup(*h, ino, *I, l);
      if (!m.ok()) return m.status();
      if (!Written(*m)) {
        if (allocated) *allocated = true;
        return size_t(0);
      }
      l = m->logical + m->len;
    }
    // A gap from the old end of file: the rest of the old last block must read as
    // zeros, whatever an interrupted write left there (see ZeroPartialBlock).
    if (off > old_size && old_size / kBlockSize < first) {
      AGFS_RETURN_IF_ERROR(ZeroPartialBlock(*h, ino, *I, old_size));
    }
    for (uint64_t l = first; l <= last;) {
      uint32_t want = static_cast<uint32_t>(std::min<uint64_t>(last - l + 1, UINT32_MAX));
      auto r = extent::MapOrAllocate(*h, ino, I, l, want, true, ino);
      if (!r.ok()) return r.status();
      extent::Mapping m = r->m;
      if (allocated && !Written(m)) *allocated = true;
      m.len = static_cast<uint32_t>(std::min<uint64_t>(m.len, last - l + 1));
      maps.push_back(m);
      l += m.len;
    }
  }
  const uint64_t first = off / kBlockSize, last = (end - 1) / kBlockSize;
  const uint64_t a0 = first * kBlockSize, a1 = (last + 1) * kBlockSize;
  uint8_t* b = Bounce(a1 - a0);
  // Edge blocks keep their old bytes below the old end of file and zeros from there
  // on: past the end of file the device may hold what an interrupted write left.
  auto fill_edge = [&](uint64_t lblk, const extent::Mapping& m) -> Status {
    uint8_t* dst = b + (lblk - first) * kBlockSize;
    const uint64_t bstart = lblk * kBlockSize;
    if (!Written(m) || old_size <= bstart) {
      std::memset(dst, 0, kBlockSize);
      return Status::Ok();
    }
    AGFS_RETURN_IF_ERROR(
        io_->Read((m.physical + (lblk - m.logical)) * kBlockSize, dst, kBlockSize));
    if (old_size < bstart + kBlockSize) {
      std::memset(dst + (old_size - bstart), 0, bstart + kBlockSize - old_size);
    }
    return Status::Ok();
  };
  if (off > a0) AGFS_RETURN_IF_ERROR(fill_edge(first, maps.front()));
  if (end < a1 && (last != first || off == a0)) AGFS_RETURN_IF_ERROR(fill_edge(last, maps.back()));
  std::memcpy(b + (off - a0), buf, len);
  for (const auto& m : maps) {
    AGFS_RETURN_IF_ERROR(io_->Write(m.physical * kBlockSize, b + (m.logical - first) * kBlockSize,
                                     uint64_t(m.len) * kBlockSize));
  }
  {
    auto h = store_->Begin(false, 32);
    auto ir = WIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    InodeBlock* I = *ir;
    for (const auto& m : maps) {
      if (m.flags & kExtentUnwritten) {
        AGFS_RETURN_IF_ERROR(extent::MarkWritten(*h, ino, I, m.logical, m.len));
      }
    }
    if (end > I->size) I->size = end;
    TouchData(I, NowTs());
    KillPriv(c, I);
  }
  return len;
}

Status Filesystem::TruncateBlocks(uint32_t slot, uint64_t ino, uint64_t new_size) {
  for (;;) {
    auto h = store_->Begin(false, 96);
    auto ir = WIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    InodeBlock* I = *ir;
    if (I->data_kind == uint8_t(DataKind::kExtents)) {
      extent::PunchBudget budget;
      budget.max_blocks = 1u << 20;
      budget.max_extents = 256;
      auto r = extent::PunchStep(*h, ino, I, DivUp(new_size, kBlockSize), UINT64_MAX, budget);
      if (!r.ok()) return r.status();
      if (*r < extent::kMaxFileBlocks) continue;
    }
    if (I->nlink > 0) return RemoveOrphan(*h, slot, ino);
    return Status::Ok();
  }
}

Status Filesystem::Truncate(const Caller& c, uint64_t ino, uint64_t new_size, bool update_times) {
  if (new_size > kMaxFileSize) return Err(Code::kTooBig, "file too large");
  auto st = State(ino);
  std::unique_lock<std::mutex> wl(st->write_mu);
  std::unique_lock<std::shared_mutex> io(st->io);
  bool punch = false;
  {
    auto h = store_->Begin(false, 64);
    auto ir = WIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    InodeBlock* I = *ir;
    uint64_t old = I->size;
    if (I->data_kind == uint8_t(DataKind::kInline)) {
      if (new_size > kInodeDataSize) {
        AGFS_RETURN_IF_ERROR(ConvertInlineToExtents(*h, ino, I));
      } else if (new_size < old) {
        std::memset(I->data + new_size, 0, old - new_size);
      }
    }
    if (I->data_kind == uint8_t(DataKind::kExtents) && new_size < old) {
      AGFS_RETURN_IF_ERROR(ZeroPartialBlock(*h, ino, *I, new_size));
      AGFS_RETURN_IF_ERROR(AddOrphan(*h, ino));  // truncation in progress
      punch = true;
    } else if (I->data_kind == uint8_t(DataKind::kExtents) && new_size > old) {
      AGFS_RETURN_IF_ERROR(ZeroPartialBlock(*h, ino, *I, old));
    }
    I->size = new_size;
    if (update_times && new_size != old) TouchData(I, NowTs());
    if (new_size != old) KillPriv(c, I);
  }
  if (punch) return TruncateBlocks(info_.slot, ino, new_size);
  return Status::Ok();
}

// Allocating (mode 0 or KEEP_SIZE) under intent takes AG locks as a write does; a punch
// or zeroing frees blocks wherever they are, which only the exclusive filesystem lock
// covers.
Status Filesystem::Fallocate(const Caller& c, uint64_t ino, int mode, uint64_t off, uint64_t len) {
  if (intent_locks_ && !(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))) {
    AGFS_INODE_GATE(Exclusive, ino);
    if (GateAllowsWrite()) {
      return RetryOnNoSpace(store_.get(), [&] { return FallocateOnce(c, ino, mode, off, len); });
    }
    Status st = InEachAg([&] { return FallocateOnce(c, ino, mode, off, len); });
    if (!st.Is(Code::kNoSpace)) return st;
  }
  AGFS_GATE(Exclusive, ino);
  return RetryOnNoSpace(store_.get(), [&] { return FallocateOnce(c, ino, mode, off, len); });
}

Status Filesystem::FallocateOnce(const Caller& c, uint64_t ino, int mode, uint64_t off,
                                 uint64_t len) {
  const int kSupported = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
  if (mode & ~kSupported) return Err(Code::kNotSupported, "fallocate mode not supported");
  bool punch = mode & FALLOC_FL_PUNCH_HOLE;
  bool zero = mode & FALLOC_FL_ZERO_RANGE;
  bool keep = mode & FALLOC_FL_KEEP_SIZE;
  if (punch && !keep) return Err(Code::kNotSupported, "PUNCH_HOLE needs KEEP_SIZE");
  if (punch && zero) return Err(Code::kNotSupported, "PUNCH_HOLE with ZERO_RANGE");
  if (len == 0) return Err(Code::kInvalid, "zero length");
  if (off > kMaxFileSize || len > kMaxFileSize - off) return Err(Code::kTooBig, "file too large");
  const uint64_t end = off + len;
  auto st = State(ino);
  std::unique_lock<std::mutex> wl(st->write_mu);
  std::unique_lock<std::shared_mutex> io(st->io);
  auto h = store_->Begin(false, 96);
  auto ir = WIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  InodeBlock* I = *ir;
  if (IsDir(*I)) return Err(Code::kIsDir, "fallocate on a directory");
  if (!IsReg(*I)) return Err(Code::kNotSupported, "fallocate on a special file");
  Timespec64 now = NowTs();
  if (I->data_kind == uint8_t(DataKind::kInline)) {
    if (punch || zero) {
      uint64_t zs = std::min<uint64_t>(off, I->size), ze = std::min<uint64_t>(end, I->size);
      if (ze > zs) std::memset(I->data + zs, 0, ze - zs);
      if (zero && !keep && end > I->size && end <= kInodeDataSize) I->size = end;
      if (punch || end <= kInodeDataSize || keep) {
        TouchData(I, now);
        return Status::Ok();
      }
    } else if (end <= kInodeDataSize) {
      if (!keep && end > I->size) {
        I->size = end;
        TouchData(I, now);
      }
      return Status::Ok();
    }
    AGFS_RETURN_IF_ERROR(ConvertInlineToExtents(*h, ino, I));
  }
  if (punch || zero) {
    uint64_t b0 = DivUp(off, kBlockSize), b1 = end / kBlockSize;  // whole blocks
    if (b0 > b1) {  // inside one block
      AGFS_RETURN_IF_ERROR(ZeroInBlock(io_, *h, ino, *I, off, end));
    } else {
      if (off % kBlockSize) {
        AGFS_RETURN_IF_ERROR(ZeroInBlock(io_, *h, ino, *I, off, b0 * kBlockSize));
      }
      if (end % kBlockSize) {
        AGFS_RETURN_IF_ERROR(ZeroInBlock(io_, *h, ino, *I, b1 * kBlockSize, end));
      }
      if (b1 > b0) AGFS_RETURN_IF_ERROR(extent::Punch(*h, ino, I, b0, b1 - b0));
      if (zero) {
        for (uint64_t l = b0; l < b1;) {
          uint32_t want = static_cast<uint32_t>(std::min<uint64_t>(b1 - l, UINT32_MAX));
          auto r = extent::MapOrAllocate(*h, ino, I, l, want, true, ino);
          if (!r.ok()) return r.status();
          l += std::min<uint64_t>(r->m.len, b1 - l);
        }
      }
    }
  } else {
    uint64_t first = off / kBlockSize, last = (end - 1) / kBlockSize;
    for (uint64_t l = first; l <= last;) {
      uint32_t want = static_cast<uint32_t>(std::min<uint64_t>(last - l + 1, UINT32_MAX));
      auto r = extent::MapOrAllocate(*h, ino, I, l, want, true, ino);
      if (!r.ok()) return r.status();
      l += std::min<uint64_t>(r->m.len, last - l + 1);
    }
  }
  if (!keep && end > I->size) {
    AGFS_RETURN_IF_ERROR(ZeroPartialBlock(*h, ino, *I, I->size));
    I->size = end;
  }
  TouchData(I, now);
  if (punch || zero) KillPriv(c, I);
  return Status::Ok();
}

Result<uint64_t> Filesystem::Lseek(uint64_t ino, uint64_t off, int whence) {
  AGFS_GATE(Shared, ino);
  auto h = store_->Begin(true);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  const InodeBlock* I = *ir;
  uint64_t size = I->size;
  if (off >= size) return Err(Code::kNoAddress, "offset at or past end of file");
  if (I->data_kind != uint8_t(DataKind::kExtents)) return whence == SEEK_DATA ? off : size;
  if (whence == SEEK_DATA) {
    auto m = extent::NextData(*h, ino, *I, off / kBlockSize, true);
    if (!m.ok()) return m.status();
    if (!m->has_value()) return Err(Code::kNoAddress, "no data after offset");
    uint64_t pos = std::max<uint64_t>(off, (*m)->logical * kBlockSize);
    if (pos >= size) return Err(Code::kNoAddress, "no data after offset");
    return pos;
  }
  uint64_t l = off / kBlockSize;
  for (;;) {
    if (l * kBlockSize >= size) return size;
    auto m = extent::Lookup(*h, ino, *I, l);
    if (!m.ok()) return m.status();
    if (!Written(*m)) return std::min(size, std::max<uint64_t>(off, l * kBlockSize));
    l = m->logical + m->len;
  }
}

Result<size_t> Filesystem::CopyFileRange(const Caller& c, uint64_t ino_in, uint64_t off_in,
                                         uint64_t ino_out, uint64_t off_out, size_t len) {
  AGFS_GATE(Exclusive, ino_in, ino_out);
  std::vector<char> buf(std::min<size_t>(len, 1 << 20));
  size_t done = 0;
  while (done < len) {
    size_t n = std::min(buf.size(), len - done);
    auto r = Read(ino_in, off_in + done, n, buf.data());
    if (!r.ok()) return done ? Result<size_t>(done) : r.status();
    if (*r == 0) break;
    auto w = Write(c, ino_out, off_out + done, buf.data(), *r);
    if (!w.ok()) return done ? Result<size_t>(done) : w.status();
    done += *w;
    if (*r < n) break;
  }
  return done;
}

Status Filesystem::Fsync(uint64_t ino, bool) {
  AGFS_INODE_GATE(Shared, ino);
  return store_->Commit();
}

}  // namespace agorafs
