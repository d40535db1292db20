// Helpers shared by the filesystem core's source files (not a public API).
#pragma once

#include <initializer_list>

#include "cache/meta_txn.h"
#include "format/format.h"
#include "fs/filesystem.h"
#include "fs/xattr.h"

namespace agorafs {

Attr AttrOf(uint64_t ino, const InodeBlock& i);
// Filesystem::lock_epoch() when this thread's outermost gate pinned the lock; 0
// outside any gate and under intent. What AttrOf stamps into Attr::lock_epoch.
uint64_t GateEpoch();
bool ValidIno(const Geometry& g, uint64_t ino);
// The inode block, verified; kNotFound when ino is not a possible inode number.
Result<const InodeBlock*> RIno(MetaTxn& h, const Geometry& g, uint64_t ino);
Result<InodeBlock*> WIno(MetaTxn& h, const Geometry& g, uint64_t ino);

inline constexpr uint32_t kMaxLinks = 65000;
inline constexpr uint64_t kMaxFileSize = (1ull << 51) * kBlockSize - 1;

// kNameTooLong / kInvalid for names no directory may hold.
Status CheckName(std::string_view name);

// Takes the filesystem lock for the rest of the scope (Filesystem::Gate) in mode
// Shared or Exclusive, then checks that each inode number named is still the inode
// the kernel knows (kStaleInode otherwise). Only inside Filesystem methods.
#define AGFS_GATE(mode, ...)                                                  \
  Filesystem::Gate agfs_gate_(this, LockMode::k##mode);                       \
  AGFS_RETURN_IF_ERROR(agfs_gate_.status());                                  \
  for (uint64_t agfs_ino_ : std::initializer_list<uint64_t>{__VA_ARGS__}) {   \
    AGFS_RETURN_IF_ERROR(CheckKnown(agfs_ino_));                              \
  }

// Filesystem::InodeGate on `ino` for the rest of the scope, in mode Shared (reads the
// inode) or Exclusive (changes it), then the same check as AGFS_GATE.
#define AGFS_INODE_GATE(mode, ino)                                             \
  Filesystem::InodeGate agfs_gate_(this, ino, LockMode::k##mode);             \
  AGFS_RETURN_IF_ERROR(agfs_gate_.status());                                  \
  AGFS_RETURN_IF_ERROR(CheckKnown(ino));

// After a change of file data: mtime and ctime become `now`, but mtime always moves
// forward, also when this node's clock is behind the one that wrote last: other
// nodes' kernels compare mtime (and size) to decide that their cached pages are stale.
inline void TouchData(InodeBlock* I, Timespec64 now) {
  Timespec64 after = I->mtime;
  if (++after.nsec >= 1000000000) {
    after.nsec = 0;
    after.sec++;
  }
  bool later = now.sec > after.sec || (now.sec == after.sec && now.nsec >= after.nsec);
  I->mtime = later ? now : after;
  I->ctime = now;
}

// True when this thread's gates allow metadata writes (the node holds the lock
// exclusively): changes of any block, allocation in any AG among them. Under intent,
// a thread changes only the inode it holds exclusively (see InodeGate), and
// allocates only in the AG an AgGate pinned.
bool GateAllowsWrite();
// True when this thread's gates hold the filesystem lock in intent (InodeGate).
bool GateIsIntent();

// POSIX ACLs kept in step with the mode (fs/acl.h; in xattr_ops.cc).
// After a chmod of `I`: its access ACL, if any, takes the new permission bits.
Status AclChmod(MetaTxn& h, uint64_t ino, InodeBlock* I);
// A new inode of mode `*mode` (type and permission bits as asked) in directory `P`:
// with a default ACL there, `*mode` is limited by it and `*inherited` receives the
// ACL xattrs the inode starts with; without one, the umask applies. Symlinks inherit
// nothing and keep their mode.
Status InheritAcl(MetaTxn& h, uint64_t parent, const InodeBlock& P, uint32_t umask,
                  uint32_t* mode, xattr::Entries* inherited);

inline const Status& StatusOf(const Status& s) { return s; }
template <typename T>
const Status& StatusOf(const Result<T>& r) { return r.status(); }

// Runs f; if it ran out of space while freed blocks were waiting for a checkpoint,
// checkpoints (MetaStore::Reclaim) and runs it once more. f must be safe to repeat
// after a kNoSpace (it changed nothing, or only things a second run reuses).
template <typename F>
auto RetryOnNoSpace(MetaStore* store, F f) -> decltype(f()) {
  auto r = f();
  if (!StatusOf(r).Is(Code::kNoSpace)) return r;
  auto reclaimed = store->Reclaim();
  if (!reclaimed.ok() || !*reclaimed) return r;
  return f();
}

}  // namespace agorafs
