// FUSE adapter: the libfuse3 low-level operations table over Filesystem.
//
// Each handler converts the request into a Filesystem call and the result into a
// reply; errno appears only here (errno_map.h). The adapter keeps FUSE's lookup
// counts exactly: every reply that hands the kernel an entry adds a reference
// (Filesystem::AddRef), every forget drops them.
//
// Caching: other nodes change the filesystem at any time, so by default the kernel
// caches no attributes and no entries (every stat and path walk asks the daemon,
// which answers from its own cache while it holds the filesystem lock). File pages
// are cached but dropped at every open, and (FUSE_CAP_AUTO_INVAL_DATA) whenever the
// getattr that precedes each read shows another mtime or size; Filesystem makes
// mtime move forward on every data change. `attr_timeout=` trades this for speed.
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
  double attr_timeout = 0.0;
  double entry_timeout = 0.0;
  unsigned max_threads = 8;        // each keeps a 1 MiB request buffer
  std::vector<std::string> extra;  // extra -o options passed to libfuse
  int ready_fd = -1;               // written "0\n" once mounted, then closed
  int detach_stderr_to = -1;       // once mounted, stderr is redirected to this fd
};

// Mounts, serves until unmounted or SIGTERM/SIGINT, then returns. Returns 0 on a clean
// end, non-zero when the mount failed (with a message on stderr).
int RunFuse(Filesystem* fs, const FuseOptions& opts);

}  // namespace agorafs
