// NbdDevice: BlockDevice over an NBD export, through libnbd (see block_device.h).
//
// Contract (in addition to BlockDevice's)
// - The device is named by a libnbd URI: nbd://host[:port]/export, nbds://... (TLS),
//   nbd+unix:///export?socket=PATH. Name() is that URI.
// - Size() is the export size, fixed at open. OpenOptions::create cannot grow an
//   export: it is accepted when create_size <= the export size and is kInvalid
//   otherwise. OpenOptions::direct is ignored (the server decides its own caching).
// - Durability. The server must offer NBD_CMD_FLUSH or FUA, otherwise a writable open
//   fails with kNotSupported: the journal's write/Flush/write/Flush ordering cannot be
//   honoured by a server that promises nothing. With flush support, Write is a plain
//   write and Flush is NBD_CMD_FLUSH. With FUA only, every Write carries FUA (durable
//   on return) and Flush has nothing to do. A read-only open needs neither.
//   A writable open of a read-only export is kReadOnly.
// - Concurrency. Every method may be called from any thread. One libnbd handle serves
//   one call at a time (a WriteBatch, and a Read or Write larger than the server's
//   maximum request, which is split, keeps up to 64 commands in flight on it), so the
//   device keeps a pool of NbdOptions::connections handles; a call takes an idle
//   handle if there is one (starting from a round-robin position) and otherwise
//   queues on the round-robin one. Several connections are only used when the server advertises multi-conn
//   (NBD_FLAG_CAN_MULTI_CONN): only then does a flush on one connection cover writes
//   completed on the others, and only then are writes on one connection promptly
//   visible to reads on another. Without multi-conn the pool has one handle and a
//   warning is logged. (Other nodes reading the same export through their own
//   connections need the same server property; nbdkit's file plugin has it.)
// - Errors. Every failure is a Status naming the URI, the operation and the offset:
//   a server-reported error is kIOError (ENOSPC from the server is kNoSpace) and the
//   connection stays usable; a batch stops sending after one and returns it once its
//   writes already sent have finished. Open errors: bad URI kInvalid, missing socket
//   kNotFound, refused or unreachable server kIOError.
// - Lost server (fail-stop). If a connection dies (server exited or crashed, socket
//   closed, protocol error) or a request times out, the device is failed: that request
//   and every later call return kIOError ("connection lost"), and the device must be
//   reopened. There is no transparent reconnect, because writes acknowledged but not
//   yet flushed on the dead connection may be gone and a later Flush on a new one
//   would wrongly report them durable.
// - Timeouts. libnbd has none. With NbdOptions::timeout_ms == 0 (the default, and
//   what OpenDevice uses) a request to a server that is alive but stuck (paused,
//   wedged, TCP peer silently gone) waits for ever, exactly as a request to a hung
//   local disk would. With timeout_ms > 0 a request not answered in time fails the
//   device as above; its connection is closed abruptly, so a timed-out write may
//   still have reached the disk.
// - Requests larger than the server's maximum block size (or 32 MiB) are split.
//   A server whose minimum block size exceeds 512 is refused at open (kNotSupported).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "device/block_device.h"

namespace agorafs {

struct NbdOptions {
  unsigned connections = 4;  // pool size (1..64); 1 when the server lacks multi-conn
  uint32_t timeout_ms = 0;   // per request; 0 = wait for ever
};

// True for specs libnbd should open: nbd://, nbds://, nbd+unix://, nbds+unix://.
bool IsNbdUri(const std::string& spec);

Result<std::unique_ptr<BlockDevice>> OpenNbdDevice(const std::string& uri,
                                                   const OpenOptions& opts,
                                                   const NbdOptions& nopts = {});

}  // namespace agorafs
