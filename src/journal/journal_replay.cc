// Journal::Replay: scans the log from the tail and writes complete transactions home.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <numeric>

#include "journal/journal.h"
#include "util/hash.h"

namespace agorafs {

// A transaction read back from the log and fully verified.
struct Journal::TxnImage {
  uint32_t length = 0;               // log blocks, COMMIT included
  std::vector<uint64_t> homes;       // in log order
  std::vector<AlignedBuffer> chunks;  // data blocks following each DESC
  std::string stop_reason;           // set when ReadTxn returns false

  // Every DESC but the last is full, so block i is in chunk i / kDescEntries.
  const uint8_t* Data(size_t i) const {
    return chunks[i / kDescEntries].data() + (i % kDescEntries) * kBlockSize;
  }
};

Result<bool> Journal::ReadTxn(uint32_t pos, uint64_t seq, uint32_t budget, TxnImage* t) {
  uint32_t used = 0;  // blocks of this transaction scanned so far
  uint32_t p = pos;   // log index being examined
  auto stop = [&](const std::string& why) -> Result<bool> {
    t->stop_reason = "transaction " + std::to_string(seq) + " at log index " +
                     std::to_string(pos) + ": " + why + " (log index " + std::to_string(p) + ")";
    return false;
  };
  AlignedBuffer blk(kBlockSize);
  if (!blk.valid()) return Err(Code::kNoMemory, Where() + ": replay buffer");
  Hasher hash;
  uint32_t descs = 0;
  for (;;) {
    if (used >= budget) return stop("transaction runs past the end of the log");
    p = (pos + used) % capacity_;
    AGFS_RETURN_IF_ERROR(ReadLog(p, blk.data(), 1));
    const uint16_t type = Header(blk.data())->type;
    if (descs > 0 && type == static_cast<uint16_t>(BlockType::kJournalCommit)) break;
    if (descs > 0 && t->homes.size() % kDescEntries != 0) {
      return stop("a partial descriptor is not followed by the commit");
    }
    Status v = VerifyBlock(blk.data(), BlockType::kJournalDesc, LogBlockNr(p), uuid_);
    if (!v.ok()) return stop(v.message());
    const auto* d = reinterpret_cast<const JournalDesc*>(blk.data());
    if (d->hdr.seq != seq) return stop("descriptor has seq " + std::to_string(d->hdr.seq));
    if (d->index != descs) return stop("descriptor has index " + std::to_string(d->index));
    if (d->count == 0 || d->count > kDescEntries) {
      return stop("descriptor lists " + std::to_string(d->count) + " blocks");
    }
    const uint32_t count = d->count;
    hash.Update(blk.data(), kBlockSize);
    used++;
    if (count > budget - used) return stop("transaction runs past the end of the log");
    const size_t first = t->homes.size();
    t->homes.resize(first + count);
    std::memcpy(t->homes.data() + first, blk.data() + offsetof(JournalDesc, home),
                size_t(count) * sizeof(uint64_t));
    AlignedBuffer chunk(size_t(count) * kBlockSize);
    if (!chunk.valid()) return Err(Code::kNoMemory, Where() + ": replay buffer");
    AGFS_RETURN_IF_ERROR(ReadLog((pos + used) % capacity_, chunk.data(), count));
    hash.Update(chunk.data(), chunk.size());
    t->chunks.push_back(std::move(chunk));
    used += count;
    descs++;
  }

  Status v = VerifyBlock(blk.data(), BlockType::kJournalCommit, LogBlockNr(p), uuid_);
  if (!v.ok()) return stop(v.message());
  const auto* c = reinterpret_cast<const JournalCommit*>(blk.data());
  if (c->hdr.seq != seq) return stop("commit has seq " + std::to_string(c->hdr.seq));
  if (c->desc_count != descs || c->data_count != t->homes.size()) {
    return stop("commit counts " + std::to_string(c->desc_count) + "/" +
                std::to_string(c->data_count) + " disagree with the descriptors");
  }
  if (c->body_hash != hash.Digest()) return stop("body hash mismatch");
  t->length = used + 1;
  return true;
}

// Writes the transaction home: sorted by address, the last copy of a repeated home
// wins, runs of consecutive addresses batched by WriteHome.
Status Journal::ApplyTxn(const TxnImage& t) {
  std::vector<size_t> order(t.homes.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return t.homes[a] < t.homes[b]; });
  std::vector<size_t> last;  // one index per distinct home, the latest in log order
  for (size_t i : order) {
    if (!last.empty() && t.homes[last.back()] == t.homes[i]) {
      last.back() = i;
    } else {
      last.push_back(i);
    }
  }
  std::vector<JournalBlock> home;
  home.reserve(last.size());
  for (size_t i : last) home.push_back(JournalBlock{t.homes[i], t.Data(i)});
  Status s = WriteHome(dev_, home, &stage_);
  if (!s.ok()) return Err(s.code(), Where() + ": replay: " + s.message());
  return Status::Ok();
}

Result<ReplayStats> Journal::Replay() {
  if (failed_) return Err(Code::kIOError, Where() + ": stopped by an earlier I/O error");
  if (replayed_) return Err(Code::kInvalid, Where() + ": already replayed");
  ReplayStats st;
  uint64_t seq = tail_seq_;
  uint32_t pos = tail_pos_;
  uint32_t scanned = 0;
  for (;;) {
    TxnImage t;
    Result<bool> r = ReadTxn(pos, seq, capacity_ - scanned, &t);
    if (!r.ok()) return Fail(r.status());
    if (!*r) {
      st.stop_reason = t.stop_reason;
      break;
    }
    for (uint64_t home : t.homes) {
      if (!HomeAllowed(home)) {
        return Err(Code::kCorruption,
                   Where() + ": transaction " + std::to_string(seq) + " at log index " +
                       std::to_string(pos) + " targets block " + std::to_string(home) +
                       " outside the data area; refusing to replay");
      }
    }
    Status s = ApplyTxn(t);
    if (!s.ok()) return Fail(s);
    st.transactions++;
    st.blocks += t.homes.size();
    st.last_seq = seq;
    pos = (pos + t.length) % capacity_;
    scanned += t.length;
    seq++;
  }
  if (st.transactions > 0) {
    Status s = dev_->Flush();
    if (!s.ok()) return Fail(s);
  }
  // Skip Capacity() sequences: every transaction still lying in the log has a lower one.
  const uint64_t next = seq + capacity_;
  Status s = WriteHeader(next, pos);
  if (!s.ok()) return Fail(s);
  tail_seq_ = next_seq_ = next;
  tail_pos_ = head_pos_ = pos;
  used_ = 0;
  txns_.clear();
  replayed_ = true;
  return st;
}

}  // namespace agorafs
