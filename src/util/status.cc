#include "util/status.h"

namespace agorafs {

const char* CodeName(Code c) {
  switch (c) {
    case Code::kOk: return "OK";
    case Code::kNotFound: return "NotFound";
    case Code::kExists: return "Exists";
    case Code::kNotDir: return "NotDir";
    case Code::kIsDir: return "IsDir";
    case Code::kNotEmpty: return "NotEmpty";
    case Code::kNoSpace: return "NoSpace";
    case Code::kNameTooLong: return "NameTooLong";
    case Code::kInvalid: return "Invalid";
    case Code::kPermission: return "Permission";
    case Code::kAccess: return "Access";
    case Code::kCorruption: return "Corruption";
    case Code::kIOError: return "IOError";
    case Code::kBusy: return "Busy";
    case Code::kTimedOut: return "TimedOut";
    case Code::kFenced: return "Fenced";
    case Code::kNotSupported: return "NotSupported";
    case Code::kTooBig: return "TooBig";
    case Code::kRange: return "Range";
    case Code::kNoData: return "NoData";
    case Code::kTooManyLinks: return "TooManyLinks";
    case Code::kCrossDevice: return "CrossDevice";
    case Code::kLoop: return "Loop";
    case Code::kReadOnly: return "ReadOnly";
    case Code::kNoMemory: return "NoMemory";
    case Code::kAgain: return "Again";
    case Code::kBadHandle: return "BadHandle";
    case Code::kNoAddress: return "NoAddress";
    case Code::kStale: return "Stale";
    case Code::kAborted: return "Aborted";
    case Code::kStaleInode: return "StaleInode";
    case Code::kNoLocks: return "NoLocks";
    case Code::kInterrupted: return "Interrupted";
    case Code::kDeadlock: return "Deadlock";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s = CodeName(code_);
  if (!msg_.empty()) {
    s += ": ";
    s += msg_;
  }
  return s;
}

}  // namespace agorafs
