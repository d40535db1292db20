// Mailbox: see mailbox.h.
#include "cluster/mailbox.h"

#include <algorithm>
#include <cstring>

namespace agorafs {

namespace {
uint64_t RingIndex(uint64_t seq) { return (seq / kMsgsPerRingBlock) % kSlotRingBlocks; }
uint64_t BlockFirst(uint64_t seq) { return seq / kMsgsPerRingBlock * kMsgsPerRingBlock; }
}  // namespace

Mailbox::Mailbox(BlockDevice* wdev, BlockDevice* rdev, const Geometry& g, const Uuid& uuid,
                 uint32_t slot, uint64_t generation)
    : wdev_(wdev), rdev_(rdev), g_(g), uuid_(uuid), slot_(slot), gen_(generation),
      tail_(kBlockSize) {
  auto* rb = reinterpret_cast<RingBlock*>(tail_.data());
  rb->generation = gen_;
  rb->first_seq = BlockFirst(next_seq_);
  rb->count = uint32_t(next_seq_ - rb->first_seq);  // seq 0 is a hole
}

uint64_t Mailbox::Room() const {
  // Seq t may be written once its block's previous lap, seqs
  // [BlockFirst(t) - kCapacity, +kMsgsPerRingBlock), is entirely below the floor.
  uint64_t limit = floor_ + kCapacity - kMsgsPerRingBlock;
  uint64_t last_ok = BlockFirst(limit) + kMsgsPerRingBlock - 1;
  // The block being filled was admitted when its first message was written. A
  // next_seq_ on a block boundary starts a new block, which must pass the test above
  // (admitting it anyway let a writer go on a block per call past a reader that had
  // read nothing: a reclaim larger than the ring overran a new master).
  if (next_seq_ % kMsgsPerRingBlock != 0) {
    last_ok = std::max(last_ok, BlockFirst(next_seq_) + kMsgsPerRingBlock - 1);
  }
  return last_ok + 1 > next_seq_ ? last_ok + 1 - next_seq_ : 0;
}

Status Mailbox::WriteBlock(uint64_t blk, uint8_t* data, BlockType t) {
  InitHeader(data, t, blk, uuid_);
  SealBlock(data);
  stats_.writes++;
  return wdev_->Write(blk * kBlockSize, data, kBlockSize);
}

Result<bool> Mailbox::ReadBlock(uint64_t blk, uint8_t* data, BlockType t) {
  stats_.reads++;
  AGFS_RETURN_IF_ERROR(rdev_->Read(blk * kBlockSize, data, kBlockSize));
  if (IsZeroBlock(data)) return false;
  AGFS_RETURN_IF_ERROR(VerifyBlock(data, t, blk, uuid_));
  return true;
}

Result<uint64_t> Mailbox::Append(std::vector<Msg>& msgs) {
  if (msgs.empty()) return next_seq_ - 1;
  if (msgs.size() > Room()) {
    return Err(Code::kBusy, "message ring of slot " + std::to_string(slot_) + " is full");
  }
  auto* rb = reinterpret_cast<RingBlock*>(tail_.data());
  size_t i = 0;
  while (i < msgs.size()) {
    // Fill the current tail block, then write it.
    while (i < msgs.size() && rb->count < kMsgsPerRingBlock) {
      msgs[i].seq = next_seq_++;
      rb->msgs[rb->count++] = msgs[i++];
    }
    uint64_t blk = g_.SlotBlock(slot_, kSlotRing + uint32_t(RingIndex(rb->first_seq)));
    AlignedBuffer out(kBlockSize);
    std::memcpy(out.data(), tail_.data(), kBlockSize);
    AGFS_RETURN_IF_ERROR(WriteBlock(blk, out.data(), BlockType::kRing));
    if (rb->count == kMsgsPerRingBlock) {
      // Start the next block image.
      std::memset(tail_.data(), 0, kBlockSize);
      rb->generation = gen_;
      rb->first_seq = BlockFirst(next_seq_);
      rb->count = 0;
    }
  }
  stats_.appended += msgs.size();
  return next_seq_ - 1;
}

Result<std::vector<Msg>> Mailbox::Read(uint32_t peer, uint64_t peer_gen, uint64_t* next) {
  std::vector<Msg> out;
  AlignedBuffer b(kBlockSize);
  for (int guard = 0; guard < int(kSlotRingBlocks); guard++) {
    uint64_t want = *next;
    uint64_t blk = g_.SlotBlock(peer, kSlotRing + uint32_t(RingIndex(want)));
    auto r = ReadBlock(blk, b.data(), BlockType::kRing);
    if (!r.ok()) return r.status();
    if (!*r) break;
    const auto* rb = reinterpret_cast<const RingBlock*>(b.data());
    if (rb->generation != peer_gen) break;
    if (rb->count > kMsgsPerRingBlock || rb->first_seq % kMsgsPerRingBlock != 0) {
      return Err(Code::kCorruption, "message ring block " + std::to_string(blk) + " is malformed");
    }
    if (rb->first_seq < BlockFirst(want)) break;  // older lap: nothing new yet
    if (rb->first_seq > BlockFirst(want)) {
      return Err(Code::kCorruption, "message ring of slot " + std::to_string(peer) +
                                        " overran this reader at seq " + std::to_string(want));
    }
    uint64_t end = rb->first_seq + rb->count;
    for (uint64_t s = want; s < end; s++) {
      const Msg& m = rb->msgs[s - rb->first_seq];
      if (m.seq != s) {
        return Err(Code::kCorruption, "message ring block " + std::to_string(blk) +
                                          " holds seq " + std::to_string(m.seq) + " at " +
                                          std::to_string(s));
      }
      out.push_back(m);
    }
    if (end > want) *next = end;
    if (rb->count < kMsgsPerRingBlock) break;  // the writer is still filling it
  }
  stats_.received += out.size();
  return out;
}

Status Mailbox::WriteMailHeader(const MailHeader& h) {
  AlignedBuffer b(kBlockSize);
  std::memcpy(b.data(), &h, kBlockSize);
  return WriteBlock(g_.SlotBlock(slot_, kSlotMailbox), b.data(), BlockType::kMailHeader);
}

Result<MailHeader> Mailbox::ReadMailHeader(uint32_t slot) {
  AlignedBuffer b(kBlockSize);
  auto r = ReadBlock(g_.SlotBlock(slot, kSlotMailbox), b.data(), BlockType::kMailHeader);
  if (!r.ok()) return r.status();
  MailHeader h;
  std::memcpy(&h, b.data(), kBlockSize);
  return h;  // all zero when never written: epoch 0
}

Status Mailbox::WriteAcks(uint64_t epoch, const std::vector<AckEntry>& acks) {
  for (uint32_t i = 0; i < kSlotAckBlocks; i++) {
    size_t first = size_t(i) * kAcksPerBlock;
    if (first >= acks.size() && i > 0) break;
    AlignedBuffer b(kBlockSize);
    auto* t = reinterpret_cast<AckTableBlock*>(b.data());
    t->epoch = epoch;
    t->master_gen = gen_;
    for (size_t k = 0; k < kAcksPerBlock && first + k < acks.size(); k++) {
      t->acks[k] = acks[first + k];
    }
    AGFS_RETURN_IF_ERROR(
        WriteBlock(g_.SlotBlock(slot_, kSlotAcks + i), b.data(), BlockType::kAckTable));
  }
  return Status::Ok();
}

Result<Mailbox::AckView> Mailbox::ReadAck(uint32_t master, uint32_t slot) {
  AlignedBuffer b(kBlockSize);
  uint32_t i = uint32_t(slot / kAcksPerBlock);
  auto r = ReadBlock(g_.SlotBlock(master, kSlotAcks + i), b.data(), BlockType::kAckTable);
  if (!r.ok()) return r.status();
  AckView v;
  if (!*r) return v;
  const auto* t = reinterpret_cast<const AckTableBlock*>(b.data());
  v.epoch = t->epoch;
  v.master_gen = t->master_gen;
  v.entry = t->acks[slot % kAcksPerBlock];
  return v;
}

}  // namespace agorafs
