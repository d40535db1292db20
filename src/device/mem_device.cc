#include "device/mem_device.h"

#include <random>

namespace agorafs {

MemDevice::MemDevice(uint64_t size, std::string name)
    : name_(std::move(name)), current_(size, 0), durable_(size, 0) {}

MemDevice::MemDevice(std::vector<uint8_t> image, std::string name)
    : name_(std::move(name)), current_(std::move(image)), durable_(current_) {}

Status MemDevice::Read(uint64_t offset, void* buf, size_t len) {
  std::lock_guard<std::mutex> l(mu_);
  AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, current_.size()));
  reads_++;
  std::memcpy(buf, current_.data() + offset, len);
  return Status::Ok();
}

Status MemDevice::Write(uint64_t offset, const void* buf, size_t len) {
  std::lock_guard<std::mutex> l(mu_);
  AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, current_.size()));
  writes_++;
  std::memcpy(current_.data() + offset, buf, len);
  for (uint64_t s = offset / kSectorSize; s < (offset + len) / kSectorSize; s++) {
    dirty_.insert(s);
  }
  return Status::Ok();
}

Status MemDevice::Flush() {
  std::lock_guard<std::mutex> l(mu_);
  flushes_++;
  for (uint64_t s : dirty_) {
    std::memcpy(durable_.data() + s * kSectorSize, current_.data() + s * kSectorSize,
                kSectorSize);
  }
  dirty_.clear();
  return Status::Ok();
}

uint64_t MemDevice::Size() const {
  std::lock_guard<std::mutex> l(mu_);
  return current_.size();
}

std::string MemDevice::Name() const { return name_; }

void MemDevice::Crash() {
  std::lock_guard<std::mutex> l(mu_);
  for (uint64_t s : dirty_) {
    std::memcpy(current_.data() + s * kSectorSize, durable_.data() + s * kSectorSize,
                kSectorSize);
  }
  dirty_.clear();
}

void MemDevice::CrashTorn(uint64_t seed) {
  std::lock_guard<std::mutex> l(mu_);
  std::mt19937_64 rng(seed);
  for (uint64_t s : dirty_) {
    uint8_t* cur = current_.data() + s * kSectorSize;
    uint8_t* dur = durable_.data() + s * kSectorSize;
    if (rng() & 1) {
      std::memcpy(dur, cur, kSectorSize);  // this sector reached the media
    } else {
      std::memcpy(cur, dur, kSectorSize);  // lost with the cache
    }
  }
  dirty_.clear();
}

std::vector<uint8_t> MemDevice::DurableImage() const {
  std::lock_guard<std::mutex> l(mu_);
  return durable_;
}

uint64_t MemDevice::unflushed_bytes() const {
  std::lock_guard<std::mutex> l(mu_);
  return dirty_.size() * kSectorSize;
}

uint64_t MemDevice::reads() const {
  std::lock_guard<std::mutex> l(mu_);
  return reads_;
}

uint64_t MemDevice::writes() const {
  std::lock_guard<std::mutex> l(mu_);
  return writes_;
}

uint64_t MemDevice::flushes() const {
  std::lock_guard<std::mutex> l(mu_);
  return flushes_;
}

}  // namespace agorafs
