// LockManager: which metadata this node may cache and change.
//
// Every cached metadata block belongs to exactly one lock (format.h LockKind). A node
// may cache or change a block only while it holds that block's lock: shared to read,
// exclusive to write. When another node needs a lock, the manager calls the revoke
// callback; the callback commits the journal, writes the covered blocks home, drops
// them from the cache (MetaStore::DropLock) and only then is the lock released or
// downgraded.
//
// This header is the seam the cluster lock manager (issue "cluster core") plugs into.
// LocalLockManager is the single-node implementation: a node that is alone on the
// device holds every lock forever, so Acquire never waits and nothing is revoked
// unless a test calls Revoke().
//
// Thread-safety: all methods may be called from any thread.
#pragma once

#include <functional>
#include <mutex>

#include "format/format.h"
#include "util/status.h"

namespace agorafs {

enum class LockMode : uint8_t { kNone = 0, kShared = 1, kExclusive = 2 };

class LockManager {
 public:
  // Called with the lock and the mode the holder must go down to (kNone or kShared).
  // The callback must flush and drop everything the lock covers before returning.
  using RevokeFn = std::function<Status(LockId, LockMode)>;

  virtual ~LockManager() = default;
  // Returns once this node holds `id` in at least `mode`. kTimedOut / kFenced on failure.
  virtual Status Acquire(LockId id, LockMode mode) = 0;
  virtual LockMode Held(LockId id) const = 0;
  virtual void SetRevokeCallback(RevokeFn fn) = 0;
};

class LocalLockManager : public LockManager {
 public:
  Status Acquire(LockId, LockMode) override { return Status::Ok(); }
  LockMode Held(LockId) const override { return LockMode::kExclusive; }
  void SetRevokeCallback(RevokeFn fn) override {
    std::lock_guard<std::mutex> g(mu_);
    revoke_ = std::move(fn);
  }
  // Simulates another node asking for `id`: runs the revoke callback.
  Status Revoke(LockId id, LockMode to) {
    RevokeFn fn;
    {
      std::lock_guard<std::mutex> g(mu_);
      fn = revoke_;
    }
    return fn ? fn(id, to) : Status::Ok();
  }

 private:
  std::mutex mu_;
  RevokeFn revoke_;
};

}  // namespace agorafs
