// Device guard: what mkfs, mount and fsck --repair check before they write a device.
//
// Contract
// - CheckDeviceUse(path, opts) returns OK when nothing below applies, else one error
//   whose message names the device and what to do:
//   - kBusy: the kernel uses the device. A block device (or one of its partitions)
//     that appears in /proc/self/mountinfo or has holders in sysfs (device-mapper, md,
//     bcache...); a regular file that backs a loop device which is mounted or held.
//     Writing it would corrupt a filesystem the kernel has mounted, and that
//     filesystem would overwrite agorafs's blocks.
//   - kPermission: the file or block device is writable by every local user (o+w),
//     unless opts.allow_world_writable. Whoever can write the device can destroy the
//     filesystem and impersonate any node (docs/SECURITY.md).
// - NBD URIs are not checked (the device is the server's; see docs/SECURITY.md). A path
//   that cannot be stat'ed passes: opening it reports the error.
// - Other agorafs nodes on this host (FUSE mounts) do not count as users: several nodes
//   may share one device by design.
// - Reads only /proc and /sys; no device is opened.
#pragma once

#include <string>

#include "util/status.h"

namespace agorafs {

struct DeviceUseOptions {
  bool allow_world_writable = false;
};

Status CheckDeviceUse(const std::string& path, const DeviceUseOptions& opts);

}  // namespace agorafs
