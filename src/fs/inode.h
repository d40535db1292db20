// Inode helpers shared by mkfs, the filesystem core and fsck.
// Thread-safety: pure functions on caller-owned blocks.
#pragma once

#include <sys/stat.h>

#include <ctime>

#include "format/format.h"

namespace agorafs {

inline Timespec64 ToTs(const struct timespec& t) {
  return Timespec64{static_cast<int64_t>(t.tv_sec), static_cast<uint32_t>(t.tv_nsec)};
}
inline struct timespec FromTs(const Timespec64& t) {
  struct timespec r;
  r.tv_sec = static_cast<time_t>(t.sec);
  r.tv_nsec = static_cast<long>(t.nsec);
  return r;
}
inline Timespec64 NowTs() {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return ToTs(t);
}

// Fills the inode core of a block whose header is already initialised. Leaves the
// data area zeroed; the caller sets up data_kind (dir::InitEmpty, extent::InitRoot or
// inline data).
void InitInodeCore(InodeBlock* ino, uint32_t mode, uint32_t uid, uint32_t gid,
                   uint64_t generation, Timespec64 now);

inline bool IsDir(const InodeBlock& i) { return S_ISDIR(i.mode); }
inline bool IsReg(const InodeBlock& i) { return S_ISREG(i.mode); }
inline bool IsLnk(const InodeBlock& i) { return S_ISLNK(i.mode); }

// DT_* type for a directory entry from a mode.
uint8_t DirentType(uint32_t mode);

}  // namespace agorafs
