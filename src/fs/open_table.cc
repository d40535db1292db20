// Filesystem: open-file tables, and orphans that other nodes still have open.
//
// A file deleted on node A while node B has it open must stay readable and writable
// on B until B closes it (docs/DESIGN.md, "Orphans and open-unlinked files"). Each
// node publishes the inodes it has open in its slot's open-file table before it lets
// the filesystem lock go; a node that holds the lock exclusively therefore reads, in
// the tables of the other mounted slots, a superset of what they have open. An
// orphan that another node has open is not freed but moved onto that node's orphan
// list, and that node frees it (or passes it on) once it is closed there.
#include "fs/open_table.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "fs/filesystem.h"
#include "fs/fs_internal.h"
#include "fs/inode.h"

namespace agorafs {

uint32_t OpenTableBlocks(size_t n) {
  return uint32_t(std::clamp<size_t>((n + kOpenInosPerBlock - 1) / kOpenInosPerBlock, 1,
                                     kSlotOpenBlocks + 1));
}

uint32_t EncodeOpenTable(const Geometry& g, const Uuid& uuid, uint32_t slot, uint64_t generation,
                         uint64_t publication, const std::vector<uint64_t>& inos, uint8_t* buf) {
  const size_t cap = size_t(kSlotOpenBlocks) * kOpenInosPerBlock;
  const bool overflow = inos.size() > cap;
  const size_t total = std::min(inos.size(), cap);
  const uint32_t nblocks = OpenTableBlocks(total);
  std::memset(buf, 0, size_t(nblocks) * kBlockSize);
  for (uint32_t b = 0; b < nblocks; b++) {
    uint8_t* p = buf + size_t(b) * kBlockSize;
    InitHeader(p, BlockType::kOpenTable, g.SlotBlock(slot, kSlotOpen + b), uuid);
    auto* t = reinterpret_cast<OpenTableBlock*>(p);
    t->generation = generation;
    t->publication = publication;
    t->total = uint32_t(total);
    t->flags = overflow ? kOpenTableOverflow : 0;
    const size_t first = size_t(b) * kOpenInosPerBlock;
    const size_t n = std::min(kOpenInosPerBlock, total - first);
    t->count = uint32_t(n);
    if (n > 0) std::memcpy(t->ino, inos.data() + first, n * sizeof(uint64_t));  // data() may be null
    SealBlock(p);
  }
  return nblocks;
}

Result<OpenTableState> ReadOpenTable(BlockDevice* dev, const Geometry& g, const Uuid& uuid,
                                     uint32_t slot, uint64_t generation,
                                     std::vector<uint64_t>* inos) {
  inos->clear();
  AlignedBuffer b(kBlockSize);
  uint64_t publication = 0;
  uint32_t nblocks = 1;
  for (uint32_t i = 0; i < nblocks; i++) {
    const uint64_t blk = g.SlotBlock(slot, kSlotOpen + i);
    AGFS_RETURN_IF_ERROR(dev->Read(blk * kBlockSize, b.data(), kBlockSize));
    if (i == 0 && IsZeroBlock(b.data())) return OpenTableState::kNothing;  // never written
    if (!VerifyBlock(b.data(), BlockType::kOpenTable, blk, uuid).ok()) {
      return OpenTableState::kAnything;  // torn or damaged
    }
    const auto* t = reinterpret_cast<const OpenTableBlock*>(b.data());
    if (i == 0) {
      // An earlier occupant's: the current one has not published since it joined,
      // so it had nothing open when it last let the lock go.
      if (t->generation != generation) return OpenTableState::kNothing;
      if (t->flags & kOpenTableOverflow) return OpenTableState::kAnything;
      publication = t->publication;
      nblocks = OpenTableBlocks(t->total);
      if (nblocks > kSlotOpenBlocks) return OpenTableState::kAnything;
    } else if (t->generation != generation || t->publication != publication) {
      return OpenTableState::kAnything;  // a mix of two publications
    }
    const uint32_t n = std::min<uint32_t>(t->count, kOpenInosPerBlock);
    for (uint32_t k = 0; k < n; k++) inos->push_back(t->ino[k]);
  }
  return OpenTableState::kListed;
}

std::vector<uint64_t> Filesystem::OpenHere() {
  std::vector<uint64_t> open;
  {
    std::lock_guard<std::mutex> g(states_mu_);
    open.assign(open_inos_.begin(), open_inos_.end());
  }
  std::sort(open.begin(), open.end());
  return open;
}

bool Filesystem::OpenLocally(uint64_t ino) {
  std::lock_guard<std::mutex> g(states_mu_);
  return open_inos_.count(ino) != 0;
}

Status Filesystem::PublishOpens(bool leaving) {
  std::vector<uint64_t> open;
  if (!leaving) open = OpenHere();
  std::lock_guard<std::mutex> g(open_table_mu_);
  const bool overflow = open.size() > size_t(kSlotOpenBlocks) * kOpenInosPerBlock;
  if (published_valid_ && overflow == published_overflow_ && open == published_) {
    return Status::Ok();
  }
  // Until the new table is complete on disk, readers may see a mix of two tables:
  // they read a table whose blocks disagree as "anything open".
  published_valid_ = false;
  publication_++;
  AlignedBuffer buf(size_t(kSlotOpenBlocks) * kBlockSize);
  const uint32_t nblocks =
      EncodeOpenTable(g_, uuid_, info_.slot, info_.generation, publication_, open, buf.data());
  // The table blocks of one slot are contiguous: one write. Like the message rings, it
  // needs no flush: other nodes read it once the write completed (before the release
  // message is written), and after a power cut every node rejoins with a new
  // generation, which voids the table.
  Status st = io_->Write(g_.SlotBlock(info_.slot, kSlotOpen) * kBlockSize, buf.data(),
                         size_t(nblocks) * kBlockSize);
  if (!st.ok()) {
    return Err(st.code(), "writing this node's open-file table: " + st.message());
  }
  published_ = std::move(open);
  published_overflow_ = overflow;
  published_valid_ = true;
  return Status::Ok();
}

bool Filesystem::WasPublished(uint64_t ino) {
  std::lock_guard<std::mutex> g(open_table_mu_);
  // Unknown after a failed write: the table on disk may list anything.
  if (!published_valid_ || published_overflow_) return true;
  return std::binary_search(published_.begin(), published_.end(), ino);
}

Result<Filesystem::SlotSeen> Filesystem::ReadSlotState(uint32_t s, uint64_t* generation) {
  AlignedBuffer b(kBlockSize);
  uint64_t hb = g_.SlotBlock(s, kSlotHeartbeat);
  AGFS_RETURN_IF_ERROR(dev_->Read(hb * kBlockSize, b.data(), kBlockSize));
  if (IsZeroBlock(b.data())) return SlotSeen::kFree;  // never used
  if (!VerifyBlock(b.data(), BlockType::kSlot, hb, uuid_).ok()) return SlotSeen::kUnknown;
  const auto* sb = reinterpret_cast<const SlotBlock*>(b.data());
  *generation = sb->generation;
  return sb->state == kSlotMounted ? SlotSeen::kMounted : SlotSeen::kFree;
}

Status Filesystem::LoadRemoteOpens(RemoteOpens* out) {
  out->where.clear();
  out->anywhere.clear();
  std::vector<uint64_t> inos;
  for (uint32_t s = 0; s < g_.node_slots; s++) {
    if (s == info_.slot) continue;
    uint64_t gen = 0;
    auto seen = ReadSlotState(s, &gen);
    if (!seen.ok()) return seen.status();
    if (*seen == SlotSeen::kUnknown) {
      out->anywhere.push_back(s);  // cannot tell whether it is mounted
      continue;
    }
    if (*seen == SlotSeen::kFree) continue;
    auto r = ReadOpenTable(dev_.get(), g_, uuid_, s, gen, &inos);
    if (!r.ok()) return r.status();
    if (*r == OpenTableState::kAnything) out->anywhere.push_back(s);
    for (uint64_t ino : inos) out->where.emplace(ino, s);
  }
  return Status::Ok();
}

Result<std::optional<uint32_t>> Filesystem::OpenElsewhere(uint64_t ino) {
  std::lock_guard<std::mutex> g(remote_mu_);
  // The other nodes' tables change only while they hold the lock, which they can get
  // only after this node gave it up or down (OnRevoke counts that); a slot leaves
  // without that when its node dies (RecoverSlot counts that, on the lock master;
  // DisposeOrphan checks the slot it passes an orphan to).
  uint64_t now = revokes_.load() + recovered_.load();
  if (!remote_valid_ || remote_at_ != now) {
    remote_valid_ = false;
    AGFS_RETURN_IF_ERROR(LoadRemoteOpens(&remote_));
    remote_valid_ = true;
    remote_at_ = now;
  }
  auto it = remote_.where.find(ino);
  if (it != remote_.where.end()) return std::optional<uint32_t>(it->second);
  if (!remote_.anywhere.empty()) return std::optional<uint32_t>(remote_.anywhere.front());
  return std::optional<uint32_t>();
}

Result<bool> Filesystem::DisposeOrphan(uint32_t list_slot, uint64_t ino) {
  auto st = State(ino);
  std::unique_lock<std::shared_mutex> io(st->io);
  {
    // Another thread may have freed or passed it on meanwhile.
    auto h = store_->Begin(true);
    auto used = h->Allocated(ino);
    if (!used.ok()) return used.status();
    if (!*used) return false;
    auto ir = RIno(*h, g_, ino);
    if (!ir.ok()) return ir.status();
    if ((*ir)->nlink != 0 || !((*ir)->flags & kInodeFlagOrphan)) return false;
  }
  auto list = OrphansOf(list_slot);
  if (!list.ok()) return list.status();
  if (std::find(list->begin(), list->end(), ino) == list->end()) return false;
  uint32_t to_slot = list_slot;
  for (int attempt = 0;; attempt++) {
    auto where = OpenElsewhere(ino);
    if (!where.ok()) return where.status();
    if (!*where) {
      AGFS_RETURN_IF_ERROR(FreeInode(list_slot, ino));
      return true;
    }
    to_slot = **where;
    if (to_slot == list_slot) return false;  // it waits there until that node closes it
    uint64_t gen = 0;
    auto seen = ReadSlotState(to_slot, &gen);
    if (!seen.ok()) return seen.status();
    if (*seen != SlotSeen::kFree || attempt > 0) break;
    // Its node left or died since the tables were read: read them again.
    std::lock_guard<std::mutex> g(remote_mu_);
    remote_valid_ = false;
  }
  {
    auto h = store_->Begin(false, 8);
    AGFS_RETURN_IF_ERROR(AddOrphan(*h, to_slot, ino));
    AGFS_RETURN_IF_ERROR(RemoveOrphan(*h, list_slot, ino));
  }
  spdlog::debug("orphan inode {} is open on node slot {}: moved onto its orphan list", ino,
                to_slot);
  std::lock_guard<std::mutex> g(info_mu_);
  info_.orphans_handed_over++;
  return false;
}

void Filesystem::SweepOrphans() {
  if (!store_ || !store_->failed().ok()) return;
  Gate gate(this, LockMode::kExclusive);
  if (!gate.status().ok()) return;
  auto mine = OrphansOf(info_.slot);
  if (!mine.ok()) {
    spdlog::error("reading this node's orphan list: {}", mine.status().ToString());
    return;
  }
  uint64_t freed = 0;
  for (uint64_t ino : *mine) {
    if (OpenLocally(ino)) continue;
    // DisposeOrphan leaves a linked inode alone: a truncation in progress is finished
    // by the thread doing it.
    auto r = DisposeOrphan(info_.slot, ino);
    if (!r.ok()) {
      spdlog::error("freeing orphan inode {}: {}", ino, r.status().ToString());
      continue;
    }
    if (*r) freed++;
  }
  std::lock_guard<std::mutex> g(info_mu_);
  info_.orphans_freed += freed;
}

void Filesystem::RequestSweep() {
  {
    std::lock_guard<std::mutex> g(info_mu_);
    janitor_sweep_ = true;
  }
  janitor_cv_.notify_all();
}

}  // namespace agorafs
