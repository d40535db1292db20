// Filesystem: application locks (flock, POSIX fcntl), cluster-wide.
//
// The table of each inode lives in its internal xattr entry applock::kXattrName (see
// applock.h for the encoding and the range rules), read under the shared gate to test
// and changed under the exclusive gate, so every node sees every lock. An entry of a
// node generation that membership positively knows is gone (LockOwnerLive) is ignored
// and pruned at the next change. Lock changes do not touch ctime or mtime.
#include <algorithm>
#include <string>

#include "fs/applock.h"
#include "fs/filesystem.h"
#include "fs/fs_internal.h"
#include "fs/xattr.h"

namespace agorafs {
namespace {

// The table stored in `list` (empty if none); kCorruption names the inode.
Result<applock::Table> TableOf(const xattr::Entries& list, uint64_t ino) {
  for (const auto& e : list) {
    if (e.first != applock::kXattrName) continue;
    auto t = applock::Decode(e.second);
    if (!t.ok()) {
      return Err(Code::kCorruption, "inode " + std::to_string(ino) + ": " + t.status().message());
    }
    return std::move(t).value();
  }
  return applock::Table{};
}

Status CheckRange(const AppLock& l) {
  if (l.start > l.end) return Err(Code::kInvalid, "lock range ends before it starts");
  return Status::Ok();
}

}  // namespace

bool Filesystem::LockOwnerLive(uint32_t slot, uint64_t generation) const {
  if (slot == member_->slot() && generation == member_->generation()) return true;
  PeerInfo p = member_->Peer(slot);
  // A newer generation in the slot: the old one was recovered or left first.
  if (p.generation > generation) return false;
  // Free or recovered under that very generation: it left cleanly or its journal was
  // replayed and it can never write again. Anything else (alive, not yet observed,
  // dead but not recovered, unreadable, or a generation this observer has not seen
  // yet) holds its locks.
  if (p.generation == generation &&
      (p.state == PeerState::kFree || p.state == PeerState::kRecovered)) {
    return false;
  }
  return true;
}

Result<AppLock> Filesystem::TestLock(uint64_t ino, AppLock want) {
  AGFS_RETURN_IF_ERROR(CheckRange(want));
  want.slot = member_->slot();
  want.generation = member_->generation();
  AGFS_GATE(Shared, ino);
  auto h = store_->Begin(true);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  AGFS_ASSIGN_OR_RETURN(xattr::Entries list, xattr::List(*h, ino, **ir));
  AGFS_ASSIGN_OR_RETURN(applock::Table t, TableOf(list, ino));
  const AppLock* c = applock::FindConflict(
      t, want, [this](uint32_t s, uint64_t g) { return LockOwnerLive(s, g); });
  if (!c) {
    AppLock none = want;
    none.type = AppLockType::kUnlock;
    return none;
  }
  AppLock out = *c;
  // A pid of another node means nothing here (the kernel would name a local process).
  if (out.slot != want.slot || out.generation != want.generation) out.pid = 0;
  return out;
}

Status Filesystem::SetLock(uint64_t ino, AppLock want) {
  AGFS_RETURN_IF_ERROR(CheckRange(want));
  const uint32_t slot = member_->slot();
  const uint64_t gen = member_->generation();
  want.slot = slot;
  want.generation = gen;
  AGFS_GATE(Exclusive, ino);
  auto live = [this](uint32_t s, uint64_t g) { return LockOwnerLive(s, g); };
  auto h = store_->Begin(false, 8);
  auto ir = RIno(*h, g_, ino);
  if (!ir.ok()) return ir.status();
  AGFS_ASSIGN_OR_RETURN(xattr::Entries list, xattr::List(*h, ino, **ir));
  AGFS_ASSIGN_OR_RETURN(applock::Table t, TableOf(list, ino));
  if (const AppLock* c = applock::FindConflict(t, want, live)) {
    return Err(Code::kAgain, "inode " + std::to_string(ino) + ": locked by node slot " +
                                 std::to_string(c->slot));
  }
  applock::Table next = t;
  applock::Prune(&next, live);
  applock::Apply(&next, want);
  const bool ours = std::any_of(next.begin(), next.end(), [&](const AppLock& l) {
    return l.slot == slot && l.generation == gen;
  });
  if (next == t) {
    if (!ours) {
      std::lock_guard<std::mutex> lk(applock_mu_);
      applock_inos_.erase(ino);
    }
    return Status::Ok();
  }
  if (next.size() > applock::kMaxEntries) {
    return Err(Code::kNoLocks, "inode " + std::to_string(ino) + ": lock table full");
  }
  if (ours) {
    std::lock_guard<std::mutex> lk(applock_mu_);
    applock_inos_.insert(ino);
  }
  auto it = std::find_if(list.begin(), list.end(),
                         [](const auto& e) { return e.first == applock::kXattrName; });
  if (next.empty()) {
    if (it != list.end()) list.erase(it);
  } else if (it != list.end()) {
    it->second = applock::Encode(next);
  } else {
    list.emplace_back(std::string(applock::kXattrName), applock::Encode(next));
  }
  auto w = WIno(*h, g_, ino);
  if (!w.ok()) return w.status();
  Status st = xattr::Store(*h, ino, *w, list);
  if (st.Is(Code::kNoSpace)) {
    return Err(Code::kNoLocks, "inode " + std::to_string(ino) +
                                   ": no room for the lock table beside the xattrs");
  }
  AGFS_RETURN_IF_ERROR(st);
  if (!ours) {
    std::lock_guard<std::mutex> lk(applock_mu_);
    applock_inos_.erase(ino);
  }
  return Status::Ok();
}

Status Filesystem::ReleaseLocks(uint64_t ino, AppLockKind kind, uint64_t owner) {
  {
    std::lock_guard<std::mutex> lk(applock_mu_);
    if (!applock_inos_.contains(ino)) return Status::Ok();
  }
  AppLock all;
  all.kind = kind;
  all.type = AppLockType::kUnlock;
  all.start = 0;
  all.end = applock::kToEof;
  all.owner = owner;
  return SetLock(ino, all);
}

}  // namespace agorafs
