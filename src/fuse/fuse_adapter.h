// FUSE adapter: the libfuse3 low-level operations table over Filesystem.
//
// Each handler converts the request into a Filesystem call and the result into a
// reply; errno appears only here (errno_map.h). The adapter keeps FUSE's lookup
// counts exactly: every reply that hands the kernel an entry adds a reference
// (Filesystem::AddRef), every forget drops them.
//
// Caching: other nodes change the filesystem at any time.
// - Attributes: a reply hands the kernel a timeout (up to attr_timeout, default 60 s,
//   never beyond the node's remaining lease) only for attributes read under the
//   current hold of the filesystem lock (Attr::lock_epoch == Filesystem::lock_epoch),
//   and the inode is remembered (Filesystem::MarkAttrsCached). When the node gives the
//   lock up, the lock-loss hook invalidates every remembered inode
//   (fuse_lowlevel_notify_inval_inode with offset -1: attributes only, which takes no
//   page or inode lock, so it cannot wait for a request that waits for the lock) before
//   the lock moves. The check, the mark and the reply write happen under reply_mu
//   shared and the hook runs under it exclusive, so every reply that promised a
//   timeout lands before the invalidation that takes it back. readdirplus attributes
//   get no timeout (its reply is built inside the filesystem call), nor do setattr
//   replies (older kernels apply them even after an invalidation). A regular file
//   gets one only while this node does not have it open, and opening a marked file
//   invalidates it first: an invalidation racing the getattr of a read(2) would make
//   the kernel discard the reply and serve that read from old pages, so open files
//   are never invalidated. While a file is open each read(2) asks for its attributes
//   and the kernel drops stale pages (docs/DESIGN.md, "The kernel's caches").
// - Entries (names, found or not found) get a timeout the same way (up to
//   entry_timeout, default 60 s, never beyond the lease), read under the current lock
//   epoch, but only when the kernel supports FUSE_NOTIFY_INC_EPOCH (Linux 6.16; probed
//   by sending one during INIT, before any name exists: a name stamped before the
//   current epoch is dropped at its next use with everything cached below it). The
//   hook then sends one more, which makes the kernel drop every name it looked up
//   before it, without taking any inode lock.
//   (fuse_lowlevel_notify_inval_entry would take the parent directory's inode lock,
//   which a create waiting for the filesystem lock may hold: a deadlock from the
//   revoke path.) The kernel stamps each name with its epoch before it sends the
//   request, so a reply written before the hook's notification is dropped by it. On
//   older kernels names are not cached and every path walk asks the daemon.
//   readdirplus names get no timeout: the kernel stamps them only after the reply.
// - File pages are cached but dropped at every open, and (FUSE_CAP_AUTO_INVAL_DATA)
//   when the getattr that follows an attribute invalidation shows another mtime or
//   size; Filesystem makes mtime move forward on every data change.
//
// Application locks (flock, fcntl): getlk/setlk/flock and flush/release go to an
// AppLockServer (applock_fuse.h), which answers blocking waits from its own thread.
//
// Thread-safety: handlers run concurrently on libfuse's worker threads; Filesystem is
// thread-safe.
#pragma once

#include <string>
#include <vector>

#include "fs/filesystem.h"

namespace agorafs {

struct FuseOptions {
  std::string mountpoint;
  std::string fsname;              // shown in /proc/mounts
  bool allow_other = false;
  bool foreground = true;          // the CLI daemonises before calling RunFuse
  double attr_timeout = 60.0;  // upper bound; 0 = the kernel caches no attributes
  double entry_timeout = 60.0;  // upper bound; 0 = the kernel caches no names
  unsigned max_threads = 8;        // each keeps a 1 MiB request buffer
  std::vector<std::string> extra;  // extra -o options passed to libfuse
  int ready_fd = -1;               // written "0\n" once mounted, then closed
  int detach_stderr_to = -1;       // once mounted, stderr is redirected to this fd
};

// Mounts, serves until unmounted or SIGTERM/SIGINT, then returns. Returns 0 on a clean
// end, non-zero when the mount failed (with a message on stderr).
int RunFuse(Filesystem* fs, const FuseOptions& opts);

}  // namespace agorafs
