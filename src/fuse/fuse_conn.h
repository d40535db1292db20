// The FUSE connection settings agorafs asks for in INIT, in one place so that
// bench/fusefloor.cc (the FUSE floor of bench/single-node) mounts exactly as agorafs
// does and measures the same kernel path.
//
// Contract
// - WantAgorafsCapabilities(conn) sets max_write and max_readahead to 1 MiB and asks
//   for what agorafs relies on when the kernel offers it: parallel directory
//   operations, readdirplus (also adaptive), async direct I/O, automatic page-cache
//   invalidation on a changed mtime or size, POSIX ACLs and no umask applied by the
//   kernel; it turns splice reads and the writeback cache off.
// - Include <fuse_lowlevel.h> (with FUSE_USE_VERSION set) before this header.
#pragma once

namespace agorafs {

inline void WantAgorafsCapabilities(fuse_conn_info* conn) {
  conn->max_write = 1 << 20;
  conn->max_readahead = 1 << 20;
  if (conn->capable & FUSE_CAP_SPLICE_READ) conn->want &= ~FUSE_CAP_SPLICE_READ;
  if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
  if (conn->capable & FUSE_CAP_READDIRPLUS) conn->want |= FUSE_CAP_READDIRPLUS;
  if (conn->capable & FUSE_CAP_READDIRPLUS_AUTO) conn->want |= FUSE_CAP_READDIRPLUS_AUTO;
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  // Kernel writeback caching would hide writes from other nodes; not used.
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  // Cached pages are dropped when a getattr shows another mtime or size (a read asks
  // whenever the attributes are not cached: after every loss of the filesystem lock,
  // see fuse_adapter.h): how other nodes' writes become visible.
  if (conn->capable & FUSE_CAP_AUTO_INVAL_DATA) conn->want |= FUSE_CAP_AUTO_INVAL_DATA;
  // POSIX ACLs: the kernel checks permissions against the ACL xattrs it reads from us
  // (and forgets them whenever it refreshes the attributes, so another node's setfacl
  // counts as soon as its chmod would); umask is left to us, which applies it only when
  // the parent has no default ACL (acl(5)).
  if (conn->capable & FUSE_CAP_POSIX_ACL) conn->want |= FUSE_CAP_POSIX_ACL;
  if (conn->capable & FUSE_CAP_DONT_MASK) conn->want |= FUSE_CAP_DONT_MASK;
}

}  // namespace agorafs
