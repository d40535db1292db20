#include "cli/commands.h"

#include <fcntl.h>
#include <malloc.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstring>
#include <sstream>

#include "cluster/status.h"
#include "util/json.h"
#include "device/block_device.h"
#include "device/device_guard.h"
#include "fs/filesystem.h"
#include "fs/super.h"
#include "debug/corrupt.h"
#include "fsck/fsck.h"
#include "fuse/errno_map.h"
#include "fuse/fuse_adapter.h"

namespace agorafs {

static void Fail(const std::string& what) { std::fprintf(stderr, "agorafs: %s\n", what.c_str()); }

bool ParseSize(const std::string& s, uint64_t* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (errno || end == s.c_str()) return false;
  uint64_t mult = 1;
  std::string suf(end);
  if (suf == "" || suf == "B") mult = 1;
  else if (suf == "K" || suf == "k" || suf == "KiB") mult = 1ull << 10;
  else if (suf == "M" || suf == "MiB") mult = 1ull << 20;
  else if (suf == "G" || suf == "GiB") mult = 1ull << 30;
  else if (suf == "T" || suf == "TiB") mult = 1ull << 40;
  else return false;
  *out = v * mult;
  return true;
}

int RunMkfs(const MkfsArgs& a) {
  OpenOptions oo;
  if (!a.size.empty()) {
    uint64_t bytes;
    if (!ParseSize(a.size, &bytes)) {
      Fail("bad --size '" + a.size + "'");
      return 2;
    }
    oo.create = true;
    oo.create_size = bytes / kBlockSize * kBlockSize;
  }
  DeviceUseOptions uo;
  uo.allow_world_writable = a.force;
  if (Status use = CheckDeviceUse(a.device, uo); !use.ok()) {
    Fail(use.message() + (use.Is(Code::kPermission) ? " (--force)" : ""));
    return 1;
  }
  auto dev = OpenDevice(a.device, oo);
  if (!dev.ok()) {
    Fail(dev.status().message());
    return 1;
  }
  MkfsOptions mo;
  mo.params.node_slots = a.nodes;
  mo.params.profile = a.profile == "fast" ? kProfileFast : kProfileDefault;
  mo.params.heartbeat_interval_ms = a.heartbeat_ms;
  mo.params.io_timeout_ms = a.io_timeout_ms;
  mo.params.dead_after_ms = a.dead_after_ms;
  {
    // The lease arithmetic (docs/DESIGN.md) needs room between the beats and the
    // dead verdict; refuse values that would make nodes fence each other.
    uint32_t hb = a.heartbeat_ms ? a.heartbeat_ms : (a.profile == "fast" ? 500 : 2000);
    uint32_t io = a.io_timeout_ms ? a.io_timeout_ms : (a.profile == "fast" ? 2000 : 10000);
    uint32_t dead = a.dead_after_ms ? a.dead_after_ms : (a.profile == "fast" ? 8000 : 60000);
    if (hb < 10 || dead < 4 * hb || dead < io + 2 * hb) {
      Fail(fmt::format("timings refused: heartbeat {} ms, I/O timeout {} ms, dead after {} ms; "
                       "need heartbeat >= 10 ms, dead-after >= 4 x heartbeat and >= I/O timeout "
                       "+ 2 x heartbeat",
                       hb, io, dead));
      return 2;
    }
  }
  if (!a.journal_size.empty()) {
    uint64_t bytes;
    if (!ParseSize(a.journal_size, &bytes) || bytes / kBlockSize > UINT32_MAX) {
      Fail("bad --journal-size '" + a.journal_size + "'");
      return 2;
    }
    mo.params.journal_blocks = static_cast<uint32_t>(bytes / kBlockSize);
  }
  mo.label = a.label;
  mo.force = a.force;
  auto sb = Mkfs(dev->get(), mo);
  if (!sb.ok()) {
    Fail(sb.status().message());
    return 1;
  }
  Geometry g = GeometryOf(*sb);
  std::printf("agorafs: created filesystem %s on %s\n", UuidString(SuperUuid(*sb)).c_str(),
              a.device.c_str());
  std::printf("  size %.1f MiB, %u node slots, journal %.1f MiB per node, %u allocation groups\n",
              double(g.total_blocks) * kBlockSize / (1 << 20), g.node_slots,
              double(g.journal_blocks) * kBlockSize / (1 << 20), g.ag_count);
  return 0;
}

// Options only the CLI itself uses.
struct CliMountOptions {
  bool allow_world_writable = false;
};

static bool ParseMountOptions(const std::string& s, MountOptions* mo, FuseOptions* fo,
                              CliMountOptions* co, std::string* err) {
  std::stringstream ss(s);
  std::string opt;
  while (std::getline(ss, opt, ',')) {
    if (opt.empty() || opt == "rw" || opt == "defaults" || opt == "dev" || opt == "suid") continue;
    auto eq = opt.find('=');
    std::string key = opt.substr(0, eq);
    std::string val = eq == std::string::npos ? "" : opt.substr(eq + 1);
    uint64_t n;
    if (key == "allow_other") {
      fo->allow_other = true;
    } else if (key == "allow_world_writable") {
      co->allow_world_writable = true;
    } else if (key == "cache") {
      if (!ParseSize(val, &n) || n < (1 << 20)) {
        *err = "cache= takes a size of at least 1M";
        return false;
      }
      mo->store.cache_blocks = n / kCacheBytesPerBlock;
    } else if (key == "commit") {
      if (!ParseSize(val, &n) || n == 0 || n > 600) {
        *err = "commit= takes seconds (1..600)";
        return false;
      }
      mo->store.commit_interval_ms = static_cast<uint32_t>(n * 1000);
    } else if (key == "attr_timeout" || key == "entry_timeout") {
      char* end = nullptr;
      double t = std::strtod(val.c_str(), &end);
      if (val.empty() || *end != '\0' || !(t >= 0 && t <= 86400)) {
        *err = key + "= takes seconds (0..86400)";
        return false;
      }
      (key == "attr_timeout" ? fo->attr_timeout : fo->entry_timeout) = t;
    } else if (key == "nonet") {
      mo->net_bind.clear();
    } else if (key == "nointent") {
      mo->intent_locks = false;
    } else if (key == "net") {
      // The lock service's wake-up channel: UDP on this address, published in the
      // node's heartbeat block; messages themselves always go through the disk.
      if (val.empty() || val.find(':') == std::string::npos) {
        *err = "net= takes IP:PORT (the address this node listens on for lock hints)";
        return false;
      }
      mo->net_bind = val;
    } else if (key == "hold") {
      if (!ParseSize(val, &n) || n > 10000) {
        *err = "hold= takes milliseconds (0..10000)";
        return false;
      }
      mo->min_hold_ms = static_cast<uint32_t>(n);
    } else if (key == "idle") {
      if (!ParseSize(val, &n) || n > 10000000) {
        *err = "idle= takes microseconds (0..10000000)";
        return false;
      }
      mo->idle_release_us = static_cast<uint32_t>(n);
    } else if (key == "poll") {
      if (!ParseSize(val, &n) || n == 0 || n > 1000) {
        *err = "poll= takes milliseconds (1..1000)";
        return false;
      }
      mo->poll_ms = static_cast<uint32_t>(n);
    } else if (key == "fsname") {
      fo->fsname = val;
    } else if (key == "ro") {
      *err = "read-only mounts are not supported yet";
      return false;
    } else if (key == "nosuid" || key == "nodev" || key == "noexec" || key == "noatime") {
      fo->extra.push_back(key);
    } else {
      *err = "unknown mount option '" + opt + "'";
      return false;
    }
  }
  return true;
}

int RunStatus(const StatusArgs& a) {
  OpenOptions oo;
  oo.read_only = true;
  auto dev = OpenDevice(a.device, oo);
  if (!dev.ok()) {
    Fail(dev.status().message());
    return 1;
  }
  uint32_t sample = a.sample_ms;
  if (sample == 0) {
    auto sb = ReadSuperblock(dev->get());
    if (!sb.ok()) {
      Fail(sb.status().ToString());
      return 1;
    }
    // One heartbeat interval and a bit: every live node beats at least once.
    sample = std::min<uint32_t>(sb->heartbeat_interval_ms + 300, 5000);
  }
  auto st = ReadClusterStatus(dev->get(), sample);
  if (!st.ok()) {
    Fail(st.status().ToString());
    return 1;
  }
  std::fputs((a.json ? StatusJson(*st) + "\n" : StatusText(*st)).c_str(), stdout);
  return 0;
}

int RunMount(const MountArgs& a) {
  // Bound the daemon's memory to its caches: fixed mmap threshold (no dynamic growth
  // that keeps freed multi-MiB buffers in the heap) and few malloc arenas.
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  mallopt(M_ARENA_MAX, 2);
  MountOptions mo;
  FuseOptions fo;
  fo.mountpoint = a.mountpoint;
  fo.fsname = "agorafs:" + a.device;
  std::string err;
  CliMountOptions co;
  if (!ParseMountOptions(a.options, &mo, &fo, &co, &err)) {
    Fail(err);
    return 2;
  }
  DeviceUseOptions uo;
  uo.allow_world_writable = co.allow_world_writable;
  if (Status use = CheckDeviceUse(a.device, uo); !use.ok()) {
    Fail(use.message() + (use.Is(Code::kPermission) ? " (-o allow_world_writable)" : ""));
    return 1;
  }
  struct stat st;
  if (stat(a.mountpoint.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    Fail("mount point " + a.mountpoint + " is not a directory");
    return 1;
  }
  int pipefd[2] = {-1, -1};
  if (!a.foreground) {
    if (pipe(pipefd) != 0) {
      Fail("pipe failed");
      return 1;
    }
    pid_t pid = fork();
    if (pid < 0) {
      Fail("fork failed");
      return 1;
    }
    if (pid > 0) {
      // Parent: wait until the child says the mount is ready or has failed.
      close(pipefd[1]);
      char buf[4] = {};
      ssize_t n = read(pipefd[0], buf, sizeof(buf));
      if (n > 0 && buf[0] == '0') return 0;
      int status = 0;
      waitpid(pid, &status, 0);
      return WIFEXITED(status) && WEXITSTATUS(status) != 0 ? WEXITSTATUS(status) : 1;
    }
    close(pipefd[0]);
    setsid();
  }
  OpenOptions oo;
  auto dev = OpenDevice(a.device, oo);
  if (!dev.ok()) {
    Fail(dev.status().message());
    return 1;
  }
  auto fs = Filesystem::Mount(std::move(dev).value(), mo);
  if (!fs.ok()) {
    Fail(fs.status().message());
    return 1;
  }
  if (!a.foreground) {
    fo.ready_fd = pipefd[1];
    auto logger = spdlog::syslog_logger_mt("agorafs", "agorafs", LOG_PID);
    spdlog::set_default_logger(logger);
    int devnull = open("/dev/null", O_RDWR);
    if (devnull >= 0) {
      dup2(devnull, 0);
      dup2(devnull, 1);
      // stderr stays until the mount is up so mount errors reach the terminal.
      fo.detach_stderr_to = devnull;
    }
    int rc = RunFuse(fs->get(), fo);
    Status us = (*fs)->Unmount();
    if (!us.ok()) spdlog::error("{}", us.ToString());
    return rc != 0 ? rc : (us.ok() ? 0 : 1);
  }
  int rc = RunFuse(fs->get(), fo);
  Status us = (*fs)->Unmount();
  if (!us.ok()) Fail(us.ToString());
  return rc != 0 ? rc : (us.ok() ? 0 : 1);
}

static std::string JsonStr(const std::string& s) { return "\"" + JsonEscape(s) + "\""; }

int RunInfo(const InfoArgs& a) {
  OpenOptions oo;
  oo.read_only = true;
  auto dev = OpenDevice(a.device, oo);
  if (!dev.ok()) {
    Fail(dev.status().message());
    return 1;
  }
  auto sb = ReadSuperblock(dev->get());
  if (!sb.ok()) {
    Fail(sb.status().message());
    return 1;
  }
  Geometry g = GeometryOf(*sb);
  Uuid uuid = SuperUuid(*sb);
  uint64_t free_blocks = 0, total = 0;
  AlignedBuffer b(kBlockSize);
  uint32_t bad_ags = 0;
  for (uint32_t ag = 0; ag < g.ag_count; ag++) {
    total += g.AgSize(ag);
    uint64_t blk = g.AgStart(ag);
    if (!(*dev)->Read(blk * kBlockSize, b.data(), kBlockSize).ok() ||
        !VerifyBlock(b.data(), BlockType::kAgHeader, blk, uuid).ok()) {
      bad_ags++;
      continue;
    }
    free_blocks += reinterpret_cast<const AgHeader*>(b.data())->free_blocks;
  }
  struct SlotInfo {
    uint32_t slot;
    std::string state, host;
    uint64_t generation, counter;
  };
  std::vector<SlotInfo> slots;
  for (uint32_t s = 0; s < g.node_slots; s++) {
    uint64_t blk = g.SlotBlock(s, kSlotHeartbeat);
    if (!(*dev)->Read(blk * kBlockSize, b.data(), kBlockSize).ok()) continue;
    if (!VerifyBlock(b.data(), BlockType::kSlot, blk, uuid).ok()) {
      slots.push_back({s, "corrupt", "", 0, 0});
      continue;
    }
    const auto* sl = reinterpret_cast<const SlotBlock*>(b.data());
    if (sl->state == kSlotFree && sl->generation == 0) continue;
    slots.push_back({s, sl->state == kSlotMounted ? "mounted" : "free",
                     std::string(sl->host, strnlen(sl->host, sizeof(sl->host))), sl->generation,
                     sl->counter});
  }
  std::string label(sb->label, strnlen(sb->label, sizeof(sb->label)));
  const char* profile = sb->timing_profile == kProfileFast ? "fast" : "default";
  if (a.json) {
    std::printf("{\"uuid\":\"%s\",\"label\":%s,\"version\":%u,\"block_size\":%u,"
                "\"total_blocks\":%llu,\"data_blocks\":%llu,\"free_blocks\":%llu,"
                "\"node_slots\":%u,\"journal_blocks\":%u,\"ag_count\":%u,\"ag_blocks\":%u,"
                "\"bad_ags\":%u,\"profile\":\"%s\",\"heartbeat_interval_ms\":%u,"
                "\"dead_after_ms\":%u,\"slots\":[",
                UuidString(uuid).c_str(), JsonStr(label).c_str(), sb->version, sb->block_size,
                (unsigned long long)sb->total_blocks, (unsigned long long)total,
                (unsigned long long)free_blocks, g.node_slots, g.journal_blocks, g.ag_count,
                g.ag_blocks, bad_ags, profile, sb->heartbeat_interval_ms, sb->dead_after_ms);
    for (size_t i = 0; i < slots.size(); i++) {
      std::printf("%s{\"slot\":%u,\"state\":\"%s\",\"host\":%s,\"generation\":%llu,"
                  "\"counter\":%llu}",
                  i ? "," : "", slots[i].slot, slots[i].state.c_str(),
                  JsonStr(slots[i].host).c_str(), (unsigned long long)slots[i].generation,
                  (unsigned long long)slots[i].counter);
    }
    std::printf("]}\n");
    return 0;
  }
  std::printf("agorafs filesystem on %s\n", a.device.c_str());
  std::printf("  UUID:             %s\n", UuidString(uuid).c_str());
  std::printf("  label:            %s\n", label.empty() ? "(none)" : label.c_str());
  std::printf("  format version:   %u, block size %u\n", sb->version, sb->block_size);
  std::printf("  size:             %.1f MiB (%llu blocks)\n",
              double(sb->total_blocks) * kBlockSize / (1 << 20), (unsigned long long)sb->total_blocks);
  std::printf("  data space:       %.1f MiB, %.1f MiB free (%.1f%% used)\n",
              double(total) * kBlockSize / (1 << 20), double(free_blocks) * kBlockSize / (1 << 20),
              total ? 100.0 * double(total - free_blocks) / double(total) : 0.0);
  std::printf("  node slots:       %u, journal %.1f MiB each\n", g.node_slots,
              double(g.journal_blocks) * kBlockSize / (1 << 20));
  std::printf("  allocation groups: %u of %.1f MiB%s\n", g.ag_count,
              double(g.ag_blocks) * kBlockSize / (1 << 20),
              bad_ags ? fmt::format(" ({} unreadable)", bad_ags).c_str() : "");
  std::printf("  timing profile:   %s (heartbeat %u ms, dead after %u ms)\n", profile,
              sb->heartbeat_interval_ms, sb->dead_after_ms);
  if (slots.empty()) {
    std::printf("  nodes:            none has mounted it yet\n");
  }
  for (const auto& s : slots) {
    std::printf("  slot %-3u          %s, host '%s', generation %llu, heartbeat %llu\n", s.slot,
                s.state.c_str(), s.host.c_str(), (unsigned long long)s.generation,
                (unsigned long long)s.counter);
  }
  return 0;
}

int RunFsck(const FsckArgs& a) {
  OpenOptions oo;
  oo.read_only = !a.repair;
  if (a.repair) {
    DeviceUseOptions uo;
    uo.allow_world_writable = true;  // the administrator is repairing it
    if (Status use = CheckDeviceUse(a.device, uo); !use.ok()) {
      Fail(use.message());
      return 8;
    }
  }
  auto dev = OpenDevice(a.device, oo);
  if (!dev.ok()) {
    Fail(dev.status().message());
    return 8;
  }
  FsckOptions fo;
  fo.repair = a.repair;
  auto rep = Fsck(dev->get(), fo);
  if (!rep.ok()) {
    Fail(rep.status().message());
    return 8;
  }
  if (a.json) {
    std::printf("%s\n", rep->ToJson().c_str());
  } else {
    std::printf("%s", rep->ToText().c_str());
  }
  return rep->ExitCode();
}

int RunCorrupt(const CorruptArgs& a) {
  CorruptOptions co;
  if (a.type.empty()) {
    if (a.block == 0) {
      Fail("debug corrupt: give --type or --block");
      return 2;
    }
    co.any_kind = true;
  } else if (!ParseMetaKind(a.type, &co.kind)) {
    Fail("debug corrupt: unknown --type '" + a.type + "'");
    return 2;
  }
  co.mode = a.mode == "zero" ? CorruptMode::kZero : CorruptMode::kFlip;
  co.count = a.count;
  co.bits = a.bits;
  co.seed = a.seed;
  co.ino = a.ino;
  co.block = a.block;
  auto dev = OpenDevice(a.device, OpenOptions{});
  if (!dev.ok()) {
    Fail(dev.status().message());
    return 1;
  }
  auto rep = Corrupt(dev->get(), co);
  if (!rep.ok()) {
    Fail(rep.status().message());
    return rep.status().Is(Code::kNotFound) ? 3 : 1;
  }
  std::printf("%s", a.json ? (rep->ToJson() + "\n").c_str() : rep->ToText().c_str());
  return 0;
}

}  // namespace agorafs
