// fusefloor: the FUSE floor behind bench/single-node's "floor" column.
//
//   fusefloor MOUNTPOINT        mounts, stays in the foreground until unmounted
//
// A filesystem that keeps its tree in memory and does nothing else: no disk, no journal,
// no locks, one mutex. It talks to the kernel the way the agorafs daemon does (libfuse3
// low-level API, the same multithreaded loop settings, the same capabilities asked for in
// init (src/fuse/fuse_conn.h, shared with agorafs), default_permissions, entries and attributes cached by the kernel, negative
// entries too), so the metadata workloads cause the same requests. What it achieves is
// what the kernel's FUSE path allows any filesystem on this machine: the ceiling for
// agorafs's metadata numbers.
//
// File contents are not kept: a write grows the size and is dropped, a read returns
// zeros. Only the workloads of bench/single-node are supported (no links, symlinks,
// renames or xattrs: those return ENOSYS, or ENODATA for getxattr). Not a test double:
// nothing in the tests or in agorafs uses it.
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "fuse/fuse_conn.h"  // agorafs's INIT settings

namespace {

constexpr double kTimeout = 86400.0;  // agorafs hands out timeouts as long as its lease

struct Node {
  fuse_ino_t ino = 0;
  struct stat st {};
  uint64_t lookups = 0;  // the kernel's references
  // Directories: name -> (ino, cookie) and cookie -> name, so that readdir offsets stay
  // valid while entries are removed (rm -rf reads and unlinks at once).
  std::unordered_map<std::string, std::pair<fuse_ino_t, uint64_t>> names;
  std::map<uint64_t, std::string> order;
  uint64_t next_cookie = 3;  // 1 and 2 are "." and ".."
  fuse_ino_t parent = FUSE_ROOT_ID;
};

std::mutex mu;
std::unordered_map<fuse_ino_t, std::unique_ptr<Node>> nodes;
fuse_ino_t next_ino = FUSE_ROOT_ID + 1;

timespec Now() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

Node* Get(fuse_ino_t ino) {
  auto it = nodes.find(ino);
  return it == nodes.end() ? nullptr : it->second.get();
}

void Touch(Node* n, bool mtime) {
  timespec t = Now();
  n->st.st_ctim = t;
  if (mtime) n->st.st_mtim = t;
}

Node* NewNode(mode_t mode, const fuse_ctx* c, fuse_ino_t parent) {
  auto n = std::make_unique<Node>();
  n->ino = next_ino++;
  n->parent = parent;
  n->st.st_ino = n->ino;
  n->st.st_mode = mode;
  n->st.st_nlink = S_ISDIR(mode) ? 2 : 1;
  n->st.st_uid = c->uid;
  n->st.st_gid = c->gid;
  n->st.st_blksize = 4096;
  n->st.st_atim = n->st.st_mtim = n->st.st_ctim = Now();
  Node* p = n.get();
  nodes.emplace(p->ino, std::move(n));
  return p;
}

void FillEntry(Node* n, fuse_entry_param* e) {
  std::memset(e, 0, sizeof(*e));
  e->ino = n->ino;
  e->generation = 1;
  e->attr = n->st;
  e->attr_timeout = kTimeout;
  e->entry_timeout = kTimeout;
}

void MaybeFree(Node* n) {
  if (n->lookups == 0 && n->st.st_nlink == 0) nodes.erase(n->ino);
}

void Init(void*, fuse_conn_info* conn) { agorafs::WantAgorafsCapabilities(conn); }

void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  std::lock_guard<std::mutex> lk(mu);
  Node* p = Get(parent);
  if (!p) return (void)fuse_reply_err(req, ENOENT);
  auto it = p->names.find(name);
  fuse_entry_param e;
  if (it == p->names.end()) {
    std::memset(&e, 0, sizeof(e));
    e.entry_timeout = kTimeout;  // a cached negative entry, as agorafs gives
    fuse_reply_entry(req, &e);
    return;
  }
  Node* n = Get(it->second.first);
  FillEntry(n, &e);
  n->lookups++;
  fuse_reply_entry(req, &e);
}

void Forget1(fuse_ino_t ino, uint64_t k) {
  Node* n = Get(ino);
  if (!n || ino == FUSE_ROOT_ID) return;
  n->lookups -= std::min(n->lookups, k);
  MaybeFree(n);
}

void Forget(fuse_req_t req, fuse_ino_t ino, uint64_t k) {
  {
    std::lock_guard<std::mutex> lk(mu);
    Forget1(ino, k);
  }
  fuse_reply_none(req);
}

void ForgetMulti(fuse_req_t req, size_t count, fuse_forget_data* f) {
  {
    std::lock_guard<std::mutex> lk(mu);
    for (size_t i = 0; i < count; i++) Forget1(f[i].ino, f[i].nlookup);
  }
  fuse_reply_none(req);
}

void Getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  std::lock_guard<std::mutex> lk(mu);
  Node* n = Get(ino);
  if (!n) return (void)fuse_reply_err(req, ENOENT);
  fuse_reply_attr(req, &n->st, kTimeout);
}

void Setattr(fuse_req_t req, fuse_ino_t ino, struct stat* a, int to_set, fuse_file_info*) {
  std::lock_guard<std::mutex> lk(mu);
  Node* n = Get(ino);
  if (!n) return (void)fuse_reply_err(req, ENOENT);
  if (to_set & FUSE_SET_ATTR_MODE) n->st.st_mode = (n->st.st_mode & S_IFMT) | (a->st_mode & 07777);
  if (to_set & FUSE_SET_ATTR_UID) n->st.st_uid = a->st_uid;
  if (to_set & FUSE_SET_ATTR_GID) n->st.st_gid = a->st_gid;
  if (to_set & FUSE_SET_ATTR_SIZE) n->st.st_size = a->st_size;
  if (to_set & FUSE_SET_ATTR_ATIME) n->st.st_atim = a->st_atim;
  if (to_set & FUSE_SET_ATTR_ATIME_NOW) n->st.st_atim = Now();
  if (to_set & FUSE_SET_ATTR_MTIME) n->st.st_mtim = a->st_mtim;
  if (to_set & FUSE_SET_ATTR_MTIME_NOW) n->st.st_mtim = Now();
  n->st.st_ctim = Now();
  fuse_reply_attr(req, &n->st, 0);  // agorafs does not cache a setattr reply either
}

// mknod, mkdir and create: a new name in `parent`, its entry in `e` (the kernel's
// reference counted); 0 or the errno to answer.
int Add(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_entry_param* e) {
  std::lock_guard<std::mutex> lk(mu);
  Node* p = Get(parent);
  if (!p) return ENOENT;
  if (!S_ISDIR(p->st.st_mode)) return ENOTDIR;
  if (std::strlen(name) > 255) return ENAMETOOLONG;
  if (p->names.count(name)) return EEXIST;
  const fuse_ctx* c = fuse_req_ctx(req);
  // The kernel leaves the umask to the filesystem (FUSE_CAP_DONT_MASK), as for agorafs.
  Node* n = NewNode((mode & S_IFMT) | (mode & 07777 & ~c->umask), c, parent);
  uint64_t cookie = p->next_cookie++;
  p->names.emplace(name, std::make_pair(n->ino, cookie));
  p->order.emplace(cookie, name);
  if (S_ISDIR(mode)) p->st.st_nlink++;
  Touch(p, true);
  n->lookups++;
  FillEntry(n, e);
  return 0;
}

void Mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t) {
  fuse_entry_param e;
  if (int err = Add(req, parent, name, mode, &e)) return (void)fuse_reply_err(req, err);
  fuse_reply_entry(req, &e);
}

void Mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  Mknod(req, parent, name, S_IFDIR | (mode & 07777), 0);
}

void Create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) {
  fuse_entry_param e;
  if (int err = Add(req, parent, name, mode, &e)) return (void)fuse_reply_err(req, err);
  fi->keep_cache = 0;
  fuse_reply_create(req, &e, fi);
}

void Remove(fuse_req_t req, fuse_ino_t parent, const char* name, bool dir) {
  std::lock_guard<std::mutex> lk(mu);
  Node* p = Get(parent);
  if (!p) return (void)fuse_reply_err(req, ENOENT);
  auto it = p->names.find(name);
  if (it == p->names.end()) return (void)fuse_reply_err(req, ENOENT);
  Node* n = Get(it->second.first);
  if (dir != S_ISDIR(n->st.st_mode)) return (void)fuse_reply_err(req, dir ? ENOTDIR : EISDIR);
  if (dir && !n->names.empty()) return (void)fuse_reply_err(req, ENOTEMPTY);
  p->order.erase(it->second.second);
  p->names.erase(it);
  if (dir) p->st.st_nlink--;
  Touch(p, true);
  n->st.st_nlink = 0;
  Touch(n, false);
  MaybeFree(n);
  fuse_reply_err(req, 0);
}

void Unlink(fuse_req_t req, fuse_ino_t parent, const char* name) { Remove(req, parent, name, false); }
void Rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) { Remove(req, parent, name, true); }

void Open(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  fi->keep_cache = 0;
  fuse_reply_open(req, fi);
}

void Read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  off_t end;
  {
    std::lock_guard<std::mutex> lk(mu);
    Node* n = Get(ino);
    if (!n) return (void)fuse_reply_err(req, ENOENT);
    end = n->st.st_size;
  }
  size_t len = off >= end ? 0 : std::min<size_t>(size, static_cast<size_t>(end - off));
  std::vector<char> zeros(len);
  fuse_reply_buf(req, zeros.data(), len);
}

void Write(fuse_req_t req, fuse_ino_t ino, const char*, size_t size, off_t off, fuse_file_info*) {
  std::lock_guard<std::mutex> lk(mu);
  Node* n = Get(ino);
  if (!n) return (void)fuse_reply_err(req, ENOENT);
  if (off + static_cast<off_t>(size) > n->st.st_size) n->st.st_size = off + static_cast<off_t>(size);
  n->st.st_blocks = (n->st.st_size + 511) / 512;
  Touch(n, true);
  fuse_reply_write(req, size);
}

void ReplyZero(fuse_req_t req) { fuse_reply_err(req, 0); }
void Flush(fuse_req_t req, fuse_ino_t, fuse_file_info*) { ReplyZero(req); }
void Release(fuse_req_t req, fuse_ino_t, fuse_file_info*) { ReplyZero(req); }
void Fsync(fuse_req_t req, fuse_ino_t, int, fuse_file_info*) { ReplyZero(req); }
void Opendir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) { fuse_reply_open(req, fi); }
void Releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info*) { ReplyZero(req); }

void Readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, bool plus) {
  std::lock_guard<std::mutex> lk(mu);
  Node* d = Get(ino);
  if (!d) return (void)fuse_reply_err(req, ENOENT);
  std::vector<char> buf(size);
  size_t used = 0;
  auto add = [&](const char* name, Node* n, off_t next, bool counted) {
    size_t room = size - used;
    size_t need;
    if (plus) {
      fuse_entry_param e;
      FillEntry(n, &e);
      need = fuse_add_direntry_plus(req, buf.data() + used, room, name, &e, next);
      if (need <= room && counted) n->lookups++;
    } else {
      need = fuse_add_direntry(req, buf.data() + used, room, name, &n->st, next);
    }
    if (need > room) return false;
    used += need;
    return true;
  };
  if (off < 1 && !add(".", d, 1, false)) return (void)fuse_reply_buf(req, buf.data(), used);
  if (off < 2) {
    Node* p = Get(d->parent);
    if (!add("..", p ? p : d, 2, false)) return (void)fuse_reply_buf(req, buf.data(), used);
  }
  for (auto it = d->order.upper_bound(static_cast<uint64_t>(std::max<off_t>(off, 2)));
       it != d->order.end(); ++it) {
    Node* n = Get(d->names.at(it->second).first);
    if (!add(it->second.c_str(), n, static_cast<off_t>(it->first), true)) break;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void ReaddirPlain(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  Readdir(req, ino, size, off, false);
}
void ReaddirPlus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  Readdir(req, ino, size, off, true);
}
void Fsyncdir(fuse_req_t req, fuse_ino_t, int, fuse_file_info*) { ReplyZero(req); }

void Statfs(fuse_req_t req, fuse_ino_t) {
  struct statvfs s {};
  s.f_bsize = s.f_frsize = 4096;
  s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20;
  s.f_files = s.f_ffree = s.f_favail = 1 << 20;
  s.f_namemax = 255;
  fuse_reply_statfs(req, &s);
}

// No xattrs: an ACL query answered "none" (ENOSYS would switch the kernel's xattr
// requests off altogether, which agorafs does not do).
void Getxattr(fuse_req_t req, fuse_ino_t, const char*, size_t) { fuse_reply_err(req, ENODATA); }
void Listxattr(fuse_req_t req, fuse_ino_t, size_t size) {
  if (size == 0) return (void)fuse_reply_xattr(req, 0);
  fuse_reply_buf(req, nullptr, 0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fusefloor MOUNTPOINT\n");
    return 2;
  }
  auto root = std::make_unique<Node>();
  root->ino = FUSE_ROOT_ID;
  root->st.st_ino = FUSE_ROOT_ID;
  root->st.st_mode = S_IFDIR | 0755;
  root->st.st_nlink = 2;
  root->st.st_blksize = 4096;
  root->st.st_atim = root->st.st_mtim = root->st.st_ctim = Now();
  nodes.emplace(FUSE_ROOT_ID, std::move(root));

  fuse_lowlevel_ops ops {};
  ops.init = Init;
  ops.lookup = Lookup;
  ops.forget = Forget;
  ops.forget_multi = ForgetMulti;
  ops.getattr = Getattr;
  ops.setattr = Setattr;
  ops.mknod = Mknod;
  ops.mkdir = Mkdir;
  ops.create = Create;
  ops.unlink = Unlink;
  ops.rmdir = Rmdir;
  ops.open = Open;
  ops.read = Read;
  ops.write = Write;
  ops.flush = Flush;
  ops.release = Release;
  ops.fsync = Fsync;
  ops.opendir = Opendir;
  ops.readdir = ReaddirPlain;
  ops.readdirplus = ReaddirPlus;
  ops.releasedir = Releasedir;
  ops.fsyncdir = Fsyncdir;
  ops.statfs = Statfs;
  ops.getxattr = Getxattr;
  ops.listxattr = Listxattr;

  char a0[] = "fusefloor", o[] = "-o", perm[] = "default_permissions",
       name[] = "fsname=fusefloor,subtype=fusefloor";
  char* args_v[] = {a0, o, perm, o, name};
  fuse_args args = FUSE_ARGS_INIT(5, args_v);
  fuse_session* se = fuse_session_new(&args, &ops, sizeof(ops), nullptr);
  if (!se) return 1;
  int rc = 1;
  if (fuse_set_signal_handlers(se) == 0) {
    if (fuse_session_mount(se, argv[1]) == 0) {
      fuse_loop_config* cfg = fuse_loop_cfg_create();
      fuse_loop_cfg_set_max_threads(cfg, 8);    // agorafs's default max_threads
      fuse_loop_cfg_set_idle_threads(cfg, 8);   // and it keeps every worker
      rc = fuse_session_loop_mt(se, cfg);
      fuse_loop_cfg_destroy(cfg);
      fuse_session_unmount(se);
    }
    fuse_remove_signal_handlers(se);
  }
  fuse_session_destroy(se);
  return rc == 0 || rc == SIGTERM || rc == SIGINT || rc == SIGHUP ? 0 : 1;
}
