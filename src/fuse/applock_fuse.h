// AppLockServer: the FUSE side of application locks (flock, POSIX fcntl).
//
// Contract
// - GetLk/SetLk/Flock answer their request, now or later; Flush/Release drop the
//   locks of a closing owner (FUSE flush: fi->lock_owner's POSIX locks; release with
//   fi->flock_release: that open file's flock) and return the Status for the reply.
// - A blocking request (F_SETLKW, flock without LOCK_NB) that conflicts is not
//   waited for on the FUSE worker thread (libfuse's pool is bounded): it is queued and
//   answered by one waiter thread, which retries the queue in FIFO order whenever a
//   lock on this node was dropped and otherwise polls with backoff (5 ms doubling to
//   100 ms), since other nodes' unlocks are seen only on the disk; a retry tests
//   under the shared gate and takes the exclusive one only to set. A signal to the
//   waiting process (FUSE interrupt) answers EINTR; Stop() answers EINTR to every
//   pending wait before the session ends. Only the waiter thread answers queued
//   requests, so each gets exactly one reply; a wait granted while its interrupt
//   arrives is answered with success (the lock is held).
// - Open file description locks (F_OFD_SETLK): FUSE names neither them nor their
//   owner at close, so every owner that set a POSIX lock through an open file (fi->fh,
//   unique per open) is remembered with it, minus the owners a flush of that file
//   dropped (process owners: their locks go at every close); at release the rest
//   (the description's own owner) lose their locks.
// - Deadlocks (POSIX locks only, as on Linux): a blocking request is marked waiting
//   (Filesystem::SetLock with wait) and answered EDEADLK instead of waiting when its
//   wait would close a cycle of waiting owners, on any nodes. Every wait that ends
//   without the lock (EINTR, error, EDEADLK) is taken back (CancelLockWait).
// Thread-safety: all methods may be called from any FUSE worker thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fs/filesystem.h"

struct fuse_req;
typedef struct fuse_req* fuse_req_t;
struct fuse_file_info;
struct flock;

namespace agorafs {

class AppLockServer {
 public:
  explicit AppLockServer(Filesystem* fs);
  ~AppLockServer();  // Stop()
  AppLockServer(const AppLockServer&) = delete;
  AppLockServer& operator=(const AppLockServer&) = delete;

  void GetLk(fuse_req_t req, uint64_t ino, fuse_file_info* fi, struct flock* lock);
  void SetLk(fuse_req_t req, uint64_t ino, fuse_file_info* fi, struct flock* lock, bool sleep);
  void Flock(fuse_req_t req, uint64_t ino, fuse_file_info* fi, int op);
  Status Flush(uint64_t ino, fuse_file_info* fi);
  Status Release(uint64_t ino, fuse_file_info* fi);
  // Answers every pending wait with EINTR and stops the waiter thread. Idempotent.
  void Stop();

  // Waits queued right now (tests, status).
  size_t pending();

 private:
  struct Wait {
    fuse_req_t req;
    uint64_t ino;
    AppLock lock;
    bool interrupted = false;
  };
  static void OnInterrupt(fuse_req_t req, void* data);
  void Set(fuse_req_t req, uint64_t ino, const AppLock& l, bool sleep);
  // The wait of `l` ended without the lock: takes its record back (best effort).
  void Cancel(uint64_t ino, const AppLock& l);
  void Kick();
  void Loop();

  Filesystem* fs_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::list<std::shared_ptr<Wait>> queue_;  // GUARDED_BY(mu_), FIFO
  bool kicked_ = false;                     // GUARDED_BY(mu_): a local unlock happened
  bool interrupted_ = false;                // GUARDED_BY(mu_): some wait was interrupted
  bool stop_ = false;                       // GUARDED_BY(mu_)
  // fi->fh -> owners that set POSIX locks through that open file and were not flushed.
  std::unordered_map<uint64_t, std::vector<uint64_t>> fh_owners_;  // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace agorafs
