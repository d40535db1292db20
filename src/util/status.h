// Status and Result<T>: how every agorafs module reports success or failure.
//
// Contract
// - No exceptions cross a module edge. A function that can fail returns Status
//   (no value) or Result<T> (a value or a Status). Both are [[nodiscard]].
// - A Status is OK or carries a Code plus a human-readable message. Codes name the
//   filesystem-level meaning (NotFound, Exists, NoSpace, Corruption, IOError, ...).
//   They are mapped to errno in exactly one place: src/fuse/errno_map.h.
// - Thread-safety: values; copy freely.
#pragma once

#include <cassert>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace agorafs {

enum class Code : int {
  kOk = 0,
  kNotFound,      // ENOENT / ENODATA for xattrs (see errno_map)
  kExists,        // EEXIST
  kNotDir,        // ENOTDIR
  kIsDir,         // EISDIR
  kNotEmpty,      // ENOTEMPTY
  kNoSpace,       // ENOSPC
  kNameTooLong,   // ENAMETOOLONG
  kInvalid,       // EINVAL
  kPermission,    // EPERM  (operation not permitted for this caller)
  kAccess,        // EACCES (permission bits deny)
  kCorruption,    // EIO, logged: on-disk data failed validation
  kIOError,       // EIO: the device failed
  kBusy,          // EBUSY
  kTimedOut,      // ETIMEDOUT
  kFenced,        // EIO: this node lost its right to write
  kNotSupported,  // EOPNOTSUPP
  kTooBig,        // EFBIG / E2BIG (file or xattr too large)
  kRange,         // ERANGE (buffer too small)
  kNoData,        // ENODATA (xattr missing)
  kTooManyLinks,  // EMLINK
  kCrossDevice,   // EXDEV
  kLoop,          // ELOOP
  kReadOnly,      // EROFS
  kNoMemory,      // ENOMEM
  kAgain,         // EAGAIN
  kBadHandle,     // EBADF
  kNoAddress,     // ENXIO (lseek past the end for SEEK_DATA/SEEK_HOLE)
  kStale,         // EIO: an agreement instance this node worked on is already decided
  kAborted,       // EIO: the service is stopping
  kStaleInode,    // ESTALE: the inode the caller names was deleted (on another node)
  kNoLocks,       // ENOLCK: an application lock table is full
  kInterrupted,   // EINTR: a wait was interrupted (signal, unmount)
  kDeadlock,      // EDEADLK: waiting for a lock would close a cycle of waiters
};

const char* CodeName(Code c);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(Code code, std::string msg) : code_(code), msg_(std::move(msg)) {}

  static Status Ok() { return Status(); }
  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return msg_; }
  // "Corruption: inode 1234: bad checksum"
  std::string ToString() const;

  bool Is(Code c) const { return code_ == c; }

 private:
  Code code_ = Code::kOk;
  std::string msg_;
};

inline Status Err(Code c, std::string msg) { return Status(c, std::move(msg)); }

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}          // NOLINT: implicit on purpose
  Result(Status status) : v_(std::move(status)) {    // NOLINT: implicit on purpose
    assert(!std::get<Status>(v_).ok() && "Result built from an OK Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { assert(ok()); return std::get<T>(v_); }
  const T& value() const& { assert(ok()); return std::get<T>(v_); }
  T&& value() && { assert(ok()); return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace agorafs

// Propagate a failing Status from an expression returning Status.
#define AGFS_RETURN_IF_ERROR(expr)              \
  do {                                          \
    ::agorafs::Status _agfs_st = (expr);        \
    if (!_agfs_st.ok()) return _agfs_st;        \
  } while (0)

#define AGFS_CONCAT_INNER(a, b) a##b
#define AGFS_CONCAT(a, b) AGFS_CONCAT_INNER(a, b)
// auto x = ...; from a Result<T>, or return its Status.
#define AGFS_ASSIGN_OR_RETURN(lhs, expr) \
  AGFS_ASSIGN_OR_RETURN_IMPL(AGFS_CONCAT(_agfs_res_, __LINE__), lhs, expr)
#define AGFS_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()
