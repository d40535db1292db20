// RecordingDevice: wraps another BlockDevice and logs, in order, every write (offset
// and bytes) and every flush, so that a test can rebuild afterwards any disk image a
// power cut could have left (see crash_replay.h).
//
// Contract
// - Every operation is forwarded to the wrapped device with the same result; the I/O
//   rules are the wrapped device's (block_device.h). Reads are not logged.
// - A write is logged only when the wrapped device accepted it (OK), a flush only when
//   it returned OK: a failed flush is no barrier, a failed write wrote nothing that
//   the log promises.
// - Order: writes and flushes are forwarded and logged under one mutex, so the log
//   order is the order in which the wrapped device executed them. A write logged
//   before a flush had completed before that flush started, so the flush covers it.
// - barriers() is the number of flushes logged so far. A caller that reads it after
//   an fsync returned knows that everything the fsync made durable lies before
//   barrier number barriers() (barriers count from 1); a caller that reads it before
//   an operation starts knows that every write of that operation lies after barrier
//   number barriers().
// - TakeLog() hands the log out and ends the recording: later operations are still
//   forwarded but no longer logged or counted, so barrier numbers always match the
//   flushes in the one log handed out.
// - Ownership: the wrapped device is borrowed (raw pointer constructor; it must
//   outlive this object) or shared (shared_ptr constructor).
// - Thread-safety: every method may be called concurrently. Writes and flushes are
//   serialised by the log's mutex (held across the forwarded call); reads are not.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device/block_device.h"

namespace agorafs {

struct IoRecord {
  enum class Kind : uint8_t { kWrite = 0, kFlush = 1 };
  Kind kind = Kind::kWrite;
  uint64_t offset = 0;        // kWrite only
  std::vector<uint8_t> data;  // kWrite only: the bytes written
};

class RecordingDevice final : public BlockDevice {
 public:
  explicit RecordingDevice(BlockDevice* base);
  explicit RecordingDevice(std::shared_ptr<BlockDevice> base);

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status Flush() override;
  uint64_t Size() const override;
  std::string Name() const override;

  uint64_t barriers() const;
  // Records logged so far (writes and flushes).
  size_t records() const;
  std::vector<IoRecord> TakeLog();

 private:
  std::shared_ptr<BlockDevice> owned_;
  BlockDevice* const base_;
  mutable std::mutex mu_;
  bool recording_ = true;      // GUARDED_BY(mu_)
  uint64_t barriers_ = 0;      // GUARDED_BY(mu_)
  std::vector<IoRecord> log_;  // GUARDED_BY(mu_)
};

}  // namespace agorafs
