// Superblock handling and mkfs.
//
// ReadSuperblock: finds a valid superblock (block 0, else its copies at block 1 and
// at the last block), verifies it and its layout against the device. Failures are
// one clear sentence for the administrator: an empty (zeroed) device, another
// filesystem (ext2/3/4, XFS, ...), a corrupt superblock, a device smaller than the
// filesystem, an unsupported version or feature.
//
// Mkfs: writes a fresh filesystem: node slots, one journal per slot, allocation
// groups with their bitmaps, the root directory and the three superblock copies
// (last, after a flush, so an interrupted mkfs never leaves a half-made filesystem
// that looks valid). Refuses to overwrite a recognised filesystem unless `force`.
//
// Thread-safety: functions; the caller owns the device exclusively during Mkfs.
#pragma once

#include <string>

#include "device/block_device.h"
#include "format/format.h"

namespace agorafs {

Result<Superblock> ReadSuperblock(BlockDevice* dev);
Uuid SuperUuid(const Superblock& sb);
std::string UuidString(const Uuid& u);

struct MkfsOptions {
  MkfsParams params;          // total_blocks is taken from the device when 0
  std::string label;
  bool force = false;
  uint32_t root_uid = 0;
  uint32_t root_gid = 0;
};

// Returns the written superblock.
Result<Superblock> Mkfs(BlockDevice* dev, const MkfsOptions& opts);

// What is on the device, for mkfs's refusal message: "agorafs filesystem ...",
// "ext4 filesystem", ... or empty when nothing recognised.
std::string DetectExisting(BlockDevice* dev);

}  // namespace agorafs
