// Mailbox: a node's outgoing message ring on the shared disk, and reading other
// nodes' rings. Single-writer: a node writes only its own slot's blocks.
//
// Contract
// - Message seq s (from 1, per writer generation) lives in ring block
//   (s / kMsgsPerRingBlock) % kSlotRingBlocks at index s % kMsgsPerRingBlock (seq 0 is
//   never used). Append() rewrites the block(s) it touches whole; a message is on the
//   disk when Append returns.
// - Flow control: the writer is told the lowest seq any reader still needs
//   (SetFloor). Append refuses with kBusy (writing nothing) when the messages would
//   overwrite a block holding a seq >= floor; the caller retries after readers moved.
// - Read(peer, gen, &next) reads the block where `next` lives (and the following ones
//   while they are full), returns the messages with seq >= next written by generation
//   `gen`, and advances `next`. A block of another generation or an older lap holds
//   nothing new. A block of a newer lap than `next` means the reader was overrun
//   (cannot happen under flow control): kCorruption.
// - Mail headers and the master's ack table are plain single-block records: Write*
//   seals and writes one block, Read* verifies and returns it (all-zero = empty).
//
// Thread-safety: Append/Write* from one thread at a time; Read* from any thread.
#pragma once

#include <cstdint>
#include <vector>

#include "device/block_device.h"
#include "format/format.h"
#include "util/status.h"

namespace agorafs {

class Mailbox {
 public:
  static constexpr uint64_t kCapacity = uint64_t(kSlotRingBlocks) * kMsgsPerRingBlock;

  // Writes go through `wdev` (the node's GuardedDevice); reads through `rdev`.
  Mailbox(BlockDevice* wdev, BlockDevice* rdev, const Geometry& g, const Uuid& uuid,
          uint32_t slot, uint64_t generation);

  // Assigns consecutive seqs to `msgs` (their seq fields are overwritten) and writes
  // them. Returns the last seq written.
  Result<uint64_t> Append(std::vector<Msg>& msgs);
  uint64_t next_seq() const { return next_seq_; }
  void SetFloor(uint64_t floor) { floor_ = floor; }
  // How many messages can be appended now.
  uint64_t Room() const;

  Result<std::vector<Msg>> Read(uint32_t peer, uint64_t peer_gen, uint64_t* next);

  Status WriteMailHeader(const MailHeader& h);
  Result<MailHeader> ReadMailHeader(uint32_t slot);
  // The master's ack table: acks[s] for every slot s < node_slots.
  Status WriteAcks(uint64_t epoch, const std::vector<AckEntry>& acks);
  // One slot's entry of `master`'s ack table, with the table's epoch and master_gen.
  struct AckView {
    uint64_t epoch = 0, master_gen = 0;
    AckEntry entry{};
  };
  Result<AckView> ReadAck(uint32_t master, uint32_t slot);

  struct Stats {
    uint64_t reads = 0, writes = 0, appended = 0, received = 0;
  };
  Stats stats() const { return stats_; }

 private:
  Status WriteBlock(uint64_t blk, uint8_t* data, BlockType t);
  Result<bool> ReadBlock(uint64_t blk, uint8_t* data, BlockType t);  // false = all zero

  BlockDevice* wdev_;
  BlockDevice* rdev_;
  Geometry g_;
  Uuid uuid_;
  uint32_t slot_;
  uint64_t gen_;
  uint64_t next_seq_ = 1;
  uint64_t floor_ = 1;
  AlignedBuffer tail_;  // image of the ring block holding next_seq_
  Stats stats_;
};

}  // namespace agorafs
