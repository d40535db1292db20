// The one place where Status codes become errno values (FUSE boundary and CLI).
#pragma once

#include <cerrno>

#include "util/status.h"

namespace agorafs {

inline int ToErrno(const Status& s) {
  switch (s.code()) {
    case Code::kOk: return 0;
    case Code::kNotFound: return ENOENT;
    case Code::kExists: return EEXIST;
    case Code::kNotDir: return ENOTDIR;
    case Code::kIsDir: return EISDIR;
    case Code::kNotEmpty: return ENOTEMPTY;
    case Code::kNoSpace: return ENOSPC;
    case Code::kNameTooLong: return ENAMETOOLONG;
    case Code::kInvalid: return EINVAL;
    case Code::kPermission: return EPERM;
    case Code::kAccess: return EACCES;
    case Code::kCorruption: return EIO;
    case Code::kIOError: return EIO;
    case Code::kBusy: return EBUSY;
    case Code::kTimedOut: return ETIMEDOUT;
    case Code::kFenced: return EIO;
    case Code::kNotSupported: return EOPNOTSUPP;
    case Code::kTooBig: return EFBIG;
    case Code::kRange: return ERANGE;
    case Code::kNoData: return ENODATA;
    case Code::kTooManyLinks: return EMLINK;
    case Code::kCrossDevice: return EXDEV;
    case Code::kLoop: return ELOOP;
    case Code::kReadOnly: return EROFS;
    case Code::kNoMemory: return ENOMEM;
    case Code::kAgain: return EAGAIN;
    case Code::kBadHandle: return EBADF;
    case Code::kNoAddress: return ENXIO;
    case Code::kStale: return EIO;
    case Code::kAborted: return EIO;
    case Code::kStaleInode: return ESTALE;
    case Code::kNoLocks: return ENOLCK;
    case Code::kInterrupted: return EINTR;
    case Code::kDeadlock: return EDEADLK;
  }
  return EIO;
}

}  // namespace agorafs
