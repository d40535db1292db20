// Shared pieces of the libFuzzer targets (fuzz/README.md).
//
// - BaseImages(): two small real filesystems built once per process by mkfs on a
//   MemDevice and populated through the real Filesystem (files inline and with an
//   extent tree of depth 1, a hashed directory of several leaves, symlinks short and
//   long, a hard link, a fifo, inline and external xattrs). `clean` was unmounted
//   cleanly; `crashed` adds more work that was committed to the journal of slot 0 but
//   never written home (the node died), with its slot marked free again so that fsck
//   does not wait for a heartbeat.
// - OverlayDevice: a BlockDevice over a shared, read-only base image; writes go into
//   a private overlay, so every fuzz input starts from the same image without copying
//   it.
// - Walk(): the read-only path a mount takes for readdir, lookup, getattr, read,
//   readlink and getxattr, over any MetaTxn, bounded in work.
// - Seed mode: every target writes its seed corpus (from the base images) into the
//   directory named by AGORAFS_FUZZ_WRITE_SEEDS and exits, when that variable is set.
//
// Thread-safety: the targets are single-threaded; BaseImages() builds once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "cache/meta_txn.h"
#include "device/block_device.h"
#include "format/format.h"

namespace agorafs::fuzz {

struct Images {
  std::vector<uint8_t> clean;
  std::vector<uint8_t> crashed;
  Superblock sb{};
  Geometry g{};
  Uuid uuid{};
  // Blocks of `clean` / `crashed` that carry a block header, except slot heartbeats
  // (a heartbeat marked mounted makes fsck wait for the node: not a decoder path) and
  // the other cluster blocks (read only by a mounted node; their number varies).
  std::vector<uint64_t> clean_meta;
  std::vector<uint64_t> crashed_meta;
  // Interesting inodes of `clean` (root, directories big and small, files with
  // inline data and with an extent tree, symlinks, xattrs).
  std::vector<uint64_t> inodes;
};

// Builds the images at the first call (aborts if that fails: a harness bug). It
// also replaces the directory name hash for the whole process by one that ignores
// each directory's random seed (dir::SetHashFnForTesting), so that the images'
// layout, and with it what a saved input damages, is the same in every run; call
// it before decoding any directory.
const Images& BaseImages();

class OverlayDevice final : public BlockDevice {
 public:
  explicit OverlayDevice(const std::vector<uint8_t>* base) : base_(base) {}
  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status Flush() override { return Status::Ok(); }
  uint64_t Size() const override { return base_->size(); }
  std::string Name() const override { return "fuzz-image"; }

  // The block as it reads now (overlay or base); writable through the overlay.
  uint8_t* MutableBlock(uint64_t blk);

 private:
  const std::vector<uint8_t>* base_;
  std::unordered_map<uint64_t, std::unique_ptr<uint8_t[]>> overlay_;
};

// Reads the whole tree below `root` the way a mount serves readdir, lookup,
// getattr, read, readlink and getxattr: directory listings (also resumed from a
// cookie) and lookups, inode fields, inline data, the block maps of files and long
// symlinks (extent lookups and SEEK_DATA; the data blocks themselves carry no
// structure and are not read), xattr lists. Ignores every error (the point is that
// nothing crashes). Visits at most `max_inodes` inodes.
void Walk(MetaTxn& txn, uint64_t root, size_t max_inodes = 128);

// Gives the block a valid header for `blocknr`/`uuid` (keeping its type) and seals it.
void FixHeader(uint8_t* block, uint64_t blocknr, const Uuid& uuid);

// Seed mode (see above). Call from LLVMFuzzerInitialize; `write` produces the seeds.
using SeedWriter = void (*)(const std::string& dir);
void MaybeWriteSeeds(SeedWriter write);
void WriteSeed(const std::string& dir, const std::string& name, const std::vector<uint8_t>& data);

// Turns logging off (corrupt images make the library log a lot).
void QuietLogs();

// What every target's LLVMFuzzerInitialize does: logging off, seed mode, and the
// base images built (which also fixes the directory hash, as in the seeds).
// Returns 0, libFuzzer's "go on".
int InitTarget(SeedWriter write);

// A tiny reader for structured fuzz input.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : p_(data), n_(size) {}
  size_t left() const { return n_; }
  uint8_t U8() { return n_ ? (n_--, *p_++) : 0; }
  uint16_t U16() { return uint16_t(U8() | (U8() << 8)); }
  uint64_t U64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= uint64_t(U8()) << (8 * i);
    return v;
  }
  // Copies up to `len` bytes into out (the rest of `out` untouched); returns how many.
  size_t Bytes(uint8_t* out, size_t len) {
    size_t k = len < n_ ? len : n_;
    for (size_t i = 0; i < k; i++) out[i] = p_[i];
    p_ += k;
    n_ -= k;
    return k;
  }

 private:
  const uint8_t* p_;
  size_t n_;
};

}  // namespace agorafs::fuzz
