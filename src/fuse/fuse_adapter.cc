#define FUSE_USE_VERSION 312
#include "fuse/fuse_adapter.h"

#include <fuse_lowlevel.h>
#include <linux/fs.h>
#include <csignal>
#include <sys/xattr.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <atomic>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "fuse/applock_fuse.h"
#include "fuse/errno_map.h"
#include "fuse/fuse_conn.h"
#include "util/log_once.h"

namespace agorafs {
namespace {

struct Ctx {
  Filesystem* fs;
  FuseOptions opts;
  fuse_session* se = nullptr;
  // Shared: from the check that attributes may be cached until their reply is written.
  // Exclusive: the lock-loss hook's invalidations (see the header).
  std::shared_mutex reply_mu;
  // Names are cached only if the kernel can drop them all at once (see the header);
  // probed once, at the first reply that could cache one.
  std::once_flag epoch_probe;
  bool kernel_epochs = false;
  // A name timeout was handed out since the hook last ran.
  std::atomic<bool> entries_cached{false};
  // Application locks (flock, fcntl): applock_fuse.h.
  AppLockServer* locks = nullptr;
  // fi->fh of the next open file: names the open file description (AppLockServer
  // drops its OFD locks at release).
  std::atomic<uint64_t> next_fh{1};
};

// FUSE_NOTIFY_INC_EPOCH (Linux 6.16, protocol 7.44), not in libfuse 3.14 nor in
// Debian 12's kernel headers: a notification with no payload that makes the kernel
// treat every dentry of the mount created before it as invalid at its next use.
// Older kernels answer EINVAL.
constexpr int32_t kFuseNotifyIncEpoch = 8;
struct FuseOutHeader {  // struct fuse_out_header
  uint32_t len;
  int32_t error;  // the notification code when unique is 0
  uint64_t unique;
};
static_assert(sizeof(FuseOutHeader) == 16);

// Returns 0 or -errno.
int NotifyIncEpoch(fuse_session* se) {
  FuseOutHeader h{sizeof(FuseOutHeader), kFuseNotifyIncEpoch, 0};
  ssize_t n = write(fuse_session_fd(se), &h, sizeof(h));
  if (n == static_cast<ssize_t>(sizeof(h))) return 0;
  return n < 0 ? -errno : -EIO;
}

// Kept off the lease's end: the kernel starts the timeout when it reads the reply.
constexpr uint64_t kLeaseMarginMs = 200;

Ctx* C(fuse_req_t req) { return static_cast<Ctx*>(fuse_req_userdata(req)); }
Filesystem* F(fuse_req_t req) { return C(req)->fs; }

uint64_t ToFs(fuse_req_t req, fuse_ino_t ino) {
  return ino == FUSE_ROOT_ID ? F(req)->root_ino() : ino;
}
fuse_ino_t ToFuse(Filesystem* fs, uint64_t ino) {
  return ino == fs->root_ino() ? FUSE_ROOT_ID : ino;
}

Caller CallerOf(fuse_req_t req, bool with_groups = false) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  Caller c;
  c.uid = ctx->uid;
  c.gid = ctx->gid;
  c.pid = static_cast<uint32_t>(ctx->pid);
  c.umask = ctx->umask;
  if (with_groups && c.uid != 0) {
    gid_t list[256];
    int n = fuse_req_getgroups(req, 256, list);
    for (int i = 0; i < n && i < 256; i++) c.groups.push_back(list[i]);
  }
  return c;
}

void ReplyErr(fuse_req_t req, const Status& s) {
  if (s.Is(Code::kCorruption) || s.Is(Code::kIOError)) {
    std::string msg = s.ToString();
    if (FirstReport(msg)) spdlog::error("{}", msg);
  }
  fuse_reply_err(req, ToErrno(s));
}

// The attribute timeout a reply carrying `a` may hand out; call with reply_mu held
// shared until the reply is written. The kernel must already hold a reference to the
// inode (AddRef before an entry reply).
// A regular file that this node has open gets none. An invalidation makes the kernel
// discard a getattr reply already written but not yet applied, and the read(2) that
// asked for it then serves its old pages unchecked. So a file must never be
// invalidated while a read's getattr may be in flight: files open here are not
// marked, and OpOpen takes back the timeout of a marked one before any read can ask.
double AttrTimeout(fuse_req_t req, const Attr& a) {
  Ctx* c = C(req);
  if (c->opts.attr_timeout <= 0 || a.lock_epoch == 0 || a.lock_epoch != c->fs->lock_epoch()) {
    return 0;
  }
  uint64_t lease = c->fs->LeaseRemainingMs();
  if (lease <= kLeaseMarginMs) return 0;
  if (!c->fs->MarkAttrsCached(a.ino, /*unless_open=*/S_ISREG(a.mode))) return 0;
  return std::min(c->opts.attr_timeout, double(lease - kLeaseMarginMs) / 1000.0);
}

// Takes back the attribute timeout of `ino` (attributes only: no page or inode lock is
// taken in the kernel, so it cannot wait for a request that waits for the lock).
void InvalidateAttrs(Ctx* c, uint64_t ino) {
  int rc = fuse_lowlevel_notify_inval_inode(c->se, ToFuse(c->fs, ino), -1, 0);
  // ENOENT: the kernel has already dropped the inode.
  if (rc != 0 && rc != -ENOENT) spdlog::warn("invalidating inode {}: {}", ino, strerror(-rc));
}

// Before a regular file's open is answered: takes back an attribute timeout handed
// out while it was closed (see AttrTimeout). Call after Filesystem::Open, which stops
// further marks; reply_mu exclusive waits for a reply that marked it to be written.
void UnmarkOpenedFile(Ctx* c, uint64_t ino) {
  if (!c->fs->AttrsMarked(ino)) return;
  std::unique_lock<std::shared_mutex> lk(c->reply_mu);
  if (c->fs->UnmarkAttrs(ino)) InvalidateAttrs(c, ino);  // else the hook took it back
}

// Whether the kernel can drop every cached name at once: sends one
// FUSE_NOTIFY_INC_EPOCH, once. OpInit calls it before the kernel has sent any LOOKUP:
// the kernel stamps a name with its epoch before the LOOKUP goes out and invalidates,
// at the next path walk through it, every name stamped before the latest epoch, with
// everything cached below it. Probing during the first lookup made that first
// directory stale at once, and its next use dropped all its cached entries (a burst of
// tens of thousands of FORGETs in bench/single-node).
void ProbeKernelEpochs(Ctx* c) {
  std::call_once(c->epoch_probe, [c] {
    int rc = NotifyIncEpoch(c->se);
    c->kernel_epochs = rc == 0;
    if (rc == 0) {
      spdlog::info("the kernel caches names (FUSE_NOTIFY_INC_EPOCH drops them when the lock moves)");
    } else {
      spdlog::info("the kernel cannot drop all cached names at once ({}; Linux 6.16 can): "
                   "every path walk asks the daemon", strerror(-rc));
    }
  });
}

// The name timeout a reply may hand out for an answer (an entry, or the absence of
// one) read under lock epoch `epoch`; call with reply_mu held shared until the reply
// is written.
double EntryTimeout(fuse_req_t req, uint64_t epoch) {
  Ctx* c = C(req);
  if (c->opts.entry_timeout <= 0 || epoch == 0 || epoch != c->fs->lock_epoch()) return 0;
  ProbeKernelEpochs(c);
  if (!c->kernel_epochs) return 0;
  uint64_t lease = c->fs->LeaseRemainingMs();
  if (lease <= kLeaseMarginMs) return 0;
  c->entries_cached.store(true);
  return std::min(c->opts.entry_timeout, double(lease - kLeaseMarginMs) / 1000.0);
}

// The lock-loss hook: takes back every name and attribute timeout handed out.
void InvalidateKernelCaches(Ctx* c) {
  std::unique_lock<std::shared_mutex> lk(c->reply_mu);
  if (c->entries_cached.exchange(false)) {
    int rc = NotifyIncEpoch(c->se);
    // ENODEV: the mount is gone, and its names with it.
    if (rc != 0 && rc != -ENODEV) spdlog::error("dropping the kernel's cached names: {}", strerror(-rc));
  }
  for (uint64_t ino : c->fs->TakeAttrsCached()) InvalidateAttrs(c, ino);
}

void FillEntry(Filesystem* fs, const Attr& a, fuse_entry_param* e) {
  std::memset(e, 0, sizeof(*e));
  e->ino = ToFuse(fs, a.ino);
  e->generation = a.generation;
  a.ToStat(&e->attr);
  e->attr.st_ino = e->ino;
  e->attr_timeout = 0;
  e->entry_timeout = 0;
}

void ReplyEntry(fuse_req_t req, const Result<Attr>& r) {
  if (!r.ok()) return ReplyErr(req, r.status());
  Filesystem* fs = F(req);
  fuse_entry_param e;
  FillEntry(fs, *r, &e);
  fs->AddRef(r->ino, r->generation);
  std::shared_lock<std::shared_mutex> lk(C(req)->reply_mu);
  e.attr_timeout = AttrTimeout(req, *r);
  e.entry_timeout = EntryTimeout(req, r->lock_epoch);
  if (fuse_reply_entry(req, &e) != 0) fs->Forget(r->ino, 1);
}

// `cacheable`: false for a setattr reply. Kernels before the 2025 fix of
// fuse_do_setattr apply a setattr reply without checking whether an invalidation
// came after it was written, so a timeout it carried could outlive the lock.
void ReplyAttr(fuse_req_t req, const Result<Attr>& r, bool cacheable = true) {
  if (!r.ok()) return ReplyErr(req, r.status());
  struct stat st;
  r->ToStat(&st);
  st.st_ino = ToFuse(F(req), r->ino);
  if (!cacheable) return (void)fuse_reply_attr(req, &st, 0);
  std::shared_lock<std::shared_mutex> lk(C(req)->reply_mu);
  fuse_reply_attr(req, &st, AttrTimeout(req, *r));
}

// ------------------------------------------------------------------------------

void OpInit(void* userdata, fuse_conn_info* conn) {
  auto* ctx = static_cast<Ctx*>(userdata);
  if (ctx->opts.entry_timeout > 0) ProbeKernelEpochs(ctx);
  WantAgorafsCapabilities(conn);
}

void OpDestroy(void* userdata) {
  auto* ctx = static_cast<Ctx*>(userdata);
  Status st = ctx->fs->SyncAll();
  if (!st.ok()) spdlog::error("sync at unmount: {}", st.ToString());
}

void OpLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  uint64_t epoch = 0;
  auto r = F(req)->Lookup(ToFs(req, parent), name, &epoch);
  if (!r.ok() && r.status().Is(Code::kNotFound)) {
    // A negative entry, kept like a positive one until the lock moves.
    fuse_entry_param e;
    std::memset(&e, 0, sizeof(e));
    std::shared_lock<std::shared_mutex> lk(C(req)->reply_mu);
    e.entry_timeout = EntryTimeout(req, epoch);
    fuse_reply_entry(req, &e);
    return;
  }
  ReplyEntry(req, r);
}

void OpForget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  F(req)->Forget(ToFs(req, ino), nlookup);
  fuse_reply_none(req);
}

void OpForgetMulti(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  for (size_t i = 0; i < count; i++) F(req)->Forget(ToFs(req, forgets[i].ino), forgets[i].nlookup);
  fuse_reply_none(req);
}

void OpGetattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  ReplyAttr(req, F(req)->GetAttr(ToFs(req, ino)));
}

void OpSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi) {
  SetAttrRequest r;
  r.mode = to_set & FUSE_SET_ATTR_MODE;
  r.uid = to_set & FUSE_SET_ATTR_UID;
  r.gid = to_set & FUSE_SET_ATTR_GID;
  r.size = to_set & FUSE_SET_ATTR_SIZE;
  r.atime = to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW);
  r.mtime = to_set & (FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW);
  r.atime_now = to_set & FUSE_SET_ATTR_ATIME_NOW;
  r.mtime_now = to_set & FUSE_SET_ATTR_MTIME_NOW;
  r.ctime = to_set & FUSE_SET_ATTR_CTIME;
  r.new_mode = attr->st_mode;
  r.new_uid = attr->st_uid;
  r.new_gid = attr->st_gid;
  r.new_size = static_cast<uint64_t>(attr->st_size);
  r.new_atime = attr->st_atim;
  r.new_mtime = attr->st_mtim;
  r.new_ctime = attr->st_ctim;
  r.has_open_file = fi != nullptr;
  ReplyAttr(req, F(req)->SetAttr(CallerOf(req, r.gid || r.mode), ToFs(req, ino), r),
            /*cacheable=*/false);
}

void OpReadlink(fuse_req_t req, fuse_ino_t ino) {
  auto r = F(req)->Readlink(ToFs(req, ino));
  if (!r.ok()) return ReplyErr(req, r.status());
  fuse_reply_readlink(req, r->c_str());
}

void OpMknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
  ReplyEntry(req, F(req)->Mknod(CallerOf(req, true), ToFs(req, parent), name, mode, rdev));
}

void OpMkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  ReplyEntry(req, F(req)->Mkdir(CallerOf(req), ToFs(req, parent), name, mode));
}

void OpSymlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) {
  ReplyEntry(req, F(req)->Symlink(CallerOf(req), ToFs(req, parent), name, link));
}

void OpUnlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_reply_err(req, ToErrno(F(req)->Unlink(CallerOf(req), ToFs(req, parent), name)));
}

void OpRmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_reply_err(req, ToErrno(F(req)->Rmdir(CallerOf(req), ToFs(req, parent), name)));
}

void OpRename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
              const char* newname, unsigned int flags) {
  fuse_reply_err(req, ToErrno(F(req)->Rename(CallerOf(req), ToFs(req, parent), name,
                                             ToFs(req, newparent), newname, flags)));
}

void OpLink(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname) {
  ReplyEntry(req, F(req)->Link(CallerOf(req), ToFs(req, ino), ToFs(req, newparent), newname));
}

void SetOpenFlags(fuse_req_t req, fuse_file_info* fi) {
  // Pages cached before this open may be another node's old data: drop them.
  fi->keep_cache = 0;
  if (fi->flags & O_DIRECT) {
    fi->direct_io = 1;
    fi->keep_cache = 0;
  }
  // O_APPEND: through the page cache the kernel may split one write(2) into several
  // requests, and each would be appended on its own, possibly after another node's
  // record. Direct I/O sends each write of up to max_write (1 MiB) as one request.
  if (fi->flags & O_APPEND) fi->direct_io = 1;
  fi->fh = C(req)->next_fh.fetch_add(1, std::memory_order_relaxed);
}

void OpOpen(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  uint64_t i = ToFs(req, ino);
  auto a = F(req)->GetAttr(i);
  if (!a.ok()) return ReplyErr(req, a.status());
  if (S_ISDIR(a->mode)) return (void)fuse_reply_err(req, EISDIR);
  if ((fi->flags & O_TRUNC) && S_ISREG(a->mode)) {
    // FUSE_CAP_ATOMIC_O_TRUNC: the kernel leaves O_TRUNC to us.
    SetAttrRequest r;
    r.size = true;
    r.new_size = 0;
    r.mtime = r.mtime_now = true;
    r.has_open_file = true;
    auto t = F(req)->SetAttr(CallerOf(req), i, r);
    if (!t.ok()) return ReplyErr(req, t.status());
  }
  Status st = F(req)->Open(i, fi->flags, CallerOf(req));
  if (!st.ok()) return ReplyErr(req, st);
  if (S_ISREG(a->mode)) UnmarkOpenedFile(C(req), i);
  SetOpenFlags(req, fi);
  if (fuse_reply_open(req, fi) != 0) F(req)->Release(i);
}

void OpCreate(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
              fuse_file_info* fi) {
  Filesystem* fs = F(req);
  auto r = fs->Mknod(CallerOf(req, true), ToFs(req, parent), name, S_IFREG | (mode & 07777), 0);
  if (r.status().Is(Code::kExists) && !(fi->flags & O_EXCL)) {
    // Another node created the name after this kernel looked it up. ESTALE makes the
    // kernel redo the open once with a fresh lookup (do_filp_open's LOOKUP_REVAL
    // retry), which then opens the existing file with the kernel's own permission
    // and O_TRUNC handling; EEXIST would reach the caller of open(O_CREAT).
    return (void)fuse_reply_err(req, ESTALE);
  }
  if (!r.ok()) return ReplyErr(req, r.status());
  Status st = fs->Open(r->ino, fi->flags, CallerOf(req));
  if (!st.ok()) return ReplyErr(req, st);
  fuse_entry_param e;
  FillEntry(fs, *r, &e);
  SetOpenFlags(req, fi);
  fs->AddRef(r->ino, r->generation);
  std::shared_lock<std::shared_mutex> lk(C(req)->reply_mu);
  e.attr_timeout = AttrTimeout(req, *r);
  e.entry_timeout = EntryTimeout(req, r->lock_epoch);
  if (fuse_reply_create(req, &e, fi) != 0) {
    fs->Release(r->ino);
    fs->Forget(r->ino, 1);
  }
}

void OpRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  thread_local std::vector<char> buf;
  if (buf.size() < size) buf.resize(size);
  auto r = F(req)->Read(ToFs(req, ino), static_cast<uint64_t>(off), size, buf.data());
  if (!r.ok()) return ReplyErr(req, r.status());
  fuse_reply_buf(req, buf.data(), *r);
}

void OpWrite(fuse_req_t req, fuse_ino_t ino, const char* data, size_t size, off_t off,
             fuse_file_info* fi) {
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  // The kernel placed an O_APPEND write at its cached size, which another node may
  // have moved: the filesystem appends at the true end instead.
  bool append = fi && (fi->flags & O_APPEND);
  auto r = F(req)->Write(CallerOf(req), ToFs(req, ino), static_cast<uint64_t>(off), data, size,
                         append);
  if (!r.ok()) return ReplyErr(req, r.status());
  fuse_reply_write(req, *r);
}

void OpRelease(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Status st = C(req)->locks->Release(ToFs(req, ino), fi);  // the open file's flock
  if (!st.ok() && !st.Is(Code::kStaleInode)) spdlog::warn("release: {}", st.ToString());
  F(req)->Release(ToFs(req, ino));
  fuse_reply_err(req, 0);
}

// Application locks (applock_fuse.h). Flush drops the closing process's POSIX locks.
void OpFlush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Status st = C(req)->locks->Flush(ToFs(req, ino), fi);
  fuse_reply_err(req, st.Is(Code::kStaleInode) ? 0 : ToErrno(st));
}
void OpGetlk(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi, struct flock* lock) {
  C(req)->locks->GetLk(req, ToFs(req, ino), fi, lock);
}
void OpSetlk(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi, struct flock* lock, int sleep) {
  C(req)->locks->SetLk(req, ToFs(req, ino), fi, lock, sleep != 0);
}
void OpFlock(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi, int op) {
  C(req)->locks->Flock(req, ToFs(req, ino), fi, op);
}

void OpFsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info*) {
  fuse_reply_err(req, ToErrno(F(req)->Fsync(ToFs(req, ino), datasync != 0)));
}

void OpOpendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto a = F(req)->GetAttr(ToFs(req, ino));
  if (!a.ok()) return ReplyErr(req, a.status());
  if (!S_ISDIR(a->mode)) return (void)fuse_reply_err(req, ENOTDIR);
  fi->cache_readdir = 0;
  fuse_reply_open(req, fi);
}

void DoReaddir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, bool plus) {
  Filesystem* fs = F(req);
  std::vector<char> buf(size);
  size_t used = 0;
  // Entries sharing one offset (hash collisions) go to the kernel all or none: the
  // kernel resumes from the last offset it got, which re-delivers the whole group.
  uint64_t group_off = 0;
  size_t group_start = 0;
  std::vector<uint64_t> group_refs, drop;
  Status st = fs->ReadDir(ToFs(req, ino), static_cast<uint64_t>(off), plus,
                          [&](const DirEntryOut& e) {
    if (e.next != group_off) {
      group_off = e.next;
      group_start = used;
      group_refs.clear();
    }
    size_t n;
    bool ref = false;
    if (plus) {
      fuse_entry_param p;
      bool dot = e.name == "." || e.name == "..";
      std::memset(&p, 0, sizeof(p));
      if (dot || !e.has_attr) {
        p.attr.st_ino = ToFuse(fs, e.ino);  // no attributes: the kernel looks it up
        p.attr.st_mode = static_cast<mode_t>(e.type) << 12;
      } else {
        FillEntry(fs, e.attr, &p);  // timeouts 0: see the header
        ref = true;
      }
      n = fuse_add_direntry_plus(req, buf.data() + used, size - used, e.name.c_str(), &p,
                                 static_cast<off_t>(e.next));
    } else {
      struct stat st;
      std::memset(&st, 0, sizeof(st));
      st.st_ino = ToFuse(fs, e.ino);
      st.st_mode = static_cast<mode_t>(e.type) << 12;
      n = fuse_add_direntry(req, buf.data() + used, size - used, e.name.c_str(), &st,
                            static_cast<off_t>(e.next));
    }
    if (n > size - used) {
      if (group_start > 0) {  // drop the partial group (unless it alone fills the buffer)
        used = group_start;
        drop = group_refs;  // forgotten after ReadDir let go of the metadata handle
      }
      return false;
    }
    if (ref) {
      fs->AddRef(e.ino, e.has_attr ? e.attr.generation : 0);
      group_refs.push_back(e.ino);
    }
    used += n;
    return true;
  });
  for (uint64_t r : drop) fs->Forget(r, 1);
  if (!st.ok()) return ReplyErr(req, st);
  fuse_reply_buf(req, buf.data(), used);
}

void OpReaddir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  DoReaddir(req, ino, size, off, false);
}
void OpReaddirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  DoReaddir(req, ino, size, off, true);
}
void OpReleasedir(fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, 0); }
void OpFsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info*) {
  fuse_reply_err(req, ToErrno(F(req)->Fsync(ToFs(req, ino), datasync != 0)));
}

void OpStatfs(fuse_req_t req, fuse_ino_t) {
  auto r = F(req)->StatFs();
  if (!r.ok()) return ReplyErr(req, r.status());
  struct statvfs s;
  std::memset(&s, 0, sizeof(s));
  s.f_bsize = r->bsize;
  s.f_frsize = r->bsize;
  s.f_blocks = r->blocks;
  s.f_bfree = r->bfree;
  s.f_bavail = r->bfree;
  s.f_files = r->files;
  s.f_ffree = r->ffree;
  s.f_favail = r->ffree;
  s.f_namemax = r->namemax;
  fuse_reply_statfs(req, &s);
}

void OpSetxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                int flags) {
  fuse_reply_err(req, ToErrno(F(req)->SetXattr(CallerOf(req, true), ToFs(req, ino), name,
                                               std::string_view(value, size), flags)));
}

void OpGetxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  auto r = F(req)->GetXattr(CallerOf(req), ToFs(req, ino), name);
  if (!r.ok()) return ReplyErr(req, r.status());
  if (size == 0) return (void)fuse_reply_xattr(req, r->size());
  if (r->size() > size) return (void)fuse_reply_err(req, ERANGE);
  fuse_reply_buf(req, r->data(), r->size());
}

void OpListxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  auto r = F(req)->ListXattr(CallerOf(req), ToFs(req, ino));
  if (!r.ok()) return ReplyErr(req, r.status());
  if (size == 0) return (void)fuse_reply_xattr(req, r->size());
  if (r->size() > size) return (void)fuse_reply_err(req, ERANGE);
  fuse_reply_buf(req, r->data(), r->size());
}

void OpRemovexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  fuse_reply_err(req, ToErrno(F(req)->RemoveXattr(CallerOf(req), ToFs(req, ino), name)));
}

void OpFallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, fuse_file_info*) {
  if (off < 0 || len <= 0) return (void)fuse_reply_err(req, EINVAL);
  fuse_reply_err(req, ToErrno(F(req)->Fallocate(CallerOf(req), ToFs(req, ino), mode,
                                                static_cast<uint64_t>(off),
                                                static_cast<uint64_t>(len))));
}

void OpLseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info*) {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) return (void)fuse_reply_err(req, EINVAL);
  if (off < 0) return (void)fuse_reply_err(req, ENXIO);
  auto r = F(req)->Lseek(ToFs(req, ino), static_cast<uint64_t>(off), whence);
  if (!r.ok()) return ReplyErr(req, r.status());
  fuse_reply_lseek(req, static_cast<off_t>(*r));
}

void OpCopyFileRange(fuse_req_t req, fuse_ino_t ino_in, off_t off_in, fuse_file_info*,
                     fuse_ino_t ino_out, off_t off_out, fuse_file_info*, size_t len, int flags) {
  if (flags != 0 || off_in < 0 || off_out < 0) return (void)fuse_reply_err(req, EINVAL);
  auto r = F(req)->CopyFileRange(CallerOf(req), ToFs(req, ino_in), static_cast<uint64_t>(off_in),
                                 ToFs(req, ino_out), static_cast<uint64_t>(off_out), len);
  if (!r.ok()) return ReplyErr(req, r.status());
  fuse_reply_write(req, *r);
}

fuse_lowlevel_ops MakeOps() {
  fuse_lowlevel_ops ops;
  std::memset(&ops, 0, sizeof(ops));
  ops.init = OpInit;
  ops.destroy = OpDestroy;
  ops.lookup = OpLookup;
  ops.forget = OpForget;
  ops.forget_multi = OpForgetMulti;
  ops.getattr = OpGetattr;
  ops.setattr = OpSetattr;
  ops.readlink = OpReadlink;
  ops.mknod = OpMknod;
  ops.mkdir = OpMkdir;
  ops.symlink = OpSymlink;
  ops.unlink = OpUnlink;
  ops.rmdir = OpRmdir;
  ops.rename = OpRename;
  ops.link = OpLink;
  ops.open = OpOpen;
  ops.create = OpCreate;
  ops.read = OpRead;
  ops.write = OpWrite;
  // Flush: data is never held back in the daemon; FLUSH carries the closing
  // process's lock_owner, whose POSIX locks go (free unless this node locked the file).
  ops.flush = OpFlush;
  ops.release = OpRelease;
  // getlk+setlk and flock make libfuse ask for FUSE_CAP_POSIX_LOCKS and
  // FUSE_CAP_FLOCK_LOCKS; OpInit leaves them set.
  ops.getlk = OpGetlk;
  ops.setlk = OpSetlk;
  ops.flock = OpFlock;
  ops.fsync = OpFsync;
  ops.opendir = OpOpendir;
  ops.readdir = OpReaddir;
  ops.readdirplus = OpReaddirplus;
  ops.releasedir = OpReleasedir;
  ops.fsyncdir = OpFsyncdir;
  ops.statfs = OpStatfs;
  ops.setxattr = OpSetxattr;
  ops.getxattr = OpGetxattr;
  ops.listxattr = OpListxattr;
  ops.removexattr = OpRemovexattr;
  ops.fallocate = OpFallocate;
  ops.lseek = OpLseek;
  ops.copy_file_range = OpCopyFileRange;
  return ops;
}

// The kernel caps a FUSE mount's readahead at the bdi default (128 KiB) whatever
// max_readahead says; sequential reads then arrive in 128 KiB requests. Raise it to
// match max_write. Best effort: an error only costs speed. The mount's device number
// comes from /proc/self/mountinfo: stat() on the mount point would send a request to
// this very daemon before it serves any (a self-deadlock).
void RaiseReadahead(const std::string& mountpoint) {
  char real[PATH_MAX];
  if (!realpath(mountpoint.c_str(), real)) return;
  FILE* mi = std::fopen("/proc/self/mountinfo", "r");
  if (!mi) return;
  char line[4096];
  std::string dev;
  while (std::fgets(line, sizeof(line), mi)) {
    // id parent major:minor root mountpoint ...
    char devbuf[64], root[PATH_MAX], mp[PATH_MAX];
    int id, parent;
    if (std::sscanf(line, "%d %d %63s %4095s %4095s", &id, &parent, devbuf, root, mp) == 5 &&
        std::strcmp(mp, real) == 0) {
      dev = devbuf;  // the last match is the newest mount
    }
  }
  std::fclose(mi);
  if (dev.empty()) return;
  FILE* f = std::fopen(("/sys/class/bdi/" + dev + "/read_ahead_kb").c_str(), "w");
  if (!f) return;
  std::fprintf(f, "1024\n");
  std::fclose(f);
}

}  // namespace

int RunFuse(Filesystem* fs, const FuseOptions& opts) {
  Ctx ctx{fs, opts};
  AppLockServer locks(fs);
  ctx.locks = &locks;
  std::vector<std::string> argv_s = {"agorafs", "-o", "default_permissions",
                                     "-o", "fsname=" + opts.fsname, "-o", "subtype=agorafs"};
  if (opts.allow_other) {
    argv_s.push_back("-o");
    argv_s.push_back("allow_other");
  }
  for (const auto& e : opts.extra) {
    argv_s.push_back("-o");
    argv_s.push_back(e);
  }
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  fuse_lowlevel_ops ops = MakeOps();
  fuse_session* se = fuse_session_new(&args, &ops, sizeof(ops), &ctx);
  fuse_opt_free_args(&args);  // libfuse may have copied and extended the list
  if (!se) {
    std::fprintf(stderr, "agorafs: could not create the FUSE session\n");
    return 1;
  }
  ctx.se = se;
  fs->SetLockLossHook([c = &ctx] { InvalidateKernelCaches(c); });
  int rc = 1;
  if (fuse_set_signal_handlers(se) == 0) {
    if (fuse_session_mount(se, opts.mountpoint.c_str()) == 0) {
      if (opts.ready_fd >= 0) {
        ssize_t w = write(opts.ready_fd, "0\n", 2);
        (void)w;
        close(opts.ready_fd);
      }
      if (opts.detach_stderr_to >= 0) dup2(opts.detach_stderr_to, 2);
      RaiseReadahead(opts.mountpoint);
      fuse_loop_config* cfg = fuse_loop_cfg_create();
      fuse_loop_cfg_set_max_threads(cfg, opts.max_threads);
      // Keep every worker once started. libfuse starts one whenever no idle worker is
      // left and ends one whenever more than idle_threads are idle; with a small
      // limit, each close (FLUSH, then RELEASE overlapping the next LOOKUP) created
      // and destroyed a thread: 5,802 clone3 calls for 5,000 creates. Workers are
      // capped at max_threads, so this costs at most that many request buffers.
      fuse_loop_cfg_set_idle_threads(cfg, opts.max_threads);
      rc = fuse_session_loop_mt(se, cfg);
      locks.Stop();  // answers pending lock waits (EINTR) while the session is up
      // libfuse reports the signal that ended the loop; SIGTERM/INT/HUP is a clean end.
      if (rc == SIGTERM || rc == SIGINT || rc == SIGHUP) rc = 0;
      fuse_loop_cfg_destroy(cfg);
      fs->SetLockLossHook(nullptr);  // nothing cached survives the unmount
      fuse_session_unmount(se);
    } else {
      std::fprintf(stderr, "agorafs: could not mount on %s\n", opts.mountpoint.c_str());
    }
    fuse_remove_signal_handlers(se);
  }
  fs->SetLockLossHook(nullptr);
  fuse_session_destroy(se);
  return rc == 0 ? 0 : 1;
}

}  // namespace agorafs
