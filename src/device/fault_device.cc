#include "device/fault_device.h"

#include <algorithm>

namespace agorafs {

const char* IoKindName(IoKind k) {
  switch (k) {
    case IoKind::kRead: return "read";
    case IoKind::kWrite: return "write";
    case IoKind::kFlush: return "flush";
  }
  return "?";
}

FaultDevice::FaultDevice(BlockDevice* base) : base_(base) {}

FaultDevice::FaultDevice(std::shared_ptr<BlockDevice> base)
    : owned_(std::move(base)), base_(owned_.get()) {}

Status FaultDevice::Check(IoKind kind, uint64_t offset, size_t len) {
  std::lock_guard<std::mutex> l(mu_);
  const int k = static_cast<int>(kind);
  const uint64_t n = ++count_[k];
  auto fail = [&](const std::string& why) {
    injected_++;
    std::string what = std::string("injected fault: ") + IoKindName(kind) + " #" +
                       std::to_string(n);
    if (kind != IoKind::kFlush) {
      what += " at offset " + std::to_string(offset) + " (" + std::to_string(len) + " bytes)";
    }
    return Err(Code::kIOError, what + " on " + base_->Name() + ": " + why);
  };
  if (gone_at_[k] != 0 && n >= gone_at_[k]) gone_ = true;
  if (gone_) return fail("device gone");
  auto it = std::find(fail_at_[k].begin(), fail_at_[k].end(), n);
  if (it != fail_at_[k].end()) {
    fail_at_[k].erase(it);
    return fail("chosen operation");
  }
  if (kind != IoKind::kFlush) {
    for (const Range& r : ranges_) {
      bool applies = kind == IoKind::kRead ? r.reads : r.writes;
      if (applies && offset < r.offset + r.len && r.offset < offset + len) {
        return fail("range [" + std::to_string(r.offset) + ", +" + std::to_string(r.len) +
                    ") fails");
      }
    }
  }
  return Status::Ok();
}

Status FaultDevice::Read(uint64_t offset, void* buf, size_t len) {
  AGFS_RETURN_IF_ERROR(Check(IoKind::kRead, offset, len));
  return base_->Read(offset, buf, len);
}

Status FaultDevice::Write(uint64_t offset, const void* buf, size_t len) {
  AGFS_RETURN_IF_ERROR(Check(IoKind::kWrite, offset, len));
  return base_->Write(offset, buf, len);
}

Status FaultDevice::Flush() {
  AGFS_RETURN_IF_ERROR(Check(IoKind::kFlush, 0, 0));
  return base_->Flush();
}

uint64_t FaultDevice::Size() const { return base_->Size(); }

std::string FaultDevice::Name() const { return "fault(" + base_->Name() + ")"; }

void FaultDevice::FailNth(IoKind kind, uint64_t n) {
  if (n == 0) return;
  std::lock_guard<std::mutex> l(mu_);
  const int k = static_cast<int>(kind);
  fail_at_[k].push_back(count_[k] + n);
}

void FaultDevice::FailRange(uint64_t offset, uint64_t len, bool reads, bool writes) {
  std::lock_guard<std::mutex> l(mu_);
  ranges_.push_back(Range{offset, len, reads, writes});
}

void FaultDevice::ClearRanges() {
  std::lock_guard<std::mutex> l(mu_);
  ranges_.clear();
}

void FaultDevice::GoneAfter(IoKind kind, uint64_t n) {
  std::lock_guard<std::mutex> l(mu_);
  const int k = static_cast<int>(kind);
  gone_at_[k] = count_[k] + n + 1;
}

void FaultDevice::SetGone(bool gone) {
  std::lock_guard<std::mutex> l(mu_);
  gone_ = gone;
  if (!gone) std::fill(std::begin(gone_at_), std::end(gone_at_), 0);
}

bool FaultDevice::gone() const {
  std::lock_guard<std::mutex> l(mu_);
  return gone_;
}

void FaultDevice::Reset() {
  std::lock_guard<std::mutex> l(mu_);
  for (auto& v : fail_at_) v.clear();
  std::fill(std::begin(gone_at_), std::end(gone_at_), 0);
  ranges_.clear();
  gone_ = false;
}

uint64_t FaultDevice::count(IoKind kind) const {
  std::lock_guard<std::mutex> l(mu_);
  return count_[static_cast<int>(kind)];
}

uint64_t FaultDevice::injected() const {
  std::lock_guard<std::mutex> l(mu_);
  return injected_;
}

}  // namespace agorafs
