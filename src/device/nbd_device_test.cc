// NbdDevice against a real nbdkit on a Unix socket in a temp directory.
#include "device/nbd_device.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "device/device_test_util.h"

extern char** environ;

namespace agorafs {
namespace {

namespace fs = std::filesystem;

bool HaveNbdkit() { return std::system("nbdkit --version >/dev/null 2>&1") == 0; }

// A temp directory holding an image file and an nbdkit serving it on a Unix socket.
class NbdServer {
 public:
  NbdServer() {
    char tmpl[] = "/tmp/agorafs_nbd_test_XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    image_ = dir_ + "/disk.img";
    socket_ = dir_ + "/nbd.sock";
  }
  ~NbdServer() {
    Stop();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  void MakeImage(uint64_t size) {
    std::ofstream(image_).close();
    fs::resize_file(image_, size);
  }

  // Starts `nbdkit [args...]` (plugin, filters, parameters) and waits until it accepts
  // connections (nbdkit writes the pid file only then).
  ::testing::AssertionResult Start(const std::vector<std::string>& args) {
    std::string pidfile = dir_ + "/nbdkit.pid";
    fs::remove(pidfile);
    std::vector<std::string> argv = {"nbdkit", "--exit-with-parent", "-f", "-U", socket_,
                                     "-P", pidfile};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    if (posix_spawnp(&pid_, "nbdkit", nullptr, nullptr, cargv.data(), environ) != 0) {
      pid_ = -1;
      return ::testing::AssertionFailure() << "cannot spawn nbdkit";
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      int status;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return ::testing::AssertionFailure() << "nbdkit exited at start, status " << status;
      }
      std::error_code ec;
      if (fs::exists(pidfile, ec) && fs::file_size(pidfile, ec) > 0) {
        return ::testing::AssertionSuccess();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return ::testing::AssertionFailure() << "nbdkit not ready after 20 s";
  }

  void Stop(int sig = SIGTERM) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    int status;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

  std::string Uri() const { return "nbd+unix:///?socket=" + socket_; }
  const std::string& dir() const { return dir_; }
  const std::string& image() const { return image_; }

  std::string ReadFile(const std::string& path) const {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

 private:
  std::string dir_, image_, socket_;
  pid_t pid_ = -1;
};

class NbdDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveNbdkit()) GTEST_SKIP() << "nbdkit not installed";
  }
  NbdServer srv_;
};

TEST(NbdUriTest, Recognises) {
  EXPECT_TRUE(IsNbdUri("nbd://host/export"));
  EXPECT_TRUE(IsNbdUri("nbds://host:10809/"));
  EXPECT_TRUE(IsNbdUri("nbd+unix:///?socket=/tmp/s"));
  EXPECT_FALSE(IsNbdUri("/dev/sdb"));
  EXPECT_FALSE(IsNbdUri("disk.img"));
  EXPECT_FALSE(IsNbdUri("nbd:/x"));
}

TEST_F(NbdDeviceTest, ReadWriteFlushSizeAndFactory) {
  srv_.MakeImage(8 << 20);
  ASSERT_TRUE(srv_.Start({"file", srv_.image()}));
  OpenOptions o;
  auto dev = OpenDevice(srv_.Uri(), o);  // the factory picks NbdDevice for the URI
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  EXPECT_EQ((*dev)->Size(), 8u << 20);
  EXPECT_EQ((*dev)->Name(), srv_.Uri());

  AlignedBuffer w = Filled(3 * 4096, 0x5A);
  w.data()[7] = 1;
  ASSERT_TRUE((*dev)->Write(8192, w.data(), w.size()).ok());
  ASSERT_TRUE((*dev)->Flush().ok());
  AlignedBuffer r(3 * 4096);
  ASSERT_TRUE((*dev)->Read(8192, r.data(), r.size()).ok());
  EXPECT_EQ(std::memcmp(w.data(), r.data(), r.size()), 0);
  // Sector I/O at the very end; then beyond it and unaligned, both kInvalid.
  ASSERT_TRUE((*dev)->Write((8 << 20) - 512, w.data(), 512).ok());
  EXPECT_TRUE((*dev)->Read((8 << 20) - 512, r.data(), 1024).Is(Code::kInvalid));
  EXPECT_TRUE((*dev)->Read(100, r.data(), 512).Is(Code::kInvalid));
  ASSERT_TRUE((*dev)->Flush().ok());
  dev->reset();

  // The bytes are in the served file.
  std::string img = srv_.ReadFile(srv_.image());
  ASSERT_EQ(img.size(), 8u << 20);
  EXPECT_EQ(std::memcmp(img.data() + 8192, w.data(), w.size()), 0);
  EXPECT_EQ(std::memcmp(img.data() + (8 << 20) - 512, w.data(), 512), 0);

  // A plain path still goes to OpenFileDevice.
  auto file = OpenDevice(srv_.image(), o);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_EQ((*file)->Name(), srv_.image());
}

TEST_F(NbdDeviceTest, LargeRequestsAreSplit) {
  srv_.MakeImage(80 << 20);
  ASSERT_TRUE(srv_.Start({"file", srv_.image()}));
  auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  const size_t len = 70 << 20;  // over libnbd's 64 MiB request limit
  AlignedBuffer w(len);
  for (size_t i = 0; i < len; i += 4096) std::memset(w.data() + i, int(i >> 12), 4096);
  ASSERT_TRUE((*dev)->Write(4096, w.data(), len).ok());
  ASSERT_TRUE((*dev)->Flush().ok());
  AlignedBuffer r(len);
  ASSERT_TRUE((*dev)->Read(4096, r.data(), len).ok());
  EXPECT_EQ(std::memcmp(w.data(), r.data(), len), 0);
}

TEST_F(NbdDeviceTest, WriteBatchWritesEveryRange) {
  srv_.MakeImage(4 << 20);
  ASSERT_TRUE(srv_.Start({"file", srv_.image()}));
  auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  CheckWriteBatch(dev->get());
  ASSERT_TRUE((*dev)->Flush().ok());
  OpenOptions ro;
  ro.read_only = true;
  auto rdev = OpenNbdDevice(srv_.Uri(), ro);
  ASSERT_TRUE(rdev.ok()) << rdev.status().ToString();
  AlignedBuffer b = Filled(4096, 1);
  WriteOp two[] = {{0, b.data(), 4096}, {8192, b.data(), 4096}};
  EXPECT_TRUE((*rdev)->WriteBatch(two, 2).Is(Code::kReadOnly));
}

// A server error in the middle of a batch: the batch returns it once nothing is in
// flight any more, and the connection stays usable.
TEST_F(NbdDeviceTest, WriteBatchReturnsAServerErrorAndTheConnectionSurvives) {
  srv_.MakeImage(1 << 20);
  std::string trigger = srv_.dir() + "/fail-writes";
  ASSERT_TRUE(srv_.Start({"--filter=error", "file", srv_.image(), "error-pwrite-rate=50%",
                          "error-pwrite-file=" + trigger}));
  auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  std::ofstream(trigger).close();
  AlignedBuffer b = Filled(4096, 9);
  std::vector<WriteOp> ops;
  for (uint64_t k = 0; k < 100; k++) ops.push_back({k * 8192, b.data(), 4096});
  Status st = (*dev)->WriteBatch(ops.data(), ops.size());
  EXPECT_TRUE(st.Is(Code::kIOError)) << st.ToString();
  EXPECT_NE(st.message().find("nbd write " + srv_.Uri() + " at offset"), std::string::npos)
      << st.message();
  fs::remove(trigger);
  ASSERT_TRUE((*dev)->WriteBatch(ops.data(), ops.size()).ok());
  ASSERT_TRUE((*dev)->Flush().ok());
  AlignedBuffer r(4096);
  for (const auto& op : ops) {
    ASSERT_TRUE((*dev)->Read(op.offset, r.data(), r.size()).ok());
    EXPECT_TRUE(AllBytes(r.data(), r.size(), 9)) << "offset " << op.offset;
  }
}

TEST_F(NbdDeviceTest, ConcurrentIoUsesSeveralConnections) {
  srv_.MakeImage(16 << 20);
  std::string log = srv_.dir() + "/nbd.log";
  ASSERT_TRUE(srv_.Start({"--filter=log", "file", srv_.image(), "logfile=" + log}));
  {
    NbdOptions no;
    no.connections = 4;
    auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{}, no);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    BlockDevice* d = dev->get();
    constexpr int kThreads = 8, kIters = 100;
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (int t = 0; t < kThreads; t++) {
      threads.emplace_back([d, t, &failures] {
        AlignedBuffer w(8192), r(8192);
        for (int i = 0; i < kIters; i++) {
          uint64_t off = (uint64_t(t) * kIters + i) * 8192;
          std::memset(w.data(), (t * 31 + i) & 0xff, w.size());
          if (!d->Write(off, w.data(), w.size()).ok()) failures++;
          if (i % 10 == 0 && !d->Flush().ok()) failures++;
          if (!d->Read(off, r.data(), r.size()).ok() ||
              std::memcmp(w.data(), r.data(), r.size()) != 0) {
            failures++;
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
    // Every region holds what its writer last wrote.
    AlignedBuffer r(8192);
    for (int t = 0; t < kThreads; t++) {
      for (int i = 0; i < kIters; i += 17) {
        ASSERT_TRUE(d->Read((uint64_t(t) * kIters + i) * 8192, r.data(), r.size()).ok());
        EXPECT_EQ(r.data()[100], (t * 31 + i) & 0xff);
      }
    }
  }
  // The file plugin advertises multi-conn, so the pool opened four connections.
  std::string text = srv_.ReadFile(log);
  size_t connects = 0;
  for (size_t p = 0; (p = text.find(" Connect ", p)) != std::string::npos; p++) connects++;
  EXPECT_EQ(connects, 4u) << text.substr(0, 2000);
}

TEST_F(NbdDeviceTest, ReadOnlyOpenAndReadOnlyExport) {
  srv_.MakeImage(1 << 20);
  ASSERT_TRUE(srv_.Start({"-r", "file", srv_.image()}));
  auto rw = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_FALSE(rw.ok());
  EXPECT_TRUE(rw.status().Is(Code::kReadOnly)) << rw.status().ToString();
  OpenOptions o;
  o.read_only = true;
  auto ro = OpenNbdDevice(srv_.Uri(), o);
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  AlignedBuffer b(4096);
  EXPECT_TRUE((*ro)->Read(0, b.data(), b.size()).ok());
  EXPECT_TRUE((*ro)->Write(0, b.data(), b.size()).Is(Code::kReadOnly));
  EXPECT_TRUE((*ro)->Flush().ok());
}

TEST_F(NbdDeviceTest, CreateCannotGrowTheExport) {
  srv_.MakeImage(4 << 20);
  ASSERT_TRUE(srv_.Start({"file", srv_.image()}));
  OpenOptions o;
  o.create = true;
  o.create_size = 8 << 20;
  auto big = OpenDevice(srv_.Uri(), o);
  ASSERT_FALSE(big.ok());
  EXPECT_TRUE(big.status().Is(Code::kInvalid)) << big.status().ToString();
  o.create_size = 4 << 20;
  auto same = OpenDevice(srv_.Uri(), o);
  ASSERT_TRUE(same.ok()) << same.status().ToString();
  EXPECT_EQ((*same)->Size(), 4u << 20);
}

TEST_F(NbdDeviceTest, ServerWriteErrorIsIoErrorAndConnectionSurvives) {
  srv_.MakeImage(1 << 20);
  std::string trigger = srv_.dir() + "/fail-writes";
  ASSERT_TRUE(srv_.Start({"--filter=error", "file", srv_.image(), "error-pwrite-rate=100%",
                          "error-pwrite-file=" + trigger}));
  auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  AlignedBuffer b = Filled(4096, 7);
  ASSERT_TRUE((*dev)->Write(0, b.data(), b.size()).ok());
  std::ofstream(trigger).close();
  Status st = (*dev)->Write(12288, b.data(), b.size());
  EXPECT_TRUE(st.Is(Code::kIOError)) << st.ToString();
  EXPECT_NE(st.message().find(srv_.Uri()), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("offset 12288"), std::string::npos) << st.message();
  // Reads still work on the same connections, and writes once the fault clears.
  AlignedBuffer r(4096);
  EXPECT_TRUE((*dev)->Read(0, r.data(), r.size()).ok());
  EXPECT_EQ(r.data()[0], 7);
  fs::remove(trigger);
  EXPECT_TRUE((*dev)->Write(12288, b.data(), b.size()).ok());
  EXPECT_TRUE((*dev)->Flush().ok());
}

TEST_F(NbdDeviceTest, ServerEnospcIsNoSpace) {
  srv_.MakeImage(1 << 20);
  ASSERT_TRUE(srv_.Start({"--filter=error", "file", srv_.image(), "error-pwrite=ENOSPC",
                          "error-pwrite-rate=100%"}));
  auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  AlignedBuffer b(4096);
  Status st = (*dev)->Write(4096, b.data(), b.size());
  EXPECT_TRUE(st.Is(Code::kNoSpace)) << st.ToString();
}

TEST_F(NbdDeviceTest, ServerThatGoesAwayFailsTheDevice) {
  srv_.MakeImage(1 << 20);
  ASSERT_TRUE(srv_.Start({"file", srv_.image()}));
  auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  AlignedBuffer b(4096);
  ASSERT_TRUE((*dev)->Read(0, b.data(), b.size()).ok());
  srv_.Stop(SIGKILL);
  auto t0 = std::chrono::steady_clock::now();
  Status st = (*dev)->Write(0, b.data(), b.size());
  EXPECT_TRUE(st.Is(Code::kIOError)) << st.ToString();
  EXPECT_NE(st.message().find("connection"), std::string::npos) << st.message();
  // Fail-stop: every later call fails, including on the other pooled connections.
  for (int i = 0; i < 8; i++) {
    EXPECT_TRUE((*dev)->Read(0, b.data(), b.size()).Is(Code::kIOError));
  }
  EXPECT_TRUE((*dev)->Flush().Is(Code::kIOError));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  dev->reset();  // closing a device whose server is gone does not hang either
}

TEST_F(NbdDeviceTest, TimeoutOnAStuckServer) {
  srv_.MakeImage(1 << 20);
  std::string ctl = srv_.dir() + "/pause.sock";
  ASSERT_TRUE(srv_.Start({"--filter=pause", "file", srv_.image(), "pause-control=" + ctl}));
  NbdOptions no;
  no.timeout_ms = 300;
  auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{}, no);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  AlignedBuffer b(4096);
  ASSERT_TRUE((*dev)->Read(0, b.data(), b.size()).ok());

  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, ctl.c_str(), sizeof(sa.sun_path) - 1);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  char c = 'p';
  ASSERT_EQ(::write(fd, &c, 1), 1);
  ASSERT_EQ(::read(fd, &c, 1), 1);
  EXPECT_EQ(c, 'P');

  auto t0 = std::chrono::steady_clock::now();
  Status st = (*dev)->Read(0, b.data(), b.size());
  auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_TRUE(st.Is(Code::kIOError)) << st.ToString();
  EXPECT_NE(st.message().find("no reply within 300 ms"), std::string::npos) << st.message();
  EXPECT_GE(took, std::chrono::milliseconds(250));
  EXPECT_LT(took, std::chrono::seconds(5));
  EXPECT_TRUE((*dev)->Write(0, b.data(), b.size()).Is(Code::kIOError));

  c = 'r';
  ASSERT_EQ(::write(fd, &c, 1), 1);
  ASSERT_EQ(::read(fd, &c, 1), 1);
  ::close(fd);
}

// nbdkit's eval plugin with a pwrite but no flush: the server offers no durability.
std::vector<std::string> EvalServer(const std::string& extra_fua, const std::string& flags_log) {
  std::vector<std::string> a = {
      "eval", "get_size=echo 1048576", "pread=head -c $3 /dev/zero", "can_write=exit 0",
      "pwrite=cat >/dev/null; echo \"$5\" >> " + flags_log};
  if (!extra_fua.empty()) a.push_back("can_fua=echo " + extra_fua);
  return a;
}

TEST_F(NbdDeviceTest, NoFlushNoFuaRefusesWritableOpen) {
  std::string flags = srv_.dir() + "/flags";
  ASSERT_TRUE(srv_.Start(EvalServer("", flags)));
  auto rw = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_FALSE(rw.ok());
  EXPECT_TRUE(rw.status().Is(Code::kNotSupported)) << rw.status().ToString();
  EXPECT_NE(rw.status().message().find("neither flush nor FUA"), std::string::npos);
  OpenOptions o;
  o.read_only = true;
  auto ro = OpenNbdDevice(srv_.Uri(), o);
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  AlignedBuffer b(4096);
  EXPECT_TRUE((*ro)->Read(0, b.data(), b.size()).ok());
}

TEST_F(NbdDeviceTest, FuaOnlyServerGetsFuaWrites) {
  std::string flags = srv_.dir() + "/flags";
  ASSERT_TRUE(srv_.Start(EvalServer("native", flags)));
  auto dev = OpenNbdDevice(srv_.Uri(), OpenOptions{});
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  AlignedBuffer b(4096);
  ASSERT_TRUE((*dev)->Write(0, b.data(), b.size()).ok());
  ASSERT_TRUE((*dev)->Write(4096, b.data(), b.size()).ok());
  EXPECT_TRUE((*dev)->Flush().ok());
  EXPECT_EQ(srv_.ReadFile(flags), "fua\nfua\n");
}

TEST_F(NbdDeviceTest, OpenErrors) {
  auto missing = OpenNbdDevice("nbd+unix:///?socket=" + srv_.dir() + "/nope.sock", {});
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(missing.status().Is(Code::kNotFound)) << missing.status().ToString();
  EXPECT_NE(missing.status().message().find("nope.sock"), std::string::npos);
  auto bad = OpenNbdDevice("nbd+unix:///?sock", {});
  ASSERT_FALSE(bad.ok());
  auto notnbd = OpenNbdDevice("/tmp/x", {});
  EXPECT_TRUE(notnbd.status().Is(Code::kInvalid));
  NbdOptions zero;
  zero.connections = 0;
  EXPECT_TRUE(OpenNbdDevice("nbd://localhost/", {}, zero).status().Is(Code::kInvalid));
}

}  // namespace
}  // namespace agorafs
