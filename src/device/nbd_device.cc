// NbdDevice: BlockDevice over an NBD export (see nbd_device.h for the contract).
//
// Each request runs on one pooled libnbd handle as an aio command followed by
// nbd_poll until it completes; that is what nbd_pread/nbd_pwrite/nbd_flush do
// internally, written out so that a per-request timeout is possible.
#include "device/nbd_device.h"

#include <libnbd.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace agorafs {
namespace {

constexpr uint64_t kMaxRequest = 32u << 20;

struct NbdError {
  std::string msg;
  int err = 0;
};

NbdError LastError() {
  const char* m = nbd_get_error();
  int e = nbd_get_errno();
  return {m && *m ? m : (e ? std::strerror(e) : "unknown libnbd error"), e};
}

class NbdDevice final : public BlockDevice {
 public:
  struct Slot {
    std::mutex mu;
    nbd_handle* h = nullptr;
  };

  NbdDevice(std::string uri, std::vector<nbd_handle*> handles, uint64_t size, bool read_only,
            bool use_fua, uint64_t max_request, uint32_t timeout_ms)
      : uri_(std::move(uri)),
        slots_(handles.size()),
        size_(size),
        read_only_(read_only),
        use_fua_(use_fua),
        max_request_(max_request),
        timeout_ms_(timeout_ms) {
    for (size_t i = 0; i < handles.size(); i++) slots_[i].h = handles[i];
  }

  ~NbdDevice() override {
    for (auto& s : slots_) CloseHandle(s.h, !failed_.load());
  }
  NbdDevice(const NbdDevice&) = delete;
  NbdDevice& operator=(const NbdDevice&) = delete;

  Status Read(uint64_t offset, void* buf, size_t len) override {
    AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, size_));
    auto* p = static_cast<uint8_t*>(buf);
    for (size_t done = 0; done < len;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, max_request_));
      uint64_t off = offset + done;
      AGFS_RETURN_IF_ERROR(Run("read", off, n, [&](nbd_handle* h) {
        return nbd_aio_pread(h, p + done, n, off, nbd_completion_callback{}, 0);
      }));
      done += n;
    }
    return Status::Ok();
  }

  Status Write(uint64_t offset, const void* buf, size_t len) override {
    AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, size_));
    if (read_only_) return Err(Code::kReadOnly, uri_ + ": device opened read-only");
    const auto* p = static_cast<const uint8_t*>(buf);
    const uint32_t flags = use_fua_ ? LIBNBD_CMD_FLAG_FUA : 0;
    for (size_t done = 0; done < len;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, max_request_));
      uint64_t off = offset + done;
      AGFS_RETURN_IF_ERROR(Run("write", off, n, [&](nbd_handle* h) {
        return nbd_aio_pwrite(h, p + done, n, off, nbd_completion_callback{}, flags);
      }));
      done += n;
    }
    return Status::Ok();
  }

  Status Flush() override {
    if (read_only_) return Status::Ok();
    if (use_fua_) {  // every write was already durable when it returned
      return failed_.load() ? Lost("flush", 0, 0) : Status::Ok();
    }
    // One connection suffices: with several, the server promised multi-conn.
    return Run("flush", 0, 0,
               [](nbd_handle* h) { return nbd_aio_flush(h, nbd_completion_callback{}, 0); });
  }

  uint64_t Size() const override { return size_; }
  std::string Name() const override { return uri_; }

  // Disconnects politely when the connection is healthy (bounded wait), else abruptly.
  static void CloseHandle(nbd_handle* h, bool polite) {
    if (!h) return;
    if (polite && nbd_aio_disconnect(h, 0) == 0) {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (!nbd_aio_is_closed(h) && !nbd_aio_is_dead(h) &&
             std::chrono::steady_clock::now() < deadline) {
        if (nbd_poll(h, 100) < 0) break;
      }
    }
    nbd_close(h);
  }

 private:
  // Takes an idle handle, starting at a round-robin position, or queues on that one.
  std::unique_lock<std::mutex> Acquire(Slot** out) {
    const size_t n = slots_.size();
    const size_t start = rr_.fetch_add(1, std::memory_order_relaxed) % n;
    for (size_t i = 0; i < n; i++) {
      Slot& s = slots_[(start + i) % n];
      std::unique_lock<std::mutex> lk(s.mu, std::try_to_lock);
      if (lk.owns_lock()) {
        *out = &s;
        return lk;
      }
    }
    *out = &slots_[start];
    return std::unique_lock<std::mutex>(slots_[start].mu);
  }

  template <typename Submit>
  Status Run(const char* op, uint64_t off, size_t len, Submit submit) {
    if (failed_.load()) return Lost(op, off, len);
    Slot* s = nullptr;
    auto lk = Acquire(&s);
    if (failed_.load() || s->h == nullptr) return Lost(op, off, len);
    nbd_handle* h = s->h;

    int64_t cookie = submit(h);
    if (cookie == -1) return CommandFailed(s, op, off, len, LastError());
    const bool timed = timeout_ms_ > 0;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms_);
    for (;;) {
      int r = nbd_aio_command_completed(h, static_cast<uint64_t>(cookie));
      if (r == 1) return Status::Ok();
      if (r == -1) return CommandFailed(s, op, off, len, LastError());
      int wait = -1;
      if (timed) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                        deadline - std::chrono::steady_clock::now())
                        .count();
        if (left <= 0) {
          // Closing the handle drops the in-flight command, so libnbd will not touch
          // the caller's buffer after we return.
          Fail(s, "request timed out");
          return IoErr(op, off, len,
                       "no reply within " + std::to_string(timeout_ms_) +
                           " ms; connection closed, device failed");
        }
        wait = static_cast<int>(std::min<long long>(left, 1000));
      }
      if (nbd_poll(h, wait) == -1) {
        NbdError e = LastError();
        // The command may still have completed (or failed) while polling.
        r = nbd_aio_command_completed(h, static_cast<uint64_t>(cookie));
        if (r == 1) return Status::Ok();
        if (r == -1) e = LastError();
        return CommandFailed(s, op, off, len, e);
      }
    }
  }

  // A failed command: a server error leaves the connection usable; a dead connection
  // fails the whole device.
  Status CommandFailed(Slot* s, const char* op, uint64_t off, size_t len, const NbdError& e) {
    if (nbd_aio_is_dead(s->h) || nbd_aio_is_closed(s->h)) {
      Fail(s, "connection lost (" + e.msg + ")");
      return IoErr(op, off, len, "connection lost (" + e.msg + "); device failed");
    }
    Code c = e.err == ENOSPC ? Code::kNoSpace : Code::kIOError;
    return Err(c, std::string("nbd ") + op + " " + uri_ + DescribeRange(off, len) + ": " + e.msg);
  }

  void Fail(Slot* s, const std::string& why) {
    if (!failed_.exchange(true)) {
      spdlog::error("nbd {}: {}; device failed, every later I/O returns an error", uri_, why);
    }
    CloseHandle(s->h, false);
    s->h = nullptr;
  }

  Status Lost(const char* op, uint64_t off, size_t len) const {
    return IoErr(op, off, len, "connection to the server was lost earlier; device failed");
  }

  static std::string DescribeRange(uint64_t off, size_t len) {
    if (len == 0) return "";
    return " at offset " + std::to_string(off) + " (" + std::to_string(len) + " bytes)";
  }

  Status IoErr(const char* op, uint64_t off, size_t len, const std::string& why) const {
    return Err(Code::kIOError,
               std::string("nbd ") + op + " " + uri_ + DescribeRange(off, len) + ": " + why);
  }

  const std::string uri_;
  std::vector<Slot> slots_;
  const uint64_t size_;
  const bool read_only_;
  const bool use_fua_;
  const uint64_t max_request_;
  const uint32_t timeout_ms_;
  std::atomic<size_t> rr_{0};
  std::atomic<bool> failed_{false};
};

Status OpenError(const std::string& uri, const std::string& what, const NbdError& e) {
  std::string msg = "nbd " + what + " " + uri + ": " + e.msg;
  switch (e.err) {
    case ENOENT: return Err(Code::kNotFound, msg);
    case EACCES:
    case EPERM: return Err(Code::kPermission, msg);
    case EINVAL: return Err(Code::kInvalid, msg);
    default: return Err(Code::kIOError, msg);
  }
}

Result<nbd_handle*> Connect(const std::string& uri, size_t index) {
  nbd_handle* h = nbd_create();
  if (!h) return OpenError(uri, "create handle for", LastError());
  std::string name = "agorafs-nbd-" + std::to_string(index);
  if (nbd_set_handle_name(h, name.c_str()) == -1 || nbd_connect_uri(h, uri.c_str()) == -1) {
    NbdError e = LastError();
    nbd_close(h);
    return OpenError(uri, "connect to", e);
  }
  return h;
}

}  // namespace

bool IsNbdUri(const std::string& spec) {
  for (const char* p : {"nbd://", "nbds://", "nbd+unix://", "nbds+unix://"}) {
    if (spec.rfind(p, 0) == 0) return true;
  }
  return false;
}

Result<std::unique_ptr<BlockDevice>> OpenNbdDevice(const std::string& uri,
                                                   const OpenOptions& opts,
                                                   const NbdOptions& nopts) {
  if (!IsNbdUri(uri)) return Err(Code::kInvalid, "not an NBD URI: '" + uri + "'");
  if (nopts.connections < 1 || nopts.connections > 64) {
    return Err(Code::kInvalid, uri + ": NBD connections must be 1..64");
  }
  if (opts.read_only && opts.create) {
    return Err(Code::kInvalid, uri + ": cannot create a device opened read-only");
  }
  std::vector<nbd_handle*> handles;
  auto close_all = [&handles] {
    for (nbd_handle* h : handles) NbdDevice::CloseHandle(h, true);
    handles.clear();
  };

  auto first = Connect(uri, 0);
  if (!first.ok()) return first.status();
  nbd_handle* h = *first;
  handles.push_back(h);

  int64_t size = nbd_get_size(h);
  if (size < 0) {
    NbdError e = LastError();
    close_all();
    return OpenError(uri, "get size of", e);
  }
  const bool server_ro = nbd_is_read_only(h) == 1;
  const bool can_flush = nbd_can_flush(h) == 1;
  const bool can_fua = nbd_can_fua(h) == 1;
  const bool multi_conn = nbd_can_multi_conn(h) == 1;
  int64_t min_block = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
  int64_t max_block = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);

  if (!opts.read_only && server_ro) {
    close_all();
    return Err(Code::kReadOnly, uri + ": the NBD export is read-only");
  }
  if (!opts.read_only && !can_flush && !can_fua) {
    close_all();
    return Err(Code::kNotSupported,
               uri + ": the NBD server supports neither flush nor FUA, so writes could "
                     "never be made durable; refusing to open it writable");
  }
  if (min_block > static_cast<int64_t>(kSectorSize)) {
    close_all();
    return Err(Code::kNotSupported, uri + ": the NBD server's minimum block size " +
                                        std::to_string(min_block) + " exceeds " +
                                        std::to_string(kSectorSize));
  }
  if (opts.create && opts.create_size > static_cast<uint64_t>(size)) {
    close_all();
    return Err(Code::kInvalid, uri + ": the NBD export is " + std::to_string(size) +
                                   " bytes; it cannot be grown to " +
                                   std::to_string(opts.create_size));
  }
  uint64_t max_request = kMaxRequest;
  if (max_block > 0) {
    max_request = std::min<uint64_t>(max_request, static_cast<uint64_t>(max_block) /
                                                      kSectorSize * kSectorSize);
  }
  if (max_request < kSectorSize) max_request = kSectorSize;

  unsigned want = nopts.connections;
  if (want > 1 && !multi_conn) {
    spdlog::warn("nbd {}: server does not advertise multi-conn; using one connection", uri);
    want = 1;
  }
  const bool use_fua = !opts.read_only && !can_flush;
  if (use_fua) {
    spdlog::info("nbd {}: server has no flush; every write is sent with FUA", uri);
  }
  for (unsigned i = 1; i < want; i++) {
    auto more = Connect(uri, i);
    if (!more.ok()) {
      close_all();
      return more.status();
    }
    handles.push_back(*more);
    if (nbd_get_size(*more) != size) {
      close_all();
      return Err(Code::kIOError, uri + ": connections disagree about the export size");
    }
  }
  return std::unique_ptr<BlockDevice>(std::make_unique<NbdDevice>(
      uri, std::move(handles), static_cast<uint64_t>(size), opts.read_only, use_fua,
      max_request, nopts.timeout_ms));
}

Result<std::unique_ptr<BlockDevice>> OpenDevice(const std::string& spec,
                                                const OpenOptions& opts) {
  if (IsNbdUri(spec)) return OpenNbdDevice(spec, opts);
  return OpenFileDevice(spec, opts);
}

}  // namespace agorafs
