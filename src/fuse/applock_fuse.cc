// AppLockServer; see applock_fuse.h.
#define FUSE_USE_VERSION 312
#include "fuse/applock_fuse.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <sys/file.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "fuse/errno_map.h"

namespace agorafs {
namespace {

constexpr auto kFirstPoll = std::chrono::milliseconds(5);
constexpr auto kMaxPoll = std::chrono::milliseconds(100);

void Reply(fuse_req_t req, const Status& st) {
  if (st.Is(Code::kCorruption) || st.Is(Code::kIOError)) spdlog::error("{}", st.ToString());
  fuse_reply_err(req, ToErrno(st));
}

// struct flock (absolute start, l_len 0 = to the end) -> AppLock; false if invalid.
bool FromFlock(const struct flock& f, AppLock* l) {
  switch (f.l_type) {
    case F_RDLCK: l->type = AppLockType::kRead; break;
    case F_WRLCK: l->type = AppLockType::kWrite; break;
    case F_UNLCK: l->type = AppLockType::kUnlock; break;
    default: return false;
  }
  if (f.l_start < 0 || f.l_len < 0) return false;
  l->kind = AppLockKind::kPosix;
  l->start = static_cast<uint64_t>(f.l_start);
  l->end = f.l_len == 0 ? applock::kToEof : l->start + static_cast<uint64_t>(f.l_len) - 1;
  l->pid = f.l_pid > 0 ? static_cast<uint32_t>(f.l_pid) : 0;
  return true;
}

}  // namespace

AppLockServer::AppLockServer(Filesystem* fs) : fs_(fs) {
  thread_ = std::thread([this] { Loop(); });
}

AppLockServer::~AppLockServer() { Stop(); }

void AppLockServer::Stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

size_t AppLockServer::pending() {
  std::lock_guard<std::mutex> lk(mu_);
  return queue_.size();
}

void AppLockServer::Kick() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    kicked_ = true;
  }
  cv_.notify_all();
}

void AppLockServer::GetLk(fuse_req_t req, uint64_t ino, fuse_file_info* fi, struct flock* lock) {
  AppLock want;
  if (!FromFlock(*lock, &want) || want.type == AppLockType::kUnlock) {
    return (void)fuse_reply_err(req, EINVAL);
  }
  want.owner = fi->lock_owner;
  auto r = fs_->TestLock(ino, want);
  if (!r.ok()) return Reply(req, r.status());
  struct flock out = *lock;
  if (r->type == AppLockType::kUnlock) {
    out.l_type = F_UNLCK;
  } else {
    out.l_type = r->type == AppLockType::kWrite ? F_WRLCK : F_RDLCK;
    out.l_whence = SEEK_SET;
    out.l_start = static_cast<off_t>(r->start);
    out.l_len = r->end == applock::kToEof ? 0 : static_cast<off_t>(r->end - r->start + 1);
    out.l_pid = static_cast<pid_t>(r->pid);
  }
  fuse_reply_lock(req, &out);
}

void AppLockServer::SetLk(fuse_req_t req, uint64_t ino, fuse_file_info* fi, struct flock* lock,
                          bool sleep) {
  AppLock want;
  if (!FromFlock(*lock, &want)) return (void)fuse_reply_err(req, EINVAL);
  want.owner = fi->lock_owner;
  if (want.pid == 0) want.pid = static_cast<uint32_t>(fuse_req_ctx(req)->pid);
  if (want.type != AppLockType::kUnlock && fi->fh != 0) {
    std::lock_guard<std::mutex> lk(mu_);
    auto& owners = fh_owners_[fi->fh];
    if (std::find(owners.begin(), owners.end(), want.owner) == owners.end()) {
      owners.push_back(want.owner);
    }
  }
  Set(req, ino, want, sleep);
}

void AppLockServer::Flock(fuse_req_t req, uint64_t ino, fuse_file_info* fi, int op) {
  AppLock want;
  want.kind = AppLockKind::kFlock;
  switch (op & ~LOCK_NB) {
    case LOCK_SH: want.type = AppLockType::kRead; break;
    case LOCK_EX: want.type = AppLockType::kWrite; break;
    case LOCK_UN: want.type = AppLockType::kUnlock; break;
    default: return (void)fuse_reply_err(req, EINVAL);
  }
  want.start = 0;
  want.end = applock::kToEof;
  want.owner = fi->lock_owner;
  want.pid = static_cast<uint32_t>(fuse_req_ctx(req)->pid);
  Set(req, ino, want, (op & LOCK_NB) == 0);
}

void AppLockServer::Set(fuse_req_t req, uint64_t ino, const AppLock& l, bool sleep) {
  Status st = fs_->SetLock(ino, l, sleep);
  if (l.type == AppLockType::kUnlock && st.ok()) Kick();
  if (!sleep || !st.Is(Code::kAgain)) return Reply(req, st);
  // Conflict and the caller waits: hand the request to the waiter thread. The
  // interrupt function is registered first (the request stays valid until it is
  // answered, and only the waiter thread answers once it is queued).
  auto w = std::make_shared<Wait>(Wait{req, ino, l});
  fuse_req_interrupt_func(req, &AppLockServer::OnInterrupt, this);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!stop_ && !fuse_req_interrupted(req)) {
      queue_.push_back(std::move(w));
      kicked_ = true;  // polls from the shortest interval on
      cv_.notify_all();
      return;
    }
  }
  Cancel(ino, l);
  fuse_reply_err(req, EINTR);
}

void AppLockServer::Cancel(uint64_t ino, const AppLock& l) {
  if (l.kind != AppLockKind::kPosix) return;  // only POSIX waits are recorded
  Status st = fs_->CancelLockWait(ino, l);
  if (!st.ok()) {
    spdlog::warn("inode {}: forgetting a lock wait: {} (dropped when this node leaves)", ino,
                 st.ToString());
  }
}

void AppLockServer::OnInterrupt(fuse_req_t req, void* data) {
  auto* self = static_cast<AppLockServer*>(data);
  {
    std::lock_guard<std::mutex> lk(self->mu_);
    for (auto& w : self->queue_) {
      if (w->req == req) {
        w->interrupted = true;
        self->interrupted_ = true;
      }
    }
  }
  self->cv_.notify_all();
}

Status AppLockServer::Flush(uint64_t ino, fuse_file_info* fi) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = fh_owners_.find(fi->fh);
    if (it != fh_owners_.end()) std::erase(it->second, fi->lock_owner);
  }
  Status st = fs_->ReleaseLocks(ino, AppLockKind::kPosix, fi->lock_owner);
  Kick();
  return st;
}

Status AppLockServer::Release(uint64_t ino, fuse_file_info* fi) {
  if (!fi) return Status::Ok();
  std::vector<uint64_t> owners;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = fh_owners_.find(fi->fh);
    if (it != fh_owners_.end()) {
      owners = std::move(it->second);
      fh_owners_.erase(it);
    }
  }
  Status st;
  // The description's OFD locks (see the header).
  for (uint64_t o : owners) {
    Status s = fs_->ReleaseLocks(ino, AppLockKind::kPosix, o);
    if (st.ok()) st = s;
  }
  if (fi->flock_release) {
    Status s = fs_->ReleaseLocks(ino, AppLockKind::kFlock, fi->lock_owner);
    if (st.ok()) st = s;
  }
  if (!owners.empty() || fi->flock_release) Kick();
  return st;
}

void AppLockServer::Loop() {
  auto poll = kFirstPoll;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait_for(lk, poll, [this] { return stop_ || kicked_ || interrupted_; });
    if (stop_) break;
    if (kicked_) poll = kFirstPoll;
    kicked_ = false;
    interrupted_ = false;
    if (queue_.empty()) {
      poll = kMaxPoll;  // nothing to poll for; a new wait is retried at the next tick
      continue;
    }
    std::vector<std::shared_ptr<Wait>> round(queue_.begin(), queue_.end());
    bool granted = false;
    for (const auto& w : round) {
      if (stop_) break;
      Status st;
      if (!w->interrupted) {
        lk.unlock();
        // Test under the shared gate first: a poll that finds the lock still taken
        // then costs no exclusive hold of the filesystem lock (which would make the
        // holder's node write its cache home).
        auto t = fs_->TestLock(w->ino, w->lock);
        if (!t.ok()) {
          st = t.status();
        } else if (t->type != AppLockType::kUnlock) {
          st = Err(Code::kAgain, "still locked");
        } else {
          st = fs_->SetLock(w->ino, w->lock, true);
        }
        lk.lock();
        if (st.Is(Code::kAgain) && !w->interrupted) continue;  // still waiting
        if (st.Is(Code::kAgain)) st = Err(Code::kInterrupted, "lock wait interrupted");
      } else {
        st = Err(Code::kInterrupted, "lock wait interrupted");
      }
      queue_.remove(w);
      granted = granted || st.ok();
      lk.unlock();
      if (!st.ok()) Cancel(w->ino, w->lock);
      Reply(w->req, st);
      lk.lock();
    }
    poll = granted ? kFirstPoll : std::min<std::chrono::milliseconds>(poll * 2, kMaxPoll);
  }
  std::list<std::shared_ptr<Wait>> left;
  left.swap(queue_);
  lk.unlock();
  for (const auto& w : left) {
    Cancel(w->ino, w->lock);
    fuse_reply_err(w->req, EINTR);
  }
}

}  // namespace agorafs
