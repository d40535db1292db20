// agfs-locknode: one cluster node as a real process, for the multi-node tests and
// bench/locks. It joins the cluster on DEVICE (membership + lock service, no
// filesystem) and runs one workload, printing one JSON object per line on stdout.
//
// Workloads (--mode):
//   counter  Take lock --lock exclusively --iterations times; each time read the
//            counter block --block, check nobody is inside, mark itself inside, write,
//            increment, mark outside, write. A violation exits with status 3. A failed
//            write is retried (the node stays up) until the node is fenced.
//   hold     Take --lock exclusively, keep it pinned, and rewrite the counter block
//            every 20 ms (so a late write would show) until killed.
//   acquire  Take --lock exclusively once, report, release at exit.
//   pingpong Alternate --lock with other pingpong nodes: take it, record latency,
//            unpin, wait until another node has taken it, repeat --iterations times;
//            prints latency percentiles.
//   reacquire Take --lock once, then --iterations more times (cached: no messages).
//   first    Take --iterations distinct locks once each (a master round trip each).
//   idle     Just be a member (and maybe the master) until killed.
// The recovery callback (run when this node is the master and another died) clears
// the dead node's "inside" mark in the counter block, as a journal replay would
// repair what the dead node left half done, and reports it.
//
// Exit: 0 done, 2 usage/setup error, 3 mutual exclusion violated, 4 fenced.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "cluster/lock_service.h"
#include "cluster/membership.h"
#include "device/block_device.h"
#include "fs/super.h"
#include "util/clock.h"

using namespace agorafs;

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

constexpr uint64_t kCounterMagic = 0x52544e434b434f4cull;  // "LOCKCNTR"
struct Counter {
  uint64_t magic;
  uint64_t count;
  uint32_t inside;  // 1 while a holder is between its two writes
  uint32_t holder_slot;
  uint64_t holder_gen;
  uint64_t recoveries;
};

uint64_t NowMs() { return RealtimeNs() / 1000000; }

void Emit(const std::string& json) {
  std::printf("%s\n", json.c_str());
  std::fflush(stdout);
}

Status ReadCounter(BlockDevice* dev, uint64_t blk, Counter* c) {
  AlignedBuffer b(kBlockSize);
  AGFS_RETURN_IF_ERROR(dev->Read(blk * kBlockSize, b.data(), kBlockSize));
  std::memcpy(c, b.data(), sizeof(*c));
  if (c->magic != kCounterMagic) *c = Counter{kCounterMagic, 0, 0, 0, 0, 0};
  return Status::Ok();
}
Status WriteCounter(BlockDevice* dev, uint64_t blk, const Counter& c) {
  AlignedBuffer b(kBlockSize);
  std::memcpy(b.data(), &c, sizeof(c));
  return dev->Write(blk * kBlockSize, b.data(), kBlockSize);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"agorafs lock-layer test node"};
  std::string device, mode = "idle", host, net;
  uint64_t lock_num = 1, block = 0, iterations = 1000;
  uint32_t poll_ms = 5, min_hold_ms = 1;
  uint64_t start_at_ms = 0;
  app.add_option("--device", device, "Shared device (path or nbd URI)")->required();
  app.add_option("--mode", mode, "counter|hold|acquire|pingpong|idle");
  app.add_option("--host", host, "Host name to publish");
  app.add_option("--lock", lock_num, "Lock number (an inode-kind lock id)");
  app.add_option("--block", block, "Counter block (0 = 64 blocks before the end)");
  app.add_option("--iterations", iterations, "Iterations");
  app.add_option("--poll-ms", poll_ms, "Disk poll interval");
  app.add_option("--min-hold-ms", min_hold_ms, "Minimum hold time");
  app.add_option("--net", net, "Bind the network channel here (ip:port); empty = disk only");
  app.add_option("--start-at-ms", start_at_ms,
                 "Join at this CLOCK_REALTIME instant (ms), to start many nodes at once");
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("locknode"));
  spdlog::set_pattern("%H:%M:%S.%e locknode[%P] %l: %v");

  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);

  OpenOptions oo;
  auto dev = OpenDevice(device, oo);
  if (!dev.ok()) {
    spdlog::error("{}", dev.status().ToString());
    return 2;
  }
  auto sb = ReadSuperblock(dev->get());
  if (!sb.ok()) {
    spdlog::error("{}", sb.status().ToString());
    return 2;
  }
  Geometry g = GeometryOf(*sb);
  if (block == 0) block = g.total_blocks - 64;
  const LockId lock = MakeLockId(LockKind::kInode, lock_num);

  if (start_at_ms) {
    uint64_t now = NowMs();
    if (start_at_ms > now) std::this_thread::sleep_for(std::chrono::milliseconds(start_at_ms - now));
  }
  std::atomic<bool> fenced{false};
  Membership::Options mo;
  mo.host = host;
  mo.timings = ClusterTimings::FromSuper(*sb);
  mo.on_fenced = [&] {
    fenced = true;
    Emit(fmt::format(R"({{"event":"fenced","t":{}}})", NowMs()));
  };
  auto m = Membership::Join(dev->get(), *sb, mo);
  if (!m.ok()) {
    spdlog::error("join: {}", m.status().ToString());
    return 2;
  }
  Membership* mem = m->get();
  BlockDevice* gdev = mem->guarded_device();
  Emit(fmt::format(R"({{"event":"joined","slot":{},"generation":{},"pid":{},"t":{}}})",
                   mem->slot(), mem->generation(), getpid(), NowMs()));

  LockService::Options lo;
  lo.poll_ms = poll_ms;
  lo.min_hold_ms = min_hold_ms;
  lo.net_bind = net;
  lo.on_recover = [&](uint32_t slot, uint64_t gen) -> Status {
    Counter c;
    AGFS_RETURN_IF_ERROR(ReadCounter(gdev, block, &c));
    bool repaired = false;
    if (c.inside && c.holder_slot == slot && c.holder_gen == gen) {
      c.inside = 0;
      c.recoveries++;
      AGFS_RETURN_IF_ERROR(WriteCounter(gdev, block, c));
      repaired = true;
    }
    Emit(fmt::format(R"({{"event":"recovered","slot":{},"generation":{},"repaired":{},"t":{}}})",
                     slot, gen, repaired, NowMs()));
    return Status::Ok();
  };
  lo.on_fatal = [](const Status& st) {
    spdlog::critical("fatal: {}", st.ToString());
    _exit(5);
  };
  auto ls = LockService::Start(dev->get(), *sb, mem, lo);
  if (!ls.ok()) {
    spdlog::error("lock service: {}", ls.status().ToString());
    return 2;
  }
  LockService* svc = ls->get();

  int rc = 0;
  auto fail_fenced = [&](const Status& st) {
    Emit(fmt::format(R"({{"event":"error","error":"{}","t":{}}})", CodeName(st.code()), NowMs()));
    rc = st.Is(Code::kFenced) ? 4 : 2;
  };

  if (mode == "counter") {
    uint64_t done = 0;
    while (done < iterations && !g_stop) {
      Status st = svc->Lock(lock, LockMode::kExclusive);
      if (!st.ok()) {
        fail_fenced(st);
        break;
      }
      Counter c;
      st = ReadCounter(gdev, block, &c);
      // Inside by itself means an earlier attempt of this node failed half way.
      bool mine = c.holder_slot == mem->slot() && c.holder_gen == mem->generation();
      if (st.ok() && c.inside && !mine) {
        Emit(fmt::format(
            R"({{"event":"violation","inside_slot":{},"inside_gen":{},"count":{},"t":{}}})",
            c.holder_slot, c.holder_gen, c.count, NowMs()));
        rc = 3;
        svc->Unpin(lock);
        break;
      }
      if (st.ok()) {
        c.inside = 1;
        c.holder_slot = mem->slot();
        c.holder_gen = mem->generation();
        st = WriteCounter(gdev, block, c);
      }
      if (st.ok()) {
        c.count++;
        c.inside = 0;
        st = WriteCounter(gdev, block, c);
      }
      svc->Unpin(lock);
      if (st.Is(Code::kFenced)) {
        fail_fenced(st);
        break;
      }
      if (!st.ok()) {
        // An I/O error fails this increment, as EIO fails one call of a filesystem; the
        // node stays up. If the device keeps failing, the lease runs out: fenced.
        spdlog::warn("increment failed: {}", st.ToString());
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue;
      }
      done++;
    }
    Emit(fmt::format(R"({{"event":"done","increments":{},"t":{}}})", done, NowMs()));
  } else if (mode == "hold" || mode == "acquire") {
    Status st = svc->Lock(lock, LockMode::kExclusive);
    if (!st.ok()) {
      fail_fenced(st);
    } else {
      Counter c;
      st = ReadCounter(gdev, block, &c);
      bool was_inside = st.ok() && c.inside;
      Emit(fmt::format(R"({{"event":"acquired","inside_before":{},"t":{}}})", was_inside, NowMs()));
      if (was_inside) rc = 3;
      if (mode == "hold" && st.ok()) {
        c.inside = 1;
        c.holder_slot = mem->slot();
        c.holder_gen = mem->generation();
        while (!g_stop) {
          c.count++;
          st = WriteCounter(gdev, block, c);
          if (!st.ok()) {
            fail_fenced(st);
            break;
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        if (st.ok()) {
          c.inside = 0;
          st = WriteCounter(gdev, block, c);
        }
      } else {
        while (!g_stop && !fenced) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      svc->Unpin(lock);
    }
  } else if (mode == "reacquire" || mode == "first") {
    // reacquire: the same lock again and again (cached after the first time);
    // first: --iterations distinct locks, each acquired for the first time.
    std::vector<double> lat;
    Status st = Status::Ok();
    if (mode == "reacquire") {
      st = svc->Lock(lock, LockMode::kExclusive);
      if (st.ok()) svc->Unpin(lock);
    }
    auto before = svc->stats();
    uint64_t t_all = BootNowUs();
    for (uint64_t i = 0; i < iterations && st.ok() && !g_stop; i++) {
      LockId id = mode == "first" ? MakeLockId(LockKind::kInode, lock_num + 1 + i) : lock;
      uint64_t t0 = BootNowUs();
      st = svc->Lock(id, LockMode::kExclusive);
      if (st.ok()) svc->Unpin(id);
      lat.push_back(double(BootNowUs() - t0) / 1000.0);
    }
    double secs = double(BootNowUs() - t_all) / 1e6;
    auto after = svc->stats();
    if (!st.ok()) fail_fenced(st);
    std::sort(lat.begin(), lat.end());
    auto pct = [&](double p) { return lat.empty() ? 0.0 : lat[size_t(p * double(lat.size() - 1))]; };
    Emit(fmt::format(
        R"({{"event":"latency","n":{},"ops_per_s":{:.1f},"p50_ms":{:.4f},"p99_ms":{:.4f},"requests":{},"t":{}}})",
        lat.size(), secs > 0 ? double(lat.size()) / secs : 0.0, pct(0.5), pct(0.99),
        after.requests_sent - before.requests_sent, NowMs()));
  } else if (mode == "pingpong") {
    std::vector<double> lat;
    Counter c;
    for (uint64_t i = 0; i < iterations && !g_stop; i++) {
      uint64_t t0 = BootNowUs();
      Status st = svc->Lock(lock, LockMode::kExclusive);
      if (!st.ok()) {
        fail_fenced(st);
        break;
      }
      lat.push_back(double(BootNowUs() - t0) / 1000.0);
      st = ReadCounter(gdev, block, &c);
      uint32_t last = c.holder_slot;
      c.holder_slot = mem->slot();
      c.count++;
      if (st.ok()) st = WriteCounter(gdev, block, c);
      svc->Unpin(lock);
      (void)last;
      // Wait until somebody else has had it (the counter moved on without us); not
      // after the last round, when the others may be done too.
      uint64_t mine = c.count;
      while (!g_stop && i + 1 < iterations) {
        Counter now;
        if (!ReadCounter(gdev, block, &now).ok()) break;
        if (now.count != mine) break;
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
    std::sort(lat.begin(), lat.end());
    auto pct = [&](double p) { return lat.empty() ? 0.0 : lat[size_t(p * double(lat.size() - 1))]; };
    Emit(fmt::format(R"({{"event":"latency","n":{},"p50_ms":{:.3f},"p99_ms":{:.3f},"t":{}}})",
                     lat.size(), pct(0.5), pct(0.99), NowMs()));
  } else {
    while (!g_stop && !fenced) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  auto s = svc->stats();
  Emit(fmt::format(
      R"({{"event":"stats","slot":{},"is_master":{},"epoch":{},"grants":{},"revokes":{},"requests":{},"cached_hits":{},"recoveries":{},"elections":{},"disk_reads":{},"disk_writes":{},"net_sent":{},"net_accepted":{},"net_dropped":{}}})",
      mem->slot(), s.is_master, s.epoch, s.grants, s.revokes_received, s.requests_sent,
      s.cached_hits, s.recoveries, s.elections, s.disk_reads, s.disk_writes, s.net_sent,
      s.net_accepted, s.net_dropped));
  ls->reset();
  if (!fenced) {
    Status st = mem->Leave();
    if (!st.ok()) spdlog::warn("leave: {}", st.ToString());
  }
  if (fenced && rc == 0) rc = 4;
  return rc;
}
