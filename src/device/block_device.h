// BlockDevice: the narrow interface through which agorafs touches storage.
//
// Contract
// - Offsets and lengths passed to Read/Write are multiples of kSectorSize (512)
//   and buffers are aligned to kIoAlign (4096); callers use AlignedBuffer. An
//   unaligned request returns Code::kInvalid without touching the device.
// - Read/Write are positional and synchronous: on OK all bytes were transferred.
//   A short transfer or an OS error is Code::kIOError naming the offset.
// - Write returns when the device has accepted the data; it is durable only after a
//   later Flush() returns OK (or when the device was opened with durable writes).
//   Flush orders nothing by itself: the journal issues write, Flush, write, Flush.
// - Reading beyond Size() is kInvalid.
// - WriteBatch(ops, n) writes several non-overlapping ranges as if each were a Write
//   issued concurrently: in no defined order among themselves. It returns once every
//   one has finished (never with an op still in flight); OK when all were accepted,
//   else the first error, some of the others possibly written. An op that breaks the
//   rules above fails the whole batch with kInvalid before any op is written. The
//   default issues them one after another; FileDevice submits them together through
//   io_uring.
// - Thread-safety: every method may be called from any thread concurrently; writes
//   to overlapping ranges from different threads have no defined order.
// - Implementations: FileDevice (file or block device, O_DIRECT), MemDevice (RAM,
//   tracks unflushed writes), FaultDevice (wraps another, fails chosen I/Os, and can
//   drop everything not yet flushed to simulate a power cut), NbdDevice (an NBD export
//   through libnbd; see nbd_device.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "util/status.h"

namespace agorafs {

inline constexpr size_t kSectorSize = 512;
inline constexpr size_t kIoAlign = 4096;

// One range of a WriteBatch.
struct WriteOp {
  uint64_t offset;
  const void* buf;
  size_t len;
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  virtual Status Read(uint64_t offset, void* buf, size_t len) = 0;
  virtual Status Write(uint64_t offset, const void* buf, size_t len) = 0;
  virtual Status WriteBatch(const WriteOp* ops, size_t n);
  virtual Status Flush() = 0;
  virtual uint64_t Size() const = 0;
  // A short description for messages: the path or URI.
  virtual std::string Name() const = 0;
};

// Checks the alignment rules above; shared by implementations.
inline Status CheckIo(uint64_t offset, const void* buf, size_t len, uint64_t size) {
  if (offset % kSectorSize != 0 || len % kSectorSize != 0 ||
      reinterpret_cast<uintptr_t>(buf) % kIoAlign != 0) {
    return Err(Code::kInvalid, "unaligned I/O at offset " + std::to_string(offset) + " (" +
                                   std::to_string(len) + " bytes)");
  }
  if (offset > size || len > size - offset) {
    return Err(Code::kInvalid, "I/O beyond end of device at offset " +
                                   std::to_string(offset) + " (" + std::to_string(len) +
                                   " bytes, device " + std::to_string(size) + " bytes)");
  }
  return Status::Ok();
}

// CheckIo for every op of a batch.
inline Status CheckBatch(const WriteOp* ops, size_t n, uint64_t size) {
  for (size_t i = 0; i < n; i++) {
    AGFS_RETURN_IF_ERROR(CheckIo(ops[i].offset, ops[i].buf, ops[i].len, size));
  }
  return Status::Ok();
}

inline Status BlockDevice::WriteBatch(const WriteOp* ops, size_t n) {
  AGFS_RETURN_IF_ERROR(CheckBatch(ops, n, Size()));
  for (size_t i = 0; i < n; i++) {
    AGFS_RETURN_IF_ERROR(Write(ops[i].offset, ops[i].buf, ops[i].len));
  }
  return Status::Ok();
}

// Owning, kIoAlign-aligned, zero-initialised byte buffer.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t len) : len_(len) {
    if (len == 0) return;
    size_t alloc = (len + kIoAlign - 1) / kIoAlign * kIoAlign;
    data_ = static_cast<uint8_t*>(std::aligned_alloc(kIoAlign, alloc));
    if (data_) std::memset(data_, 0, alloc);
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(AlignedBuffer&& o) noexcept : data_(o.data_), len_(o.len_) {
    o.data_ = nullptr;
    o.len_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    if (this != &o) {
      std::free(data_);
      data_ = o.data_;
      len_ = o.len_;
      o.data_ = nullptr;
      o.len_ = 0;
    }
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return len_; }
  bool valid() const { return data_ != nullptr || len_ == 0; }

 private:
  uint8_t* data_ = nullptr;
  size_t len_ = 0;
};

struct OpenOptions {
  bool read_only = false;
  bool direct = true;      // O_DIRECT; falls back to buffered only if the FS refuses it
  bool create = false;     // create/extend a regular file to `create_size`
  uint64_t create_size = 0;
};

// Opens a file or block device. Path "-" is not accepted. Errors: kNotFound,
// kPermission, kIOError, kInvalid (size not a multiple of 4096 or under 1 MiB is not
// checked here; mkfs checks sizes).
Result<std::unique_ptr<BlockDevice>> OpenFileDevice(const std::string& path,
                                                    const OpenOptions& opts);

// Opens whatever `spec` names: an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://)
// through OpenNbdDevice with default NbdOptions, anything else through OpenFileDevice.
// Defined in nbd_device.cc.
Result<std::unique_ptr<BlockDevice>> OpenDevice(const std::string& spec,
                                                const OpenOptions& opts);

}  // namespace agorafs
