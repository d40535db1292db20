// Journal: format, open, commit and checkpoint. Replay is in journal_replay.cc.
#include "journal/journal.h"
#include "util/clock.h"

#include <time.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <vector>

#include "util/hash.h"

namespace agorafs {
namespace {

Status CheckRegion(BlockDevice* dev, const Geometry& g, uint32_t slot) {
  std::string where = "journal slot " + std::to_string(slot);
  if (slot >= g.node_slots) {
    return Err(Code::kInvalid, where + ": only " + std::to_string(g.node_slots) + " slots");
  }
  if (g.journal_blocks < kJournalLogStart + 3) {
    return Err(Code::kInvalid, where + ": journal of " + std::to_string(g.journal_blocks) +
                                   " blocks is too small");
  }
  uint64_t end = g.JournalStart(slot) + g.journal_blocks;
  if (end > dev->Size() / kBlockSize) {
    return Err(Code::kInvalid, where + ": region ends at block " + std::to_string(end) +
                                   " beyond " + dev->Name());
  }
  return Status::Ok();
}

void FillHeader(uint8_t* b, const Uuid& uuid, uint64_t blocknr, uint64_t update,
                uint64_t tail_seq, uint32_t tail_pos, uint32_t slot, uint64_t generation) {
  std::memset(b, 0, kBlockSize);
  InitHeader(b, BlockType::kJournalHeader, blocknr, uuid);
  auto* h = reinterpret_cast<JournalHeader*>(b);
  h->update = update;
  h->tail_seq = tail_seq;
  h->tail_pos = tail_pos;
  h->slot = slot;
  h->generation = generation;
  SealBlock(b);
}


}  // namespace

uint32_t Journal::BlocksNeeded(size_t n_data) {
  if (n_data == 0) return 0;
  uint64_t descs = (uint64_t(n_data) + kDescEntries - 1) / kDescEntries;
  uint64_t total = descs + n_data + 1;
  return total > std::numeric_limits<uint32_t>::max() ? std::numeric_limits<uint32_t>::max()
                                                       : uint32_t(total);
}

Journal::Journal(BlockDevice* dev, const Geometry& g, const Uuid& uuid, uint32_t slot,
                 uint64_t generation)
    : dev_(dev),
      g_(g),
      uuid_(uuid),
      slot_(slot),
      generation_(generation),
      region_(g.JournalStart(slot)),
      capacity_(g.journal_blocks - kJournalLogStart) {}

Status Journal::Format(BlockDevice* dev, const Geometry& g, const Uuid& uuid, uint32_t slot) {
  AGFS_RETURN_IF_ERROR(CheckRegion(dev, g, slot));
  const uint64_t region = g.JournalStart(slot);
  // Both header copies plus a zeroed first log block, so nothing at tail_pos 0 verifies.
  AlignedBuffer buf(3 * kBlockSize);
  if (!buf.valid()) return Err(Code::kNoMemory, "journal format buffer");
  for (uint32_t i = 0; i < 2; i++) {
    FillHeader(buf.data() + i * kBlockSize, uuid, region + i, /*update=*/i, /*tail_seq=*/1,
               /*tail_pos=*/0, slot, /*generation=*/0);
  }
  AGFS_RETURN_IF_ERROR(dev->Write(region * kBlockSize, buf.data(), buf.size()));
  return dev->Flush();
}

Result<std::unique_ptr<Journal>> Journal::Open(BlockDevice* dev, const Geometry& g,
                                               const Uuid& uuid, uint32_t slot,
                                               uint64_t generation) {
  AGFS_RETURN_IF_ERROR(CheckRegion(dev, g, slot));
  std::unique_ptr<Journal> j(new Journal(dev, g, uuid, slot, generation));
  AlignedBuffer buf(2 * kBlockSize);
  if (!buf.valid()) return Err(Code::kNoMemory, "journal header buffer");
  AGFS_RETURN_IF_ERROR(dev->Read(j->region_ * kBlockSize, buf.data(), buf.size()));

  const JournalHeader* best = nullptr;
  std::string why[2];
  for (uint32_t i = 0; i < 2; i++) {
    const uint8_t* b = buf.data() + i * kBlockSize;
    const auto* h = reinterpret_cast<const JournalHeader*>(b);
    Status s = VerifyBlock(b, BlockType::kJournalHeader, j->region_ + i, uuid);
    if (!s.ok()) {
      why[i] = s.message();
    } else if (h->slot != slot) {
      why[i] = "header copy " + std::to_string(i) + " names slot " + std::to_string(h->slot);
    } else if (h->tail_pos >= j->capacity_ || h->tail_seq == 0) {
      why[i] = "header copy " + std::to_string(i) + " has tail " +
               std::to_string(h->tail_seq) + "@" + std::to_string(h->tail_pos) +
               " outside the log";
    } else if (best == nullptr || h->update > best->update) {
      best = h;
    }
  }
  if (best == nullptr) {
    return Err(Code::kCorruption, j->Where() + ": both header copies are invalid (" + why[0] +
                                      "; " + why[1] + ")");
  }
  j->update_ = best->update;
  j->tail_seq_ = j->next_seq_ = best->tail_seq;
  j->tail_pos_ = j->head_pos_ = best->tail_pos;
  return j;
}

std::string Journal::Where() const { return "journal slot " + std::to_string(slot_); }

bool Journal::HomeAllowed(uint64_t home) const {
  return g_.Journaled(home) && home < dev_->Size() / kBlockSize;
}

Status Journal::Fail(Status s) {
  failed_ = true;
  return Err(s.code(), Where() + ": " + s.message());
}

Status Journal::ReadLog(uint32_t pos, uint8_t* buf, uint32_t n) {
  while (n > 0) {
    uint32_t run = std::min(n, capacity_ - pos);
    AGFS_RETURN_IF_ERROR(dev_->Read(LogBlockNr(pos) * kBlockSize, buf, size_t(run) * kBlockSize));
    buf += size_t(run) * kBlockSize;
    n -= run;
    pos = (pos + run) % capacity_;
  }
  return Status::Ok();
}

Status Journal::WriteLog(uint32_t pos, const uint8_t* buf, uint32_t n) {
  while (n > 0) {
    uint32_t run = std::min(n, capacity_ - pos);
    AGFS_RETURN_IF_ERROR(
        dev_->Write(LogBlockNr(pos) * kBlockSize, buf, size_t(run) * kBlockSize));
    buf += size_t(run) * kBlockSize;
    n -= run;
    pos = (pos + run) % capacity_;
  }
  return Status::Ok();
}

uint8_t* StageBuffer::Get(size_t blocks) {
  blocks = std::min(std::max<size_t>(blocks, 1), kMaxBlocks);
  if (buf_.data() == nullptr || buf_.size() < blocks * kBlockSize) {
    buf_ = AlignedBuffer(std::min(std::bit_ceil(blocks), kMaxBlocks) * kBlockSize);
    if (buf_.data() == nullptr) buf_ = AlignedBuffer();  // asks again next time
  }
  return buf_.data();
}

Status WriteHome(BlockDevice* dev, const std::vector<JournalBlock>& blocks, StageBuffer* stage) {
  constexpr size_t kStage = StageBuffer::kMaxBlocks;
  uint8_t* buf = stage->Get(blocks.size());
  if (buf == nullptr) return Err(Code::kNoMemory, "no memory to write metadata home");
  std::vector<WriteOp> runs;
  size_t k = 0;
  while (k < blocks.size()) {
    runs.clear();
    size_t used = 0;  // blocks staged in this batch
    while (k < blocks.size() && used < kStage) {
      const uint64_t start = blocks[k].home;
      uint8_t* dst = buf + used * kBlockSize;
      size_t n = 0;
      while (k < blocks.size() && blocks[k].home == start + n && used < kStage) {
        std::memcpy(dst + n * kBlockSize, blocks[k].data, kBlockSize);
        k++;
        n++;
        used++;
      }
      runs.push_back(WriteOp{start * kBlockSize, dst, n * kBlockSize});
    }
    AGFS_RETURN_IF_ERROR(dev->WriteBatch(runs.data(), runs.size()));
  }
  return Status::Ok();
}

Status Journal::WriteHeader(uint64_t tail_seq, uint32_t tail_pos) {
  const uint64_t update = update_ + 1;
  const uint64_t blocknr = region_ + (update % 2);  // never the newest valid copy
  AlignedBuffer b(kBlockSize);
  if (!b.valid()) return Err(Code::kNoMemory, "journal header buffer");
  FillHeader(b.data(), uuid_, blocknr, update, tail_seq, tail_pos, slot_, generation_);
  AGFS_RETURN_IF_ERROR(dev_->Write(blocknr * kBlockSize, b.data(), kBlockSize));
  AGFS_RETURN_IF_ERROR(dev_->Flush());
  update_ = update;
  return Status::Ok();
}

Result<uint64_t> Journal::Commit(const std::vector<JournalBlock>& blocks) {
  if (failed_) return Err(Code::kIOError, Where() + ": stopped by an earlier I/O error");
  if (!replayed_) return Err(Code::kInvalid, Where() + ": Replay must run before Commit");
  if (blocks.empty()) return Err(Code::kInvalid, Where() + ": empty transaction");
  for (const JournalBlock& b : blocks) {
    if (b.data == nullptr) return Err(Code::kInvalid, Where() + ": block without data");
    if (!HomeAllowed(b.home)) {
      return Err(Code::kInvalid, Where() + ": home block " + std::to_string(b.home) +
                                     " is outside the data area");
    }
  }
  const uint32_t need = BlocksNeeded(blocks.size());
  if (need > capacity_) {
    return Err(Code::kInvalid, Where() + ": transaction of " + std::to_string(need) +
                                   " blocks exceeds the log (" + std::to_string(capacity_) +
                                   " blocks)");
  }
  if (need > FreeBlocks()) {
    return Err(Code::kNoSpace, Where() + ": transaction needs " + std::to_string(need) +
                                   " log blocks, " + std::to_string(FreeBlocks()) + " free");
  }

  const uint64_t seq = next_seq_;
  const uint32_t body = need - 1;  // DESC and data blocks
  // The body goes out in pieces of at most kStageBlocks through one staging buffer,
  // so a large transaction costs no memory in proportion to its size (it may be a
  // third of the log: megabytes on top of the metadata cache).
  constexpr uint32_t kStageBlocks = StageBuffer::kMaxBlocks;
  uint8_t* stage = stage_.Get(body);
  AlignedBuffer commit(kBlockSize);
  if (stage == nullptr || !commit.valid()) return Err(Code::kNoMemory, Where() + ": commit buffer");

  Hasher hash;
  uint32_t off = 0;      // block index within the transaction
  uint32_t staged = 0;   // blocks in `stage` not yet written
  uint32_t written = 0;  // blocks of the body written so far
  Status s;
  auto write_stage = [&] {
    s = WriteLog((head_pos_ + written) % capacity_, stage, staged);
    written += staged;
    staged = 0;
  };
  // The next block of the body, in the staging buffer; writes the buffer out when full.
  auto next_block = [&]() -> uint8_t* {
    if (staged == kStageBlocks) write_stage();
    return stage + size_t(staged++) * kBlockSize;
  };
  uint32_t descs = 0;
  for (size_t first = 0; first < blocks.size() && s.ok(); first += kDescEntries, descs++) {
    const size_t count = std::min(kDescEntries, blocks.size() - first);
    uint8_t* d = next_block();
    InitHeader(d, BlockType::kJournalDesc, LogBlockNr((head_pos_ + off) % capacity_), uuid_);
    auto* desc = reinterpret_cast<JournalDesc*>(d);
    desc->hdr.seq = seq;
    desc->count = uint32_t(count);
    desc->index = descs;
    for (size_t i = 0; i < count; i++) desc->home[i] = blocks[first + i].home;
    SealBlock(d);
    hash.Update(d, kBlockSize);
    off++;
    for (size_t i = 0; i < count && s.ok(); i++, off++) {
      uint8_t* p = next_block();
      std::memcpy(p, blocks[first + i].data, kBlockSize);
      hash.Update(p, kBlockSize);
    }
  }
  if (s.ok() && staged > 0) write_stage();
  if (!s.ok()) return Fail(s);

  const uint32_t commit_pos = (head_pos_ + body) % capacity_;
  InitHeader(commit.data(), BlockType::kJournalCommit, LogBlockNr(commit_pos), uuid_);
  auto* c = reinterpret_cast<JournalCommit*>(commit.data());
  c->hdr.seq = seq;
  c->desc_count = descs;
  c->data_count = uint32_t(blocks.size());
  c->body_hash = hash.Digest();
  c->commit_ns = RealtimeNs();
  SealBlock(commit.data());

  s = dev_->Flush();
  if (s.ok()) s = WriteLog(commit_pos, commit.data(), 1);
  if (s.ok()) s = dev_->Flush();
  if (!s.ok()) return Fail(s);

  txns_.push_back(Txn{seq, head_pos_, need});
  head_pos_ = (head_pos_ + need) % capacity_;
  used_ += need;
  next_seq_++;
  return seq;
}

Status Journal::Checkpoint(uint64_t seq) {
  if (failed_) return Err(Code::kIOError, Where() + ": stopped by an earlier I/O error");
  if (!replayed_) return Err(Code::kInvalid, Where() + ": Replay must run before Checkpoint");
  if (seq >= next_seq_) {
    return Err(Code::kInvalid, Where() + ": checkpoint of " + std::to_string(seq) +
                                   " beyond the last commit " + std::to_string(next_seq_ - 1));
  }
  if (seq < tail_seq_) return Status::Ok();
  size_t drop = 0;
  uint32_t freed = 0;
  while (drop < txns_.size() && txns_[drop].seq <= seq) freed += txns_[drop++].blocks;
  const uint32_t new_pos = drop < txns_.size() ? txns_[drop].pos : head_pos_;
  Status s = WriteHeader(seq + 1, new_pos);
  if (!s.ok()) return Fail(s);
  txns_.erase(txns_.begin(), txns_.begin() + drop);
  used_ -= freed;
  tail_seq_ = seq + 1;
  tail_pos_ = new_pos;
  return Status::Ok();
}

}  // namespace agorafs
