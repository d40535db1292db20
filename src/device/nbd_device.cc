// NbdDevice: BlockDevice over an NBD export (see nbd_device.h for the contract).
//
// Each request runs on one pooled libnbd handle as aio commands followed by nbd_poll
// until they complete; that is what nbd_pread/nbd_pwrite/nbd_flush do internally,
// written out so that a per-request timeout is possible and so that a WriteBatch
// keeps up to kMaxInFlight writes in flight on its handle.
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
constexpr size_t kMaxInFlight = 64;  // commands one WriteBatch keeps in flight

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

  // Split at max_request_ like a write; the pieces go out together on one handle.
  Status Read(uint64_t offset, void* buf, size_t len) override {
    AGFS_RETURN_IF_ERROR(CheckIo(offset, buf, len, size_));
    auto* p = static_cast<uint8_t*>(buf);
    const size_t count = static_cast<size_t>((len + max_request_ - 1) / max_request_);
    auto range = [&](size_t i) {
      const uint64_t done = uint64_t(i) * max_request_;
      return std::make_pair(offset + done,
                            static_cast<size_t>(std::min<uint64_t>(len - done, max_request_)));
    };
    return RunCommands(
        "read", count,
        [&](size_t i, nbd_handle* h) {
          auto [off, n] = range(i);
          return nbd_aio_pread(h, p + (off - offset), n, off, nbd_completion_callback{}, 0);
        },
        range);
  }

  Status Write(uint64_t offset, const void* buf, size_t len) override {
    WriteOp op{offset, buf, len};
    return WriteBatch(&op, 1);
  }

  // Every op is split at max_request_ and the pieces go out together on one handle.
  Status WriteBatch(const WriteOp* ops, size_t n) override {
    AGFS_RETURN_IF_ERROR(CheckBatch(ops, n, size_));
    if (read_only_) return Err(Code::kReadOnly, uri_ + ": device opened read-only");
    std::vector<WriteOp> pieces;
    for (size_t i = 0; i < n; i++) {
      const auto* p = static_cast<const uint8_t*>(ops[i].buf);
      for (size_t done = 0; done < ops[i].len;) {
        size_t len = static_cast<size_t>(std::min<uint64_t>(ops[i].len - done, max_request_));
        pieces.push_back({ops[i].offset + done, p + done, len});
        done += len;
      }
    }
    const uint32_t flags = use_fua_ ? LIBNBD_CMD_FLAG_FUA : 0;
    return RunCommands(
        "write", pieces.size(),
        [&](size_t i, nbd_handle* h) {
          return nbd_aio_pwrite(h, pieces[i].buf, pieces[i].len, pieces[i].offset,
                                nbd_completion_callback{}, flags);
        },
        [&](size_t i) { return std::make_pair(pieces[i].offset, pieces[i].len); });
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
    return RunCommands(
        op, 1, [&](size_t, nbd_handle* h) { return submit(h); },
        [&](size_t) { return std::make_pair(off, len); });
  }

  // Runs `count` commands on one handle, at most kMaxInFlight at a time: submit(i, h)
  // starts command i and returns its cookie (-1 on failure), range(i) is its
  // (offset, length) for messages. Returns once none is in flight, with the first
  // failure; after a server error the rest already in flight finish but no more
  // are started. The timeout counts from the last completion.
  template <typename Submit, typename Range>
  Status RunCommands(const char* op, size_t count, Submit submit, Range range) {
    if (count == 0) return Status::Ok();
    if (failed_.load()) return Lost(op, range(0).first, range(0).second);
    Slot* s = nullptr;
    auto lk = Acquire(&s);
    if (failed_.load() || s->h == nullptr) return Lost(op, range(0).first, range(0).second);
    nbd_handle* h = s->h;

    std::vector<std::pair<uint64_t, size_t>> inflight;  // (cookie, command)
    Status first = Status::Ok();
    auto failed = [&](size_t i, const NbdError& e) {
      Status st = CommandFailed(s, op, range(i).first, range(i).second, e);
      if (first.ok()) first = st;
    };
    // Retires every finished command; true when one finished.
    auto reap = [&] {
      bool progress = false;
      for (size_t k = 0; k < inflight.size() && s->h != nullptr;) {
        int r = nbd_aio_command_completed(h, inflight[k].first);
        if (r == 0) {
          k++;
          continue;
        }
        if (r == -1) failed(inflight[k].second, LastError());
        inflight[k] = inflight.back();
        inflight.pop_back();
        progress = true;
      }
      return progress;
    };
    size_t next = 0;
    const bool timed = timeout_ms_ > 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms_);
    for (;;) {
      while (first.ok() && next < count && inflight.size() < kMaxInFlight) {
        int64_t cookie = submit(next, h);
        if (cookie == -1) {
          failed(next, LastError());
        } else {
          inflight.emplace_back(static_cast<uint64_t>(cookie), next);
        }
        next++;
      }
      // A dead connection was closed (Fail): nothing is in flight any more.
      if (s->h == nullptr || inflight.empty()) return first;
      const bool progress = reap();
      if (s->h == nullptr) return first;
      if (progress) {
        deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms_);
        continue;
      }
      int wait = -1;
      if (timed) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                        deadline - std::chrono::steady_clock::now())
                        .count();
        if (left <= 0) {
          // Closing the handle drops the commands in flight, so libnbd will not touch
          // the caller's buffers after we return.
          Fail(s, "request timed out");
          const auto [off, len] = range(inflight.front().second);
          return IoErr(op, off, len,
                       "no reply within " + std::to_string(timeout_ms_) +
                           " ms; connection closed, device failed");
        }
        wait = static_cast<int>(std::min<long long>(left, 1000));
      }
      if (nbd_poll(h, wait) == -1) {
        // Commands may still have completed (or failed) while polling; only a poll
        // failure with commands still in flight is fatal, since they cannot be
        // waited for.
        NbdError e = LastError();
        reap();
        if (s->h == nullptr) return first;
        if (inflight.empty()) continue;
        const size_t i = inflight.front().second;
        if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
          failed(i, e);  // fails the device
          return first;
        }
        Fail(s, "poll failed (" + e.msg + ")");
        if (first.ok()) first = IoErr(op, range(i).first, range(i).second,
                                      "poll failed (" + e.msg + "); device failed");
        return first;
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
