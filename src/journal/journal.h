// Journal: one node slot's write-ahead metadata journal (layout in format.h).
//
// The region of slot s is blocks [g.JournalStart(s), + g.journal_blocks): blocks 0
// and 1 hold two copies of the JournalHeader, the rest is a circular log of
// transactions DESC(S) data... [DESC(S) data...] COMMIT(S). Log index i is block
// JournalStart(s) + 2 + i.
//
// Contract
// - Format writes an empty journal (tail_seq 1, tail_pos 0) and flushes. It relies
//   on the filesystem UUID being new: log blocks left by another filesystem never
//   verify.
// - Open reads the header copies and keeps the valid one with the higher `update`;
//   if neither is valid it returns kCorruption naming the slot. It writes nothing.
// - Replay must succeed before Commit/Checkpoint are accepted (they return kInvalid
//   until then). It applies, in order, every complete transaction from the tail:
//   each block is written to its home address. It stops at the first transaction
//   that is missing, torn (a DESC/COMMIT header check fails, a sequence is not the
//   expected one, or the body hash differs) or would run past the log; that one and
//   everything after it is discarded whole. A complete transaction with a home
//   outside the data area and the slots' orphan lists (Geometry::Journaled) is
//   kCorruption and nothing of it is
//   written. Afterwards Replay flushes, then writes a header making the log empty at
//   the position after the last replayed transaction, and flushes again. The next
//   sequence then jumps ahead by Capacity(), so a transaction that was stranded
//   beyond the stop point by a damaged predecessor can never match a sequence
//   expected by a later replay. Replay is idempotent: a crash during it is repaired
//   by replaying again.
// - Commit appends one transaction: DESC and data blocks (one Write per contiguous
//   run, through a StageBuffer kept between commits), Flush, COMMIT, Flush. On OK it
//   returns the transaction's sequence and the transaction is durable. kInvalid:
//   empty, a null block, a home outside the data area, or larger than the whole log.
//   kNoSpace: it does not fit in FreeBlocks() now (checkpoint first). On an I/O
//   error the transaction may or may not survive a crash (never partially), and the
//   journal fails: every later Commit and Checkpoint returns kIOError.
// - Checkpoint(seq) is called once every transaction with sequence <= seq has been
//   written home and flushed by the caller. It writes the header (alternating
//   copies, update + 1) and flushes before the log space is reused. seq below
//   checkpointed() is a no-op; seq above last_committed() is kInvalid.
// - The log never overwrites a block of a transaction that is not checkpointed.
// - Data blocks are copied verbatim; the caller seals them. They are not verified.
// - Ownership: the BlockDevice is borrowed and must outlive the Journal.
// - Thread-safety: not thread-safe; the caller serialises every call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "device/block_device.h"
#include "format/format.h"
#include "util/status.h"

namespace agorafs {

struct JournalBlock {
  uint64_t home;        // destination block number
  const uint8_t* data;  // kBlockSize bytes, already sealed by the caller
};

// An aligned staging buffer that stays mapped from one use to the next. A buffer
// allocated per commit or checkpoint is mapped and zeroed afresh each time: on the
// development VM that page-faulting took 1.1 ms of a 78-block commit whose write took
// 0.1 ms, and a lock handover pays a commit and a checkpoint. It grows to the next
// power of two of blocks asked for (at most kMaxBlocks, 1 MiB) and never shrinks.
// Not thread-safe: each owner uses it under the lock that serialises its journal I/O.
class StageBuffer {
 public:
  static constexpr size_t kMaxBlocks = 256;
  // Room for min(blocks, kMaxBlocks) blocks; nullptr when out of memory.
  uint8_t* Get(size_t blocks);

 private:
  AlignedBuffer buf_;
};

// Writes `blocks` (sorted by home, each home once) to their home addresses: runs of
// consecutive homes, staged in `stage` up to StageBuffer::kMaxBlocks at a time, each
// stage one WriteBatch (FileDevice submits it through io_uring). Returns once every
// write finished; does not flush. What a checkpoint and a replay both do.
Status WriteHome(BlockDevice* dev, const std::vector<JournalBlock>& blocks, StageBuffer* stage);

struct ReplayStats {
  uint64_t transactions = 0;  // transactions applied
  uint64_t blocks = 0;        // data blocks written home
  uint64_t last_seq = 0;      // sequence of the last applied transaction, 0 if none
  std::string stop_reason;    // why the scan stopped (informational)
};

class Journal {
 public:
  static Status Format(BlockDevice* dev, const Geometry& g, const Uuid& uuid, uint32_t slot);
  static Result<std::unique_ptr<Journal>> Open(BlockDevice* dev, const Geometry& g,
                                               const Uuid& uuid, uint32_t slot,
                                               uint64_t generation);

  Result<ReplayStats> Replay();
  Result<uint64_t> Commit(const std::vector<JournalBlock>& blocks);
  Status Checkpoint(uint64_t seq);

  uint32_t FreeBlocks() const { return capacity_ - used_; }  // for the next Commit
  uint32_t Capacity() const { return capacity_; }            // log blocks in total
  // DESC + data + COMMIT blocks a transaction of n_data blocks occupies (0 for 0).
  static uint32_t BlocksNeeded(size_t n_data);

  uint64_t last_committed() const { return next_seq_ - 1; }
  uint64_t checkpointed() const { return tail_seq_ - 1; }
  bool failed() const { return failed_; }
  uint32_t slot() const { return slot_; }

 private:
  struct Txn {  // a committed, not yet checkpointed transaction
    uint64_t seq;
    uint32_t pos;
    uint32_t blocks;
  };
  struct TxnImage;  // a transaction read back from the log (journal_replay.cc)

  Journal(BlockDevice* dev, const Geometry& g, const Uuid& uuid, uint32_t slot,
          uint64_t generation);

  uint64_t LogBlockNr(uint32_t pos) const { return region_ + kJournalLogStart + pos; }
  bool HomeAllowed(uint64_t home) const;
  std::string Where() const;  // "journal slot N"
  // n blocks at log index pos, split where the log wraps.
  Status ReadLog(uint32_t pos, uint8_t* buf, uint32_t n);
  Status WriteLog(uint32_t pos, const uint8_t* buf, uint32_t n);
  // Writes the next header copy (update_ + 1) and flushes.
  Status WriteHeader(uint64_t tail_seq, uint32_t tail_pos);
  Status Fail(Status s);  // marks the journal failed, returns s

  // Replay helpers (journal_replay.cc). ReadTxn returns false when the scan stops.
  Result<bool> ReadTxn(uint32_t pos, uint64_t seq, uint32_t budget, TxnImage* txn);
  Status ApplyTxn(const TxnImage& txn);

  BlockDevice* const dev_;
  const Geometry g_;
  const Uuid uuid_;
  const uint32_t slot_;
  const uint64_t generation_;
  const uint64_t region_;     // first block of the journal region
  const uint32_t capacity_;   // log blocks

  uint64_t update_ = 0;       // `update` of the newest header on disk
  uint64_t tail_seq_ = 1;     // oldest sequence not checkpointed
  uint32_t tail_pos_ = 0;
  uint64_t next_seq_ = 1;     // sequence the next Commit gets
  uint32_t head_pos_ = 0;     // log index the next Commit starts at
  uint32_t used_ = 0;         // log blocks held by txns_
  std::deque<Txn> txns_;
  bool replayed_ = false;
  bool failed_ = false;
  StageBuffer stage_;  // Commit's body and Replay's home writes
};

}  // namespace agorafs
