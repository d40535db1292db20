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
//   get no timeout (its reply is built inside the filesystem call).
// - Entries (names) are not cached (entry timeout 0): invalidating a name takes the
//   parent directory's inode lock in the kernel, which a create waiting for the
//   filesystem lock may hold. Every path walk asks the daemon with a LOOKUP.
// - File pages are cached but dropped at every open, and (FUSE_CAP_AUTO_INVAL_DATA)
//   when the getattr that follows an attribute invalidation shows another mtime or
//   size; Filesystem makes mtime move forward on every data change.
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
  unsigned max_threads = 8;        // each keeps a 1 MiB request buffer
  std::vector<std::string> extra;  // extra -o options passed to libfuse
  int ready_fd = -1;               // written "0\n" once mounted, then closed
  int detach_stderr_to = -1;       // once mounted, stderr is redirected to this fd
};

// Mounts, serves until unmounted or SIGTERM/SIGINT, then returns. Returns 0 on a clean
// end, non-zero when the mount failed (with a message on stderr).
int RunFuse(Filesystem* fs, const FuseOptions& opts);

}  // namespace agorafs
