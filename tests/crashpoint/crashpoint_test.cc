// Crash-point replay: every workload runs in-process on a RecordingDevice; CrashLog then
// rebuilds the disk images a power cut could have left (every barrier's prefix plus
// sampled subsets and orders of the writes in flight, see device/crash_replay.h), and
// each image must (0) check with fsck as found, showing only a journal to replay and
// orphans, (1) mount, recovering every crashed node (journal replay), (2) hold exactly
// what every fsync/fsyncdir that had returned before the cut made durable, (3)
// unmount cleanly and (4) check clean with fsck.
// The seventh workload (OneNodeCutOtherContinues) runs live instead: node A's host is
// cut at a chosen point while node B goes on, recovers A and keeps working; the end
// state then passes the same checks (see RunOneNodeCut).
//
// Knobs (environment):
//   AGORAFS_CRASHPOINT_IMAGES  crash images in total over all workloads (default 2000)
//   AGORAFS_CRASHPOINT_SEED    the seed of workloads and samples (default printed)
//   AGORAFS_CRASHPOINT_JOBS    images checked at once (default 24; mounts mostly wait
//                              for the crashed node to be declared dead)
//   AGORAFS_CRASHPOINT_SAVE    directory for failing images (default the test tempdir)
//   AGORAFS_CRASHPOINT_FSCK_EVERY  also fsck every Nth image as found, before the
//                              mount (default 1: all; 0: none)
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/stat.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "device/crash_replay.h"
#include "device/fault_device.h"
#include "device/mem_device.h"
#include "device/recording_device.h"
#include "fs/filesystem.h"
#include "fs/super.h"
#include "fs/test_mount_options.h"
#include "fsck/fsck.h"

namespace agorafs {
namespace {

constexpr uint64_t kDeviceBytes = uint64_t(16) << 20;
constexpr uint64_t kDefaultSeed = 20261128;

uint64_t EnvU64(const char* name, uint64_t def) {
  const char* v = std::getenv(name);
  if (!v || !*v) return def;
  return std::strtoull(v, nullptr, 0);
}

// Short cluster timings: the replay mount declares the crashed slot dead after 0.5 s.
// Its own lease is then 450 ms, which a loaded machine can starve (its heartbeat
// thread not run in time): such a check is retried with SlowNodeOptions().
MountOptions NodeOptions() { return FastTestMountOptions(); }
MountOptions SlowNodeOptions() {
  MountOptions o = NodeOptions();
  o.heartbeat_ms_override = 200;
  o.io_timeout_ms_override = 2000;
  o.dead_after_ms_override = 4000;
  return o;
}
// The checking node lost its lease (a timing fault of this machine, not of the image).
bool LeaseLapse(const Status& st) {
  return st.Is(Code::kFenced) || st.message().find("lease") != std::string::npos ||
         st.message().find("lost its place in the cluster") != std::string::npos;
}

// ------------------------------------------------------------------------------
// What fsync made durable, keyed by the barrier numbers of the RecordingDevice.
//
// Per path, events in program order: "modified" keyed by the barrier count before the
// operation started (its writes all follow that barrier), "synced" keyed by the
// barrier count after fsync returned (what it made durable precedes that barrier).
// Keys never decrease along a path's events. For a cut after barrier k the path's
// expectation is its last event with key <= k: a sync is checked exactly, a
// modification makes the path uncertain (the operation may have half landed).
// Without a RecordingDevice every key is 0: At(0) is the last event of each path.
class SyncTracker {
 public:
  struct Want {
    std::string path;
    bool dir = false;
    std::string content;          // files
    std::set<std::string> names;  // directories, without "." and ".."
  };

  explicit SyncTracker(const RecordingDevice* rec) : rec_(rec) {}

  void Modified(const std::vector<std::string>& paths) {
    const uint64_t key = rec_ ? rec_->barriers() : 0;
    for (const auto& p : paths) events_[p].push_back({key, false, {}});
  }
  void Synced(Want w) {
    const uint64_t key = rec_ ? rec_->barriers() : 0;
    std::string p = w.path;
    events_[p].push_back({key, true, std::move(w)});
  }
  std::vector<Want> At(uint64_t k) const {
    std::vector<Want> out;
    for (const auto& [path, evs] : events_) {
      const Event* last = nullptr;
      for (const Event& e : evs) {
        if (e.key <= k) last = &e;
      }
      if (last && last->synced) out.push_back(last->want);
    }
    return out;
  }
  size_t syncs() const {
    size_t n = 0;
    for (const auto& [path, evs] : events_) {
      for (const Event& e : evs) n += e.synced;
    }
    return n;
  }

 private:
  struct Event {
    uint64_t key;
    bool synced;
    Want want;
  };
  const RecordingDevice* rec_;
  std::map<std::string, std::vector<Event>> events_;
};

// ------------------------------------------------------------------------------
// A workload's view of the filesystem: path-based operations on the Filesystem API,
// a model of what every file and directory holds, and the tracker.

std::string Parent(const std::string& p) {
  auto i = p.rfind('/');
  return i == 0 ? "/" : p.substr(0, i);
}
std::string Base(const std::string& p) { return p.substr(p.rfind('/') + 1); }

// In Driver operations: a failure is fatal unless TolerateFailuresOf() excuses it;
// a fatal one is also remembered (failed()), for runs on other threads.
#define AGFS_DRIVER_OK(cond)   \
  if (cond) {                  \
  } else if (Tolerated()) {    \
    return;                    \
  } else if (MarkFailed())     \
    FAIL()

class Driver {
 public:
  // One or more nodes mounted on the same recorded device; operations go to node 0
  // until Use() picks another.
  Driver(std::vector<Filesystem*> nodes, const RecordingDevice* rec)
      : nodes_fs_(std::move(nodes)), fs_(nodes_fs_[0]), tracker_(rec) {
    paths_["/"] = NewNode(true);
  }
  size_t node_count() const { return nodes_fs_.size(); }
  void Use(size_t node) { fs_ = nodes_fs_[node % nodes_fs_.size()]; }
  // Replaces the nodes (e.g. once one of them is gone); operations go to node 0.
  void SetNodes(std::vector<Filesystem*> nodes) {
    nodes_fs_ = std::move(nodes);
    fs_ = nodes_fs_[0];
  }
  // An operation that fails on a node for which `dead` says true (its host was cut)
  // is no test failure: the operation is dropped (the model is then stale: Reload).
  void TolerateFailuresOf(std::function<bool(Filesystem*)> dead) { dead_ = std::move(dead); }
  // Rebuilds the model from what `fs` shows (after a node's cut and its recovery).
  void Reload(Filesystem* fs) {
    nodes_.clear();
    paths_.clear();
    inos_.clear();
    paths_["/"] = NewNode(true);
    std::map<uint64_t, size_t> by_ino;
    std::vector<std::pair<std::string, uint64_t>> todo = {{"/", fs->root_ino()}};
    while (!todo.empty()) {
      auto [dir, dino] = todo.back();
      todo.pop_back();
      std::vector<DirEntryOut> ents;
      Status st = fs->ReadDir(dino, 0, false, [&](const DirEntryOut& e) {
        if (e.name != "." && e.name != "..") ents.push_back(e);
        return true;
      });
      AGFS_DRIVER_OK(st.ok()) << "reload: readdir " << dir << ": " << st.ToString();
      for (const DirEntryOut& e : ents) {
        const std::string p = (dir == "/" ? "" : dir) + "/" + e.name;
        auto a = fs->Lookup(dino, e.name);
        AGFS_DRIVER_OK(a.ok()) << "reload: lookup " << p << ": " << a.status().ToString();
        inos_[p] = a->ino;
        if (S_ISDIR(a->mode)) {
          paths_[p] = NewNode(true);
          todo.push_back({p, a->ino});
          continue;
        }
        auto it = by_ino.find(a->ino);
        if (it != by_ino.end()) {
          paths_[p] = it->second;
          continue;
        }
        std::string c(a->size, '\0');
        auto r = fs->Read(a->ino, 0, c.size(), c.data());
        AGFS_DRIVER_OK(r.ok() && *r == c.size()) << "reload: read " << p;
        paths_[p] = NewNode(false);
        nodes_[paths_[p]].content = std::move(c);
        by_ino[a->ino] = paths_[p];
      }
    }
  }

  SyncTracker& tracker() { return tracker_; }
  // An operation failed (not tolerated) on this Driver.
  bool failed() const { return failed_; }
  bool Exists(const std::string& p) const { return paths_.count(p) != 0; }
  bool IsDir(const std::string& p) const { return nodes_[paths_.at(p)].dir; }
  const std::string& Content(const std::string& p) const { return nodes_[paths_.at(p)].content; }
  std::vector<std::string> Files(const std::string& under = "/") const {
    std::vector<std::string> out;
    for (const auto& [p, n] : paths_) {
      if (!nodes_[n].dir && Parent(p) == under) out.push_back(p);
    }
    return out;
  }

  void Mkdir(const std::string& p) {
    tracker_.Modified({p, Parent(p)});
    auto r = fs_->Mkdir(c_, Ino(Parent(p)), Base(p), 0755);
    AGFS_DRIVER_OK(r.ok()) << "mkdir " << p << ": " << r.status().ToString();
    paths_[p] = NewNode(true);
    inos_[p] = r->ino;
  }
  void Create(const std::string& p) {
    tracker_.Modified({p, Parent(p)});
    auto r = fs_->Mknod(c_, Ino(Parent(p)), Base(p), S_IFREG | 0644, 0);
    AGFS_DRIVER_OK(r.ok()) << "create " << p << ": " << r.status().ToString();
    paths_[p] = NewNode(false);
    inos_[p] = r->ino;
  }
  void Write(const std::string& p, uint64_t off, const std::string& data) {
    tracker_.Modified(Links(p));
    auto r = fs_->Write(c_, Ino(p), off, data.data(), data.size());
    AGFS_DRIVER_OK(r.ok()) << "write " << p << ": " << r.status().ToString();
    AGFS_DRIVER_OK(*r == data.size()) << "write " << p << ": short";
    std::string& c = nodes_[paths_[p]].content;
    if (c.size() < off + data.size()) c.resize(off + data.size(), '\0');
    c.replace(off, data.size(), data);
  }
  void Append(const std::string& p, const std::string& data) { Write(p, Content(p).size(), data); }
  void Truncate(const std::string& p, uint64_t size) {
    tracker_.Modified(Links(p));
    SetAttrRequest r;
    r.size = true;
    r.new_size = size;
    auto a = fs_->SetAttr(c_, Ino(p), r);
    AGFS_DRIVER_OK(a.ok()) << "truncate " << p << ": " << a.status().ToString();
    nodes_[paths_[p]].content.resize(size, '\0');
  }
  // Files only (a directory's descendants would all move).
  void Rename(const std::string& from, const std::string& to) {
    std::vector<std::string> touched = Links(from);
    touched.push_back(to);
    touched.push_back(Parent(from));
    touched.push_back(Parent(to));
    tracker_.Modified(touched);
    Status st = fs_->Rename(c_, Ino(Parent(from)), Base(from), Ino(Parent(to)), Base(to), 0);
    AGFS_DRIVER_OK(st.ok()) << "rename " << from << " " << to << ": " << st.ToString();
    paths_[to] = paths_[from];
    inos_[to] = inos_[from];
    paths_.erase(from);
    inos_.erase(from);
  }
  void Unlink(const std::string& p) {
    std::vector<std::string> touched = Links(p);
    touched.push_back(Parent(p));
    tracker_.Modified(touched);
    Status st = fs_->Unlink(c_, Ino(Parent(p)), Base(p));
    AGFS_DRIVER_OK(st.ok()) << "unlink " << p << ": " << st.ToString();
    paths_.erase(p);
    inos_.erase(p);
  }
  void Link(const std::string& existing, const std::string& p) {
    std::vector<std::string> touched = Links(existing);
    touched.push_back(p);
    touched.push_back(Parent(p));
    tracker_.Modified(touched);
    auto r = fs_->Link(c_, Ino(existing), Ino(Parent(p)), Base(p));
    AGFS_DRIVER_OK(r.ok()) << "link " << existing << " " << p << ": " << r.status().ToString();
    paths_[p] = paths_[existing];
    inos_[p] = inos_[existing];
  }
  // fsync of a file, fsyncdir of a directory: records what must now survive.
  void Fsync(const std::string& p) {
    Status st = fs_->Fsync(Ino(p), false);
    AGFS_DRIVER_OK(st.ok()) << "fsync " << p << ": " << st.ToString();
    SyncTracker::Want w;
    w.path = p;
    w.dir = IsDir(p);
    if (w.dir) {
      for (const auto& [q, n] : paths_) {
        if (q != "/" && Parent(q) == p) w.names.insert(Base(q));
      }
    } else {
      w.content = Content(p);
    }
    tracker_.Synced(std::move(w));
  }

 private:
  struct Node {
    bool dir;
    std::string content;
  };
  size_t NewNode(bool dir) {
    nodes_.push_back({dir, {}});
    return nodes_.size() - 1;
  }
  uint64_t Ino(const std::string& p) { return p == "/" ? fs_->root_ino() : inos_.at(p); }
  bool MarkFailed() {
    failed_ = true;
    return true;
  }
  bool Tolerated() {
    if (!dead_ || !dead_(fs_)) return false;
    dropped_++;
    return true;
  }
  // Every path naming the same node as p (hard links).
  std::vector<std::string> Links(const std::string& p) const {
    std::vector<std::string> out;
    const size_t n = paths_.at(p);
    for (const auto& [q, m] : paths_) {
      if (m == n) out.push_back(q);
    }
    return out;
  }

  std::vector<Filesystem*> nodes_fs_;
  Filesystem* fs_;
  std::function<bool(Filesystem*)> dead_;
  uint64_t dropped_ = 0;
  bool failed_ = false;
  Caller c_;
  SyncTracker tracker_;
  std::vector<Node> nodes_;
  std::map<std::string, size_t> paths_;
  std::map<std::string, uint64_t> inos_;
};

std::string Data(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  uint64_t x = rng();
  for (size_t i = 0; i < n; i++) {
    if (i % 8 == 0) x = x * 6364136223846793005ull + 1442695040888963407ull;
    s[i] = char('a' + (x >> (8 * (i % 8))) % 26);
  }
  return s;
}

// ------------------------------------------------------------------------------
// Workloads. Each runs on a fresh filesystem through a Driver.

using Workload = void (*)(Driver& d, std::mt19937_64& rng);

// Create, rename (also over existing files), unlink, fsync and fsyncdir in 4 dirs.
void ChurnWorkload(Driver& d, std::mt19937_64& rng) {
  const std::vector<std::string> dirs = {"/a", "/b", "/c", "/d"};
  for (const auto& p : dirs) d.Mkdir(p);
  d.Fsync("/");
  int next = 0;
  for (int op = 0; op < 160; op++) {
    const std::string dir = dirs[rng() % dirs.size()];
    std::vector<std::string> files = d.Files(dir);
    const int kind = int(rng() % 10);
    if (kind < 3 || files.empty()) {
      std::string p = dir + "/f" + std::to_string(next++);
      d.Create(p);
      d.Write(p, 0, Data(rng, 1 + rng() % 9000));
    } else if (kind < 5) {
      std::string to = dirs[rng() % dirs.size()] + "/f" +
                       std::to_string(rng() % 2 ? next++ : int(rng() % std::max(next, 1)));
      std::string from = files[rng() % files.size()];
      if (from != to && (!d.Exists(to) || !d.IsDir(to))) d.Rename(from, to);
    } else if (kind < 7) {
      d.Unlink(files[rng() % files.size()]);
    } else if (kind < 9) {
      d.Fsync(files[rng() % files.size()]);
    } else {
      d.Fsync(dir);
    }
    if (::testing::Test::HasFatalFailure()) return;
  }
  for (const auto& p : dirs) d.Fsync(p);
}

// Appends of varied sizes to a few files, each usually followed by fsync.
void AppendWorkload(Driver& d, std::mt19937_64& rng) {
  const std::vector<std::string> files = {"/log0", "/log1", "/log2"};
  for (const auto& p : files) d.Create(p);
  d.Fsync("/");
  for (int op = 0; op < 120; op++) {
    const std::string& p = files[rng() % files.size()];
    const size_t n = rng() % 4 == 0 ? 4096 * (1 + rng() % 6) : 1 + rng() % 3000;
    d.Append(p, Data(rng, n));
    if (rng() % 4 != 0) d.Fsync(p);
    if (::testing::Test::HasFatalFailure()) return;
  }
  for (const auto& p : files) d.Fsync(p);
}

// Large writes at random offsets (sparse and overlapping) and truncates both ways.
void LargeWriteWorkload(Driver& d, std::mt19937_64& rng) {
  const std::vector<std::string> files = {"/big0", "/big1"};
  for (const auto& p : files) d.Create(p);
  d.Fsync("/");
  for (int op = 0; op < 60; op++) {
    const std::string& p = files[rng() % files.size()];
    const int kind = int(rng() % 6);
    if (kind < 3) {
      const uint64_t off = (rng() % 3 == 0 ? 4096 * (rng() % 512) : rng() % (2 << 20));
      d.Write(p, off, Data(rng, 1024 + rng() % (768 << 10)));
    } else if (kind < 5) {
      const uint64_t size = d.Content(p).size();
      d.Truncate(p, rng() % 3 == 0 ? size + rng() % (256 << 10) : (size ? rng() % size : 0));
    }
    if (kind == 5 || rng() % 2) d.Fsync(p);
    if (::testing::Test::HasFatalFailure()) return;
  }
  for (const auto& p : files) d.Fsync(p);
}

// One directory grows from inline to many hashed leaf blocks, then shrinks.
void DirGrowthWorkload(Driver& d, std::mt19937_64& rng) {
  d.Mkdir("/big");
  d.Fsync("/");
  std::vector<std::string> names;
  for (int i = 0; i < 420; i++) {
    std::string p = "/big/entry-with-a-longish-name-" + std::to_string(i) + "-" +
                    std::to_string(rng() % 100000);
    d.Create(p);
    names.push_back(p);
    if (i % 5 == 0) d.Write(p, 0, Data(rng, 1 + rng() % 200));
    if (i % 20 == 19) d.Fsync("/big");
    if (i % 50 == 7) d.Fsync(p);
    if (::testing::Test::HasFatalFailure()) return;
  }
  std::shuffle(names.begin(), names.end(), rng);
  for (int i = 0; i < 200; i++) {
    d.Unlink(names[i]);
    if (i % 25 == 24) d.Fsync("/big");
    if (::testing::Test::HasFatalFailure()) return;
  }
  d.Fsync("/big");
}

// Hard links across directories; writes through one name; unlinks of the original.
void HardLinkWorkload(Driver& d, std::mt19937_64& rng) {
  d.Mkdir("/x");
  d.Mkdir("/y");
  d.Fsync("/");
  int next = 0;
  for (int op = 0; op < 120; op++) {
    std::vector<std::string> xs = d.Files("/x"), ys = d.Files("/y");
    std::vector<std::string> all = xs;
    all.insert(all.end(), ys.begin(), ys.end());
    const int kind = int(rng() % 8);
    if (kind < 2 || all.empty()) {
      std::string p = "/x/h" + std::to_string(next++);
      d.Create(p);
      d.Write(p, 0, Data(rng, 1 + rng() % 6000));
    } else if (kind < 4) {
      const std::string& from = all[rng() % all.size()];
      d.Link(from, std::string(rng() % 2 ? "/y" : "/x") + "/l" + std::to_string(next++));
    } else if (kind < 5) {
      const std::string& p = all[rng() % all.size()];
      d.Write(p, rng() % (d.Content(p).size() + 1), Data(rng, 1 + rng() % 3000));
    } else if (kind < 6) {
      d.Unlink(all[rng() % all.size()]);
    } else if (kind < 7) {
      d.Fsync(all[rng() % all.size()]);
    } else {
      d.Fsync(rng() % 2 ? "/x" : "/y");
    }
    if (::testing::Test::HasFatalFailure()) return;
  }
  d.Fsync("/x");
  d.Fsync("/y");
}

// One operation on the shared directories /s and /t: create (and write), append,
// rename, unlink, fsync of a file or of the directory. A create that failed (a cut
// node) writes nothing.
void SharedDirOp(Driver& d, std::mt19937_64& rng, int& next) {
  const std::vector<std::string> dirs = {"/s", "/t"};
  const std::string dir = dirs[rng() % dirs.size()];
  std::vector<std::string> files = d.Files(dir);
  const int kind = int(rng() % 10);
  if (kind < 3 || files.empty()) {
    std::string p = dir + "/n" + std::to_string(next++);
    d.Create(p);
    if (d.Exists(p)) d.Write(p, 0, Data(rng, 1 + rng() % 5000));
  } else if (kind < 5) {
    const std::string& p = files[rng() % files.size()];
    d.Append(p, Data(rng, 1 + rng() % 9000));
  } else if (kind < 6) {
    d.Rename(files[rng() % files.size()],
             dirs[rng() % dirs.size()] + "/n" + std::to_string(next++));
  } else if (kind < 7) {
    d.Unlink(files[rng() % files.size()]);
  } else if (kind < 9) {
    d.Fsync(files[rng() % files.size()]);
  } else {
    d.Fsync(dir);
  }
}

// Two nodes at once on shared directories: creates, appends, renames and unlinks
// from either node, fsync from either (the filesystem lock moves between them at
// almost every step, so each handover commits and writes home the other's changes).
// Both nodes are cut at the same instant.
void TwoNodeWorkload(Driver& d, std::mt19937_64& rng) {
  d.Mkdir("/s");
  d.Mkdir("/t");
  d.Fsync("/");
  int next = 0;
  for (int op = 0; op < 100; op++) {
    d.Use(rng() % d.node_count());
    SharedDirOp(d, rng, next);
    if (::testing::Test::HasFatalFailure()) return;
  }
  d.Use(0);
  d.Fsync("/s");
  d.Fsync("/t");
}

// ------------------------------------------------------------------------------
// Checking one crash image.

Result<uint64_t> Resolve(Filesystem* fs, const std::string& path) {
  uint64_t ino = fs->root_ino();
  size_t pos = 1;
  while (pos < path.size()) {
    size_t end = path.find('/', pos);
    if (end == std::string::npos) end = path.size();
    auto a = fs->Lookup(ino, path.substr(pos, end - pos));
    if (!a.ok()) return a.status();
    ino = a->ino;
    pos = end + 1;
  }
  return ino;
}

Status CheckWant(Filesystem* fs, const SyncTracker::Want& w) {
  auto ino = Resolve(fs, w.path);
  if (!ino.ok()) return Err(ino.status().code(), w.path + ": " + ino.status().ToString());
  if (w.dir) {
    std::set<std::string> names;
    AGFS_RETURN_IF_ERROR(fs->ReadDir(*ino, 0, false, [&](const DirEntryOut& e) {
      if (e.name != "." && e.name != "..") names.insert(e.name);
      return true;
    }));
    if (names != w.names) {
      std::string msg = w.path + ": directory holds " + std::to_string(names.size()) +
                        " names, fsyncdir had " + std::to_string(w.names.size());
      for (const auto& n : w.names) {
        if (!names.count(n)) msg += "; lost " + n;
      }
      for (const auto& n : names) {
        if (!w.names.count(n)) msg += "; extra " + n;
      }
      return Err(Code::kCorruption, msg);
    }
    return Status::Ok();
  }
  auto a = fs->GetAttr(*ino);
  if (!a.ok()) return a.status();
  if (a->size != w.content.size()) {
    return Err(Code::kCorruption, w.path + ": size " + std::to_string(a->size) +
                                      ", fsync had " + std::to_string(w.content.size()));
  }
  std::string got(w.content.size(), '\0');
  auto r = fs->Read(*ino, 0, got.size(), got.data());
  if (!r.ok()) return Err(r.status().code(), w.path + ": read: " + r.status().ToString());
  if (*r != got.size() || got != w.content) {
    size_t i = 0;
    while (i < got.size() && got[i] == w.content[i]) i++;
    return Err(Code::kCorruption,
               w.path + ": content differs from what fsync had, first at byte " + std::to_string(i));
  }
  return Status::Ok();
}

// fsck of the crash image as it is, before any mount: it must see only what a crash
// leaves (a journal to replay, orphans to free), which it replays in memory.
Status CheckCrashedImage(MemDevice* mem) {
  FsckOptions fo;
  fo.heartbeat_ms_override = 50;
  auto r = Fsck(mem, fo);
  if (!r.ok()) return Err(r.status().code(), "fsck before mount: " + r.status().ToString());
  for (const FsckProblem& p : r->problems) {
    if (p.kind != "journal-needs-replay" && p.kind != "orphan") {
      return Err(Code::kCorruption, "fsck before mount:\n" + r->ToText());
    }
  }
  if (r->omitted_unrepaired != 0) {
    return Err(Code::kCorruption, "fsck before mount: problems omitted:\n" + r->ToText());
  }
  return Status::Ok();
}

Status WaitForRecoveries(Filesystem* fs, const MountOptions& mo) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(20 * uint64_t(mo.dead_after_ms_override));
  const uint32_t self = fs->info().slot;
  for (;;) {
    std::string pending;
    for (const PeerInfo& p : fs->membership()->Peers()) {
      if (p.slot == self || p.state == PeerState::kFree || p.state == PeerState::kRecovered) {
        continue;
      }
      pending += " slot " + std::to_string(p.slot) + " (" + PeerStateName(p.state) + ")";
    }
    if (pending.empty()) return Status::Ok();
    if (std::chrono::steady_clock::now() > deadline) {
      return Err(Code::kTimedOut, "crashed node slots never recovered:" + pending);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// fsck of the crash image as found (every `fsck_every`th image), then mount (journal
// replay), check the synced state, unmount, fsck. OK or what failed.
Status CheckImage(std::vector<uint8_t> image, const std::vector<SyncTracker::Want>& wants,
                  bool fsck_first, const MountOptions& mo) {
  auto mem = std::make_shared<MemDevice>(std::move(image), "crash-image");
  if (fsck_first) AGFS_RETURN_IF_ERROR(CheckCrashedImage(mem.get()));
  auto m = Filesystem::Mount(std::make_unique<FaultDevice>(mem), mo);
  if (!m.ok()) return Err(m.status().code(), "mount: " + m.status().ToString());
  std::unique_ptr<Filesystem> fs = std::move(m).value();
  // A crashed node that held no lock (e.g. cut inside its unmount, after it let the
  // lock go and before it freed its slot) does not hold the mount up: it is declared
  // dead and recovered once this node has watched its heartbeat stand still long
  // enough. Stay mounted until every other slot is free or recovered.
  Status st = WaitForRecoveries(fs.get(), mo);
  for (const auto& w : wants) {
    if (!st.ok()) break;
    st = CheckWant(fs.get(), w);
    if (!st.ok()) st = Err(st.code(), "synced state: " + st.message());
  }
  Status um = fs->Unmount();
  fs.reset();
  if (!st.ok()) return Err(st.code(), "after mount: " + st.message());
  if (!um.ok()) return Err(um.code(), "unmount: " + um.ToString());
  FsckOptions fo;
  fo.heartbeat_ms_override = 50;
  auto r = Fsck(mem.get(), fo);
  if (!r.ok()) return Err(r.status().code(), "fsck: " + r.status().ToString());
  if (!r->problems.empty() || r->problems_omitted != 0) {
    return Err(Code::kCorruption, "fsck not clean:\n" + r->ToText());
  }
  return Status::Ok();
}

// ------------------------------------------------------------------------------
// Runs a workload on a recorded device, then checks `images` crash images with
// `jobs` mounts at once.
struct RunResult {
  uint64_t images = 0, failures = 0, barriers = 0, writes = 0, syncs = 0;
  uint64_t retries = 0;  // checks repeated with slow timings after a lease lapse
};

void RunWorkload(const char* name, Workload w, size_t nodes, uint64_t seed, uint64_t images,
                 RunResult* out) {
  auto mem = std::make_shared<MemDevice>(kDeviceBytes, "crashpoint");
  MkfsOptions mo;
  mo.params.node_slots = uint32_t(nodes + 1);  // one more for the checking mount
  mo.params.journal_blocks = kMinJournalBlocks;
  ASSERT_TRUE(Mkfs(mem.get(), mo).ok());
  ASSERT_TRUE(mem->Flush().ok());
  std::vector<uint8_t> base = mem->DurableImage();

  auto rec = std::make_shared<RecordingDevice>(mem.get());
  std::unique_ptr<SyncTracker> tracker;
  {
    std::vector<std::unique_ptr<Filesystem>> fss;
    std::vector<Filesystem*> ptrs;
    for (size_t i = 0; i < nodes; i++) {
      // Long lease: nothing to declare dead here, and a lapse would fail the workload.
      MountOptions o = SlowNodeOptions();
      o.host = "node" + std::to_string(i);
      auto m = Filesystem::Mount(std::make_unique<FaultDevice>(rec), o);
      ASSERT_TRUE(m.ok()) << m.status().ToString();
      fss.push_back(std::move(m).value());
      ptrs.push_back(fss.back().get());
    }
    Driver d(ptrs, rec.get());
    std::mt19937_64 rng(seed);
    w(d, rng);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    for (size_t i = nodes; i-- > 0;) ASSERT_TRUE(fss[i]->Unmount().ok());
    tracker = std::make_unique<SyncTracker>(d.tracker());
  }
  auto logr = CrashLog::Make(std::move(base), rec->TakeLog());
  ASSERT_TRUE(logr.ok()) << logr.status().ToString();
  const CrashLog& log = **logr;
  out->barriers = log.barriers();
  out->writes = log.writes();
  out->syncs = tracker->syncs();
  const std::vector<CrashImageSpec> specs = log.Plan(seed, images);

  // Builder (this thread) -> bounded queue -> checkers.
  const uint64_t jobs = std::max<uint64_t>(1, EnvU64("AGORAFS_CRASHPOINT_JOBS", 24));
  const uint64_t fsck_every = EnvU64("AGORAFS_CRASHPOINT_FSCK_EVERY", 1);
  struct Job {
    uint64_t index = 0;
    CrashImageSpec spec;
    std::vector<uint8_t> image;
    std::string what;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Job> queue;
  bool done = false;
  std::atomic<uint64_t> checked{0}, failures{0}, retries{0};
  std::vector<std::string> reports;
  const char* save_env = std::getenv("AGORAFS_CRASHPOINT_SAVE");
  const std::string save_dir = save_env && *save_env ? save_env : ::testing::TempDir();

  auto worker = [&] {
    for (;;) {
      Job j;
      {
        std::unique_lock<std::mutex> l(mu);
        cv.wait(l, [&] { return done || !queue.empty(); });
        if (queue.empty()) return;
        j = std::move(queue.front());
        queue.pop_front();
      }
      cv.notify_all();
      const bool fsck_first = fsck_every != 0 && j.index % fsck_every == 0;
      const auto wants = tracker->At(j.spec.cut);
      Status st = CheckImage(std::move(j.image), wants, fsck_first, NodeOptions());
      if (!st.ok() && LeaseLapse(st)) {
        retries++;
        st = CheckImage(log.Build(j.spec), wants, fsck_first, SlowNodeOptions());
      }
      checked++;
      if (st.ok()) continue;
      const uint64_t n = failures++;
      std::string where;
      if (n < 3) {
        const std::vector<uint8_t> copy = log.Build(j.spec);  // the same image again
        where = save_dir + "/crashpoint-" + name + "-" + std::to_string(j.spec.cut) + "-" +
                std::to_string(j.spec.sample) + ".img";
        std::ofstream f(where, std::ios::binary);
        f.write(reinterpret_cast<const char*>(copy.data()), std::streamsize(copy.size()));
        where = " (image saved to " + where + ")";
      }
      std::lock_guard<std::mutex> l(mu);
      reports.push_back(std::string("workload ") + name + ", seed " + std::to_string(seed) +
                        ", image cut " + std::to_string(j.spec.cut) + " sample " +
                        std::to_string(j.spec.sample) + " [" + j.what + "]" + where + ": " +
                        st.ToString());
    }
  };
  std::vector<std::thread> threads;
  for (uint64_t i = 0; i < jobs; i++) threads.emplace_back(worker);
  uint64_t built = 0;
  log.ForEachImage(specs, [&](const CrashImageSpec& s, std::vector<uint8_t> img,
                              const std::string& what) {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return queue.size() < jobs; });
    queue.push_back({built++, s, std::move(img), what});
    cv.notify_all();
    return true;
  });
  {
    std::lock_guard<std::mutex> l(mu);
    done = true;
  }
  cv.notify_all();
  for (auto& t : threads) t.join();
  out->images = checked.load();
  out->failures = failures.load();
  out->retries = retries.load();
  for (size_t i = 0; i < reports.size() && i < 10; i++) ADD_FAILURE() << reports[i];
}

uint64_t Seed() { return EnvU64("AGORAFS_CRASHPOINT_SEED", kDefaultSeed); }

constexpr int kWorkloads = 7;
uint64_t ImagesPerWorkload() {
  // Rounded up: the total is at least what was asked for.
  return std::max<uint64_t>(1, (EnvU64("AGORAFS_CRASHPOINT_IMAGES", 2000) + kWorkloads - 1) /
                                   kWorkloads);
}

void RunAndReport(const char* name, Workload w, uint64_t seed_salt, size_t nodes = 1) {
  const uint64_t seed = Seed() + seed_salt;
  auto t0 = std::chrono::steady_clock::now();
  RunResult r;
  RunWorkload(name, w, nodes, seed, ImagesPerWorkload(), &r);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("crash-replay: workload %s: %llu images checked, %llu failures (seed %llu; %llu "
              "barriers, %llu writes, %llu fsyncs; %llu checks retried after a lease lapse "
              "of the checking node; %.1f s)\n",
              name, (unsigned long long)r.images, (unsigned long long)r.failures,
              (unsigned long long)seed, (unsigned long long)r.barriers,
              (unsigned long long)r.writes, (unsigned long long)r.syncs,
              (unsigned long long)r.retries, secs);
  std::fflush(stdout);
  EXPECT_EQ(r.failures, 0u);
  EXPECT_GT(r.images, 0u);
}

// ------------------------------------------------------------------------------
// One node cut while the other continues. Node A and node B work on shared
// directories of one MemDevice; A reaches it through a CutDevice that, at the chosen
// point, stops A's host: A's later writes never reach the device (and nothing of A
// works any more), the way a power cut of host A looks to B. The device itself keeps
// everything A's completed writes put there (its cache is B's too). A is then torn
// down without unmounting; B must see A dead, recover it (replay A's journal) and go
// on with its own work. Each crash point is a live run, not an image replay.

// Where A's host stops, counted from when the cut is armed (both nodes mounted).
enum class CutAt : uint8_t {
  kBarrier = 0,    // right after A's n-th flush returned (n = 0: at once)
  kWrite = 1,      // A's writes before the n-th (0-based) landed, the n-th and later not
  kTornWrite = 2,  // as kWrite, but a random subset of the n-th write's sectors landed
};
const char* CutAtName(CutAt c) {
  return c == CutAt::kBarrier ? "after flush" : c == CutAt::kWrite ? "before write" : "torn write";
}

class CutDevice final : public BlockDevice {
 public:
  explicit CutDevice(std::shared_ptr<BlockDevice> base) : base_(std::move(base)) {}
  // Arms the cut; counting starts now.
  void Arm(CutAt at, uint64_t n, uint64_t seed) {
    std::lock_guard<std::mutex> l(mu_);
    armed_ = true, at_ = at, n_ = n, seed_ = seed, writes_ = 0, flushes_ = 0;
    if (at == CutAt::kBarrier && n == 0) gone_ = true;
  }
  void Cut() {
    std::lock_guard<std::mutex> l(mu_);
    gone_ = true;
  }
  bool gone() const {
    std::lock_guard<std::mutex> l(mu_);
    return gone_;
  }
  uint64_t writes() const {
    std::lock_guard<std::mutex> l(mu_);
    return writes_;
  }
  uint64_t flushes() const {
    std::lock_guard<std::mutex> l(mu_);
    return flushes_;
  }
  Status Read(uint64_t offset, void* buf, size_t len) override {
    if (gone()) return Err(Code::kIOError, "host cut");
    return base_->Read(offset, buf, len);
  }
  // Held under mu_ across the forwarded call: the cut is an instant in A's I/O order.
  Status Write(uint64_t offset, const void* buf, size_t len) override {
    std::lock_guard<std::mutex> l(mu_);
    if (gone_) return Err(Code::kIOError, "host cut");
    if (armed_ && at_ != CutAt::kBarrier && writes_ == n_) {
      gone_ = true;
      if (at_ == CutAt::kTornWrite) {
        std::mt19937_64 rng(seed_);
        const uint64_t keep = rng() % 100;
        const auto* p = static_cast<const uint8_t*>(buf);
        for (size_t o = 0; o < len; o += 512) {
          if (rng() % 100 < keep) {
            (void)base_->Write(offset + o, p + o, std::min<size_t>(512, len - o));
          }
        }
      }
      return Err(Code::kIOError, "host cut");
    }
    Status st = base_->Write(offset, buf, len);
    if (st.ok()) writes_++;
    return st;
  }
  Status Flush() override {
    std::lock_guard<std::mutex> l(mu_);
    if (gone_) return Err(Code::kIOError, "host cut");
    Status st = base_->Flush();
    if (st.ok()) flushes_++;
    if (armed_ && at_ == CutAt::kBarrier && flushes_ >= n_) gone_ = true;
    return st;
  }
  uint64_t Size() const override { return base_->Size(); }
  std::string Name() const override { return "cut(" + base_->Name() + ")"; }

 private:
  std::shared_ptr<BlockDevice> base_;
  mutable std::mutex mu_;
  bool armed_ = false, gone_ = false;
  CutAt at_ = CutAt::kBarrier;
  uint64_t n_ = 0, seed_ = 0, writes_ = 0, flushes_ = 0;
};


struct CutRun {
  bool cut_in_workload = false;  // the cut came during the shared phase (else at its end)
  uint64_t a_writes = 0, a_flushes = 0;  // A's I/O after arming
  uint64_t recovered_ops = 0;            // B's operations after A's cut
};

// One live run cut at (at, n); n = UINT64_MAX: no cut during the workload (A is cut at
// the end of the shared phase). OK or what failed.
Status RunOneNodeCut(uint64_t seed, CutAt at, uint64_t n, const MountOptions& mo, CutRun* out) {
  auto mem = std::make_shared<MemDevice>(kDeviceBytes, "one-node-cut");
  MkfsOptions mk;
  mk.params.node_slots = 3;  // A, B, the checking mount
  mk.params.journal_blocks = kMinJournalBlocks;
  {
    auto made = Mkfs(mem.get(), mk);
    if (!made.ok()) return made.status();
  }
  AGFS_RETURN_IF_ERROR(mem->Flush());
  auto cut = std::make_shared<CutDevice>(mem);
  MountOptions oa = mo, ob = mo;
  oa.host = "nodeA";
  // A's lock revoke fails once its host is cut: in a daemon the process would exit;
  // here A is torn down by the run as soon as it sees the cut.
  oa.on_fatal = [](const Status&) { std::this_thread::sleep_for(std::chrono::milliseconds(50)); };
  ob.host = "nodeB";
  auto ma = Filesystem::Mount(std::make_unique<FaultDevice>(cut), oa);
  if (!ma.ok()) return Err(ma.status().code(), "mount A: " + ma.status().ToString());
  std::unique_ptr<Filesystem> a = std::move(ma).value();
  auto mb = Filesystem::Mount(std::make_unique<FaultDevice>(mem), ob);
  if (!mb.ok()) return Err(mb.status().code(), "mount B: " + mb.status().ToString());
  std::unique_ptr<Filesystem> b = std::move(mb).value();
  Filesystem* const a_ptr = a.get();

  Driver d({b.get(), a.get()}, nullptr);
  // A's operations may fail once its host is cut. A node whose own lease lapsed (a
  // loaded machine starved its heartbeat thread) is a timing fault of this machine:
  // the run is then repeated with long timings.
  bool lapsed = false;
  d.TolerateFailuresOf([&](Filesystem* f) {
    if (f == a_ptr && cut->gone()) return true;
    if (!f->membership()->LeaseValid()) lapsed = true;
    return lapsed;
  });
  auto lapse = [&] { return Err(Code::kFenced, "a node's lease lapsed during the workload"); };
  std::mt19937_64 rng(seed);
  int next = 0;
  // Setup by B, then the cut is armed.
  d.Mkdir("/s");
  d.Mkdir("/t");
  d.Fsync("/");
  if (d.failed()) return Err(Code::kInvalid, "setup failed");
  if (lapsed) return lapse();
  cut->Arm(n == UINT64_MAX ? CutAt::kWrite : at, n, seed ^ n);

  // A's host is gone: tear A down without unmounting (nothing of it reaches the
  // device), wait until B has declared A dead and replayed its journal, check that
  // B sees everything synced so far, and carry on with B's view as the model.
  auto cut_over = [&]() -> Status {
    out->a_writes = cut->writes();
    out->a_flushes = cut->flushes();
    cut->Cut();
    (void)a->Unmount();
    a.reset();
    d.SetNodes({b.get()});
    AGFS_RETURN_IF_ERROR(WaitForRecoveries(b.get(), mo));
    for (const auto& w : d.tracker().At(0)) {
      Status st = CheckWant(b.get(), w);
      if (!st.ok() && !b->membership()->LeaseValid()) return lapse();
      if (!st.ok()) return Err(st.code(), "B after recovering A: " + st.message());
    }
    d.Reload(b.get());
    if (lapsed) return lapse();
    if (d.failed()) return Err(Code::kInvalid, "reload failed");
    return Status::Ok();
  };
  for (int op = 0; op < 80; op++) {
    if (a) d.Use(rng() % 2);  // 0: B, 1: A
    SharedDirOp(d, rng, next);
    if (d.failed()) return Err(Code::kInvalid, "workload op failed");
    if (lapsed) return lapse();
    if (a && cut->gone()) {
      out->cut_in_workload = true;
      AGFS_RETURN_IF_ERROR(cut_over());
    } else if (!a) {
      out->recovered_ops++;
    }
  }
  if (a) AGFS_RETURN_IF_ERROR(cut_over());
  // B goes on alone, then syncs its directories.
  for (int op = 0; op < 30; op++) {
    SharedDirOp(d, rng, next);
    if (d.failed()) return Err(Code::kInvalid, "B op failed");
    if (lapsed) return lapse();
    out->recovered_ops++;
  }
  d.Fsync("/s");
  d.Fsync("/t");
  if (d.failed()) return Err(Code::kInvalid, "B fsync failed");
  if (lapsed) return lapse();
  Status um = b->Unmount();
  if (!um.ok()) return Err(um.code(), "unmount B: " + um.ToString());
  b.reset();
  // A fresh mount: every file A fsynced before its cut (unless B changed it later) and
  // everything B fsynced hold exactly what was synced; unmount; fsck clean.
  return CheckImage(mem->DurableImage(), d.tracker().At(0), true, mo);
}

void RunOneNodeCutAndReport(uint64_t seed_salt) {
  const uint64_t seed = Seed() + seed_salt;
  auto t0 = std::chrono::steady_clock::now();
  // The reference run (no cut in the workload) measures A's I/O to spread the cuts.
  CutRun ref;
  Status st = RunOneNodeCut(seed, CutAt::kWrite, UINT64_MAX, NodeOptions(), &ref);
  if (!st.ok() && LeaseLapse(st)) {
    ref = CutRun();
    st = RunOneNodeCut(seed, CutAt::kWrite, UINT64_MAX, SlowNodeOptions(), &ref);
  }
  ASSERT_TRUE(st.ok()) << "reference run (A cut at the end): " << st.ToString();
  // A live run costs about as much as several replayed images: a quarter of the share.
  const uint64_t runs = std::max<uint64_t>(3, ImagesPerWorkload() / 4);
  struct Spec {
    CutAt at;
    uint64_t n;
  };
  std::vector<Spec> specs;
  std::mt19937_64 rng(seed);
  for (uint64_t i = 0; i < runs; i++) {
    const CutAt at = CutAt(i % 3);
    const uint64_t range =
        at == CutAt::kBarrier ? ref.a_flushes + 1 : std::max<uint64_t>(ref.a_writes, 1);
    // Evenly spread over A's I/O, jittered within the step.
    const uint64_t k = i / 3, per = (runs + 2 - uint64_t(at)) / 3;
    const uint64_t lo = k * range / per, hi = std::max(lo + 1, (k + 1) * range / per);
    specs.push_back({at, lo + rng() % (hi - lo)});
  }
  const uint64_t jobs =
      std::min<uint64_t>(8, std::max<uint64_t>(1, EnvU64("AGORAFS_CRASHPOINT_JOBS", 24)));
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> retries{0}, in_workload{0}, b_ops{0};
  std::mutex mu;
  std::vector<std::string> reports;
  auto worker = [&] {
    for (size_t i; (i = next++) < specs.size();) {
      CutRun r;
      Status s = RunOneNodeCut(seed, specs[i].at, specs[i].n, NodeOptions(), &r);
      if (!s.ok() && LeaseLapse(s)) {
        retries++;
        r = CutRun();
        s = RunOneNodeCut(seed, specs[i].at, specs[i].n, SlowNodeOptions(), &r);
      }
      in_workload += r.cut_in_workload;
      b_ops += r.recovered_ops;
      if (s.ok()) continue;
      std::lock_guard<std::mutex> l(mu);
      reports.push_back("workload one-node-cut, seed " + std::to_string(seed) + ", A cut " +
                        CutAtName(specs[i].at) + " " + std::to_string(specs[i].n) + ": " +
                        s.ToString());
    }
  };
  std::vector<std::thread> threads;
  for (uint64_t i = 0; i < jobs; i++) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("crash-replay: workload one-node-cut: %zu live runs checked (+1 reference), %zu "
              "failures (seed %llu; A: %llu writes, %llu flushes in the reference run; %llu "
              "cuts inside the shared phase; %llu ops by B after A's cut; %llu runs retried "
              "after a lease lapse; %.1f s)\n",
              specs.size(), reports.size(), (unsigned long long)seed,
              (unsigned long long)ref.a_writes, (unsigned long long)ref.a_flushes,
              (unsigned long long)in_workload.load(), (unsigned long long)b_ops.load(),
              (unsigned long long)retries.load(), secs);
  std::fflush(stdout);
  for (size_t i = 0; i < reports.size() && i < 10; i++) ADD_FAILURE() << reports[i];
}

TEST(CrashPoint, CreateRenameUnlinkChurn) { RunAndReport("churn", ChurnWorkload, 0); }
TEST(CrashPoint, AppendsWithFsync) { RunAndReport("append", AppendWorkload, 1); }
TEST(CrashPoint, LargeWritesAndTruncate) { RunAndReport("large-write", LargeWriteWorkload, 2); }
TEST(CrashPoint, DirectoryGrowsPastOneLeaf) { RunAndReport("dir-growth", DirGrowthWorkload, 3); }
TEST(CrashPoint, HardLinks) { RunAndReport("hardlink", HardLinkWorkload, 4); }
TEST(CrashPoint, TwoNodesCutAtOnce) { RunAndReport("two-node", TwoNodeWorkload, 5, 2); }
TEST(CrashPoint, OneNodeCutOtherContinues) { RunOneNodeCutAndReport(6); }

}  // namespace
}  // namespace agorafs
