// MemDevice: a BlockDevice held in RAM, for tests. It models a disk with a volatile
// write cache.
//
// Contract
// - Same I/O rules as every BlockDevice (block_device.h): sector-aligned offsets and
//   lengths, kIoAlign-aligned buffers, kInvalid otherwise or beyond Size().
// - A Write is visible to every later Read at once, but it is durable only once a
//   later Flush() returned. Crash() models a power cut: every sector written since
//   the last Flush reverts to its durable content. CrashTorn(seed) models a cut during
//   which the cache drained partially: each unflushed 512-byte sector independently
//   either survives or reverts (chosen by a PRNG seeded with `seed`).
// - DurableImage() copies out what would survive a Crash(). The image constructor
//   builds a device whose current and durable content are both `image`.
// - Read/Write/Flush never fail except for the I/O rules above.
// - Memory follows what was written, not Size(): both copies are kept in 64 KiB
//   chunks allocated at their first write (a chunk never written reads as zeros), so
//   a large, mostly empty test device costs neither RAM nor the time to clear it.
// - Thread-safety: every method may be called concurrently (one mutex).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "device/block_device.h"

namespace agorafs {

class MemDevice final : public BlockDevice {
 public:
  // A zero-filled device of `size` bytes (a multiple of kSectorSize).
  explicit MemDevice(uint64_t size, std::string name = "mem");
  // A device whose durable and current content is `image`.
  explicit MemDevice(std::vector<uint8_t> image, std::string name = "mem");

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status Flush() override;
  uint64_t Size() const override;
  std::string Name() const override;

  // Drops every unflushed write (see above).
  void Crash();
  // Keeps a random subset of unflushed sectors, drops the rest.
  void CrashTorn(uint64_t seed);

  std::vector<uint8_t> DurableImage() const;
  // Bytes currently written but not yet flushed, rounded to sectors.
  uint64_t unflushed_bytes() const;

  uint64_t reads() const;
  uint64_t writes() const;
  uint64_t flushes() const;

 private:
  static constexpr uint64_t kChunk = 64 * 1024;
  // One device copy: chunk i holds bytes [i * kChunk, (i + 1) * kChunk); null: zeros.
  // current_[i] and durable_[i] are allocated together (by the image constructor or at
  // the chunk's first Write), so Flush and Crash copy sectors without allocating.
  using Chunks = std::vector<std::unique_ptr<uint8_t[]>>;
  static void CopyOut(const Chunks& c, uint64_t offset, void* buf, size_t len);
  static void CopyIn(Chunks& c, uint64_t offset, const void* buf, size_t len);
  // Sector `s` of `from` into `to`.
  static void CopySector(const Chunks& from, Chunks& to, uint64_t s);

  mutable std::mutex mu_;
  const std::string name_;
  const uint64_t size_;
  Chunks current_;
  Chunks durable_;
  std::set<uint64_t> dirty_;  // sector indexes written since the last Flush
  uint64_t reads_ = 0;
  uint64_t writes_ = 0;
  uint64_t flushes_ = 0;
};

}  // namespace agorafs
