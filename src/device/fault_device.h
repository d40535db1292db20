// FaultDevice: wraps another BlockDevice and makes chosen operations fail, for tests.
//
// Contract
// - Every operation is forwarded to the wrapped device unless a rule makes it fail;
//   an injected failure returns kIOError whose message starts with "injected fault"
//   and does not touch the wrapped device at all (nothing is written).
// - Rules, all changeable at run time and combinable:
//   * FailNth(kind, n): the n-th operation of `kind` from now (n >= 1; n = 1 is the
//     next one) fails, once. Several may be pending.
//   * FailRange(offset, len, reads, writes): every read and/or write overlapping
//     [offset, offset+len) fails until ClearRanges().
//   * GoneAfter(kind, n): n more operations of `kind` are forwarded, then the device
//     is gone: the next operation of `kind` and every later operation of any kind
//     fail. SetGone(true) makes it gone at once. Reset() clears every rule.
// - Counters count every attempted operation by kind (failed ones included) since
//   construction; injected() counts the failures this device produced.
// - Ownership: the wrapped device is borrowed (raw pointer constructor; it must
//   outlive this object) or shared (shared_ptr constructor).
// - Thread-safety: every method may be called concurrently. The rule check is atomic
//   with respect to other rule changes; the forwarded I/O runs outside the lock.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device/block_device.h"

namespace agorafs {

enum class IoKind : uint8_t { kRead = 0, kWrite = 1, kFlush = 2 };
const char* IoKindName(IoKind k);

class FaultDevice final : public BlockDevice {
 public:
  explicit FaultDevice(BlockDevice* base);
  explicit FaultDevice(std::shared_ptr<BlockDevice> base);

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status Flush() override;
  uint64_t Size() const override;
  std::string Name() const override;

  void FailNth(IoKind kind, uint64_t n);
  void FailRange(uint64_t offset, uint64_t len, bool reads, bool writes);
  void ClearRanges();
  void GoneAfter(IoKind kind, uint64_t n);
  void SetGone(bool gone);
  bool gone() const;
  void Reset();  // clears FailNth, FailRange, GoneAfter and gone

  uint64_t count(IoKind kind) const;
  uint64_t reads() const { return count(IoKind::kRead); }
  uint64_t writes() const { return count(IoKind::kWrite); }
  uint64_t flushes() const { return count(IoKind::kFlush); }
  uint64_t injected() const;

 private:
  struct Range {
    uint64_t offset, len;
    bool reads, writes;
  };
  // Counts the operation and decides whether it fails; OK means forward it.
  Status Check(IoKind kind, uint64_t offset, size_t len);

  std::shared_ptr<BlockDevice> owned_;
  BlockDevice* const base_;
  mutable std::mutex mu_;
  uint64_t count_[3] = {0, 0, 0};
  std::vector<uint64_t> fail_at_[3];  // absolute op numbers (1-based) that fail
  uint64_t gone_at_[3] = {0, 0, 0};   // absolute op number that removes the device; 0 = none
  std::vector<Range> ranges_;
  bool gone_ = false;
  uint64_t injected_ = 0;
};

}  // namespace agorafs
