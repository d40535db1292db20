// The agorafs CLI verbs; each returns the process exit code.
#pragma once

#include <cstdint>
#include <string>

namespace agorafs {

struct MkfsArgs {
  std::string device, label, profile = "default", journal_size, size;
  uint32_t nodes = 16;
  uint32_t heartbeat_ms = 0, io_timeout_ms = 0, dead_after_ms = 0;  // 0 = from profile
  bool force = false;
};
struct MountArgs {
  std::string device, mountpoint, options;
  bool foreground = false;
};
struct InfoArgs {
  std::string device;
  bool json = false;
};
struct FsckArgs {
  std::string device;
  bool repair = false;
  bool json = false;
};

int RunMkfs(const MkfsArgs& a);
int RunMount(const MountArgs& a);
int RunInfo(const InfoArgs& a);
// fsck exit codes: 0 clean, 1 errors corrected, 4 errors left uncorrected, 8 operational error.
int RunFsck(const FsckArgs& a);
struct StatusArgs {
  std::string device;
  bool json = false;
  uint32_t sample_ms = 0;  // 0 = one heartbeat interval + 300 ms
};
int RunStatus(const StatusArgs& a);

struct CorruptArgs {
  std::string device, type, mode = "flip";
  uint32_t count = 1, bits = 4;
  uint64_t seed = 1, ino = 0, block = 0;
  bool json = false;
};
// debug corrupt: 0 blocks damaged, 1 error, 2 bad arguments, 3 nothing matched.
int RunCorrupt(const CorruptArgs& a);

// "16M" / "1G" / "4096" -> bytes; false when malformed.
bool ParseSize(const std::string& s, uint64_t* out);

}  // namespace agorafs
