#include "device/mem_device.h"

#include <algorithm>
#include <cstring>
#include <random>

namespace agorafs {

void MemDevice::CopyOut(const Chunks& c, uint64_t offset, void* buf, size_t len) {
  auto* out = static_cast<uint8_t*>(buf);
  while (len > 0) {
    const uint64_t i = offset / kChunk, at = offset % kChunk;
    const size_t n = std::min<uint64_t>(len, kChunk - at);
    if (c[i]) {
      std::memcpy(out, c[i].get() + at, n);
    } else {
      std::memset(out, 0, n);
    }
    out += n;
    offset += n;
    len -= n;
  }
}

void MemDevice::CopyIn(Chunks& c, uint64_t offset, const void* buf, size_t len) {
  const auto* in = static_cast<const uint8_t*>(buf);
  while (len > 0) {
    const uint64_t i = offset / kChunk, at = offset % kChunk;
    const size_t n = std::min<uint64_t>(len, kChunk - at);
    if (!c[i]) c[i].reset(new uint8_t[kChunk]());
    std::memcpy(c[i].get() + at, in, n);
    in += n;
    offset += n;
    len -= n;
  }
}

void MemDevice::CopySector(const Chunks& from, Chunks& to, uint64_t s) {
  const uint64_t i = s * kSectorSize / kChunk, at = s * kSectorSize % kChunk;
  if (!from[i]) return;  // nor `to`'s: a chunk's two copies exist together
  std::memcpy(to[i].get() + at, from[i].get() + at, kSectorSize);
}

MemDevice::MemDevice(uint64_t size, std::string name)
    : name_(std::move(name)),
      size_(size),
      current_((size + kChunk - 1) / kChunk),
      durable_((size + kChunk - 1) / kChunk) {}

MemDevice::MemDevice(std::vector<uint8_t> image, std::string name)
    : MemDevice(image.size(), std::move(name)) {
  for (uint64_t off = 0; off < image.size(); off += kChunk) {
    const size_t n = std::min<uint64_t>(kChunk, image.size() - off);
    const uint8_t* p = image.data() + off;
    if (std::all_of(p, p + n, [](uint8_t b) { return b == 0; })) continue;
    CopyIn(current_, off, p, n);
    CopyIn(durable_, off, p, n);
  }
}

Status MemDevice::Read(uint64_t offset, void* buf, size_t len) {
  std::lock_guard<std::mutex> l(mu_);
  AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, size_));
  reads_++;
  CopyOut(current_, offset, buf, len);
  return Status::Ok();
}

Status MemDevice::Write(uint64_t offset, const void* buf, size_t len) {
  // Chunks written for the first time are allocated for both copies here, outside the
  // mutex (clearing them faults their pages in, which is slow in some VMs and would
  // hold up every other thread's I/O).
  std::vector<uint64_t> missing;
  {
    std::lock_guard<std::mutex> l(mu_);
    AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, size_));
    for (uint64_t i = offset / kChunk; len > 0 && i <= (offset + len - 1) / kChunk; i++) {
      if (!current_[i]) missing.push_back(i);
    }
  }
  std::vector<std::unique_ptr<uint8_t[]>> fresh;
  for (size_t k = 0; k < 2 * missing.size(); k++) fresh.emplace_back(new uint8_t[kChunk]());
  std::lock_guard<std::mutex> l(mu_);
  for (size_t k = 0; k < missing.size(); k++) {
    const uint64_t i = missing[k];
    if (current_[i]) continue;  // another writer got there first
    current_[i] = std::move(fresh[2 * k]);
    durable_[i] = std::move(fresh[2 * k + 1]);
  }
  writes_++;
  CopyIn(current_, offset, buf, len);
  for (uint64_t s = offset / kSectorSize; s < (offset + len) / kSectorSize; s++) {
    dirty_.insert(s);
  }
  return Status::Ok();
}

Status MemDevice::Flush() {
  std::lock_guard<std::mutex> l(mu_);
  flushes_++;
  for (uint64_t s : dirty_) CopySector(current_, durable_, s);
  dirty_.clear();
  return Status::Ok();
}

uint64_t MemDevice::Size() const { return size_; }

std::string MemDevice::Name() const { return name_; }

void MemDevice::Crash() {
  std::lock_guard<std::mutex> l(mu_);
  for (uint64_t s : dirty_) CopySector(durable_, current_, s);
  dirty_.clear();
}

void MemDevice::CrashTorn(uint64_t seed) {
  std::lock_guard<std::mutex> l(mu_);
  std::mt19937_64 rng(seed);
  for (uint64_t s : dirty_) {
    if (rng() & 1) {
      CopySector(current_, durable_, s);  // this sector reached the media
    } else {
      CopySector(durable_, current_, s);  // lost with the cache
    }
  }
  dirty_.clear();
}

std::vector<uint8_t> MemDevice::DurableImage() const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<uint8_t> image(size_);
  CopyOut(durable_, 0, image.data(), image.size());
  return image;
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
