// Open-file tables (docs/FORMAT.md "Node slot", docs/DESIGN.md "Orphans and
// open-unlinked files"): the inodes a node had open when it last let the filesystem
// lock go, in blocks kSlotOpen.. of its slot. Only the slot's node writes its table;
// any node reads them. Encoding and decoding only: Filesystem decides when.
#pragma once

#include <cstdint>
#include <vector>

#include "util/status.h"
#include "device/block_device.h"
#include "format/format.h"

namespace agorafs {

// Blocks in use for a table of `n` inodes (at least 1).
uint32_t OpenTableBlocks(size_t n);

// Fills `buf` (OpenTableBlocks(inos.size()) blocks, or kSlotOpenBlocks when the list
// is longer: then only the first ones are written and the overflow flag is set) with
// the table of `slot`, sealed; returns the number of blocks to write.
uint32_t EncodeOpenTable(const Geometry& g, const Uuid& uuid, uint32_t slot, uint64_t generation,
                         uint64_t publication, const std::vector<uint64_t>& inos, uint8_t* buf);

enum class OpenTableState {
  kNothing,   // zero, or written by an earlier occupant of the slot: nothing open
  kListed,    // `inos` holds what the node had open
  kAnything,  // overflowed, damaged or torn: assume any inode is open there
};
// Reads the table of `slot`, whose heartbeat block names `generation`. I/O errors
// are returned; everything the blocks may say is a state.
Result<OpenTableState> ReadOpenTable(BlockDevice* dev, const Geometry& g, const Uuid& uuid,
                                     uint32_t slot, uint64_t generation,
                                     std::vector<uint64_t>* inos);

}  // namespace agorafs
