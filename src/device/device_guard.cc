#include "device/device_guard.h"

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "device/nbd_device.h"

namespace agorafs {
namespace {

namespace fs = std::filesystem;

std::string DevName(dev_t d) {
  return std::to_string(major(d)) + ":" + std::to_string(minor(d));
}

std::string ReadLine(const fs::path& p) {
  std::ifstream f(p);
  std::string s;
  std::getline(f, s);
  return s;
}

// The mount point where the kernel has `d` mounted, if it has.
std::optional<std::string> MountedAt(dev_t d) {
  std::ifstream mi("/proc/self/mountinfo");
  std::string line, want = DevName(d);
  while (std::getline(mi, line)) {
    // id parent major:minor root mountpoint ...
    std::istringstream ls(line);
    std::string id, parent, mm, root, mp;
    if (!(ls >> id >> parent >> mm >> root >> mp)) continue;
    if (mm == want) return mp;
  }
  return std::nullopt;
}

// A kernel driver holding `d` (device-mapper, md, ...), by its sysfs name.
std::optional<std::string> HeldBy(dev_t d) {
  std::error_code ec;
  fs::path holders = fs::path("/sys/dev/block") / DevName(d) / "holders";
  for (const auto& e : fs::directory_iterator(holders, ec)) return e.path().filename().string();
  return std::nullopt;
}

// `d` and its partitions.
std::vector<dev_t> WithPartitions(dev_t d) {
  std::vector<dev_t> out{d};
  std::error_code ec;
  fs::path dir = fs::canonical(fs::path("/sys/dev/block") / DevName(d), ec);
  if (ec) return out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!fs::exists(e.path() / "partition", ec)) continue;
    unsigned ma = 0, mi = 0;
    if (std::sscanf(ReadLine(e.path() / "dev").c_str(), "%u:%u", &ma, &mi) == 2) {
      out.push_back(makedev(ma, mi));
    }
  }
  return out;
}

// Why the kernel uses block device `d` (or a partition of it); empty if it does not.
std::string KernelUse(dev_t d) {
  for (dev_t p : WithPartitions(d)) {
    if (auto mp = MountedAt(p)) return "is mounted on " + *mp;
    if (auto h = HeldBy(p)) return "is held by " + *h;
  }
  return "";
}

}  // namespace

Status CheckDeviceUse(const std::string& path, const DeviceUseOptions& opts) {
  if (IsNbdUri(path)) return Status::Ok();
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Status::Ok();
  if ((st.st_mode & S_IWOTH) && !opts.allow_world_writable) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", unsigned(st.st_mode & 07777));
    return Err(Code::kPermission,
               path + " is writable by every user (mode " + mode +
                   "): any local user could destroy the filesystem or speak for a node; "
                   "run 'chmod o-w " + path + "' (or force it, see --help)");
  }
  if (S_ISBLK(st.st_mode)) {
    std::string why = KernelUse(st.st_rdev);
    if (!why.empty()) {
      return Err(Code::kBusy, path + " " + why + ": the kernel is using it; unmount it first");
    }
    return Status::Ok();
  }
  if (!S_ISREG(st.st_mode)) return Status::Ok();
  // An image file: is it the backing file of a loop device the kernel uses?
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/sys/block", ec)) {
    std::string name = e.path().filename().string();
    if (name.rfind("loop", 0) != 0) continue;
    std::string backing = ReadLine(e.path() / "loop" / "backing_file");
    if (backing.empty()) continue;
    struct stat bs;
    if (::stat(backing.c_str(), &bs) != 0) continue;  // "(deleted)" and the like
    if (bs.st_dev != st.st_dev || bs.st_ino != st.st_ino) continue;
    unsigned ma = 0, mi = 0;
    if (std::sscanf(ReadLine(e.path() / "dev").c_str(), "%u:%u", &ma, &mi) != 2) continue;
    std::string why = KernelUse(makedev(ma, mi));
    if (!why.empty()) {
      return Err(Code::kBusy, path + " backs /dev/" + name + ", which " + why +
                                  ": the kernel is using it; unmount it first");
    }
  }
  return Status::Ok();
}

}  // namespace agorafs
