#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "device/block_device.h"
#include "device/device_test_util.h"
#include "device/fault_device.h"
#include "device/mem_device.h"

namespace agorafs {
namespace {

class TempPath {
 public:
  TempPath() {
    char tmpl[] = "/tmp/agorafs_device_test_XXXXXX";
    int fd = ::mkstemp(tmpl);
    EXPECT_GE(fd, 0);
    ::close(fd);
    ::unlink(tmpl);  // OpenFileDevice creates it
    path_ = tmpl;
  }
  ~TempPath() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// ---------------------------------------------------------------- FileDevice

// Options that create the file at `size` bytes if it is missing or smaller.
OpenOptions Creating(uint64_t size) {
  OpenOptions o;
  o.create = true;
  o.create_size = size;
  return o;
}

TEST(FileDeviceTest, RoundTripWithDirectIo) {
  TempPath tmp;
  OpenOptions o = Creating(1 << 20);
  auto dev = OpenFileDevice(tmp.path(), o);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  EXPECT_EQ((*dev)->Size(), 1u << 20);
  EXPECT_EQ((*dev)->Name(), tmp.path());

  AlignedBuffer w = Filled(3 * 4096, 0x5A);
  w.data()[7] = 1;
  ASSERT_TRUE((*dev)->Write(8192, w.data(), w.size()).ok());
  ASSERT_TRUE((*dev)->Flush().ok());
  AlignedBuffer r(3 * 4096);
  ASSERT_TRUE((*dev)->Read(8192, r.data(), r.size()).ok());
  EXPECT_EQ(std::memcmp(w.data(), r.data(), r.size()), 0);
  // Sector-granular I/O at the very end of the device.
  ASSERT_TRUE((*dev)->Read((1 << 20) - 512, r.data(), 512).ok());
  EXPECT_TRUE(AllBytes(r.data(), 512, 0));
  dev->reset();

  // Reopen read-only: data persisted, size from fstat, writes refused.
  o.create = false;
  o.read_only = true;
  auto ro = OpenFileDevice(tmp.path(), o);
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  EXPECT_EQ((*ro)->Size(), 1u << 20);
  AlignedBuffer r2(3 * 4096);
  ASSERT_TRUE((*ro)->Read(8192, r2.data(), r2.size()).ok());
  EXPECT_EQ(std::memcmp(w.data(), r2.data(), r2.size()), 0);
  EXPECT_TRUE((*ro)->Write(0, w.data(), 4096).Is(Code::kReadOnly));
}

TEST(FileDeviceTest, UnalignedAndOutOfRangeIoIsInvalid) {
  TempPath tmp;
  OpenOptions o = Creating(64 * 1024);
  auto dev = OpenFileDevice(tmp.path(), o);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  AlignedBuffer b(8192);
  EXPECT_TRUE((*dev)->Read(100, b.data(), 512).Is(Code::kInvalid));       // offset
  EXPECT_TRUE((*dev)->Read(0, b.data(), 100).Is(Code::kInvalid));         // length
  EXPECT_TRUE((*dev)->Read(0, b.data() + 512, 512).Is(Code::kInvalid));   // buffer
  EXPECT_TRUE((*dev)->Write(513, b.data(), 512).Is(Code::kInvalid));
  EXPECT_TRUE((*dev)->Read(64 * 1024, b.data(), 512).Is(Code::kInvalid));  // past end
  Status s = (*dev)->Read(60 * 1024, b.data(), 8192);                      // straddles end
  EXPECT_TRUE(s.Is(Code::kInvalid));
  EXPECT_NE(s.message().find("61440"), std::string::npos) << s.ToString();
}

TEST(FileDeviceTest, WriteBatchWritesEveryRange) {
  TempPath tmp;
  OpenOptions o = Creating(4 << 20);
  auto dev = OpenFileDevice(tmp.path(), o);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  CheckWriteBatch(dev->get());
  dev->reset();
  o.create = false;
  o.read_only = true;
  auto ro = OpenFileDevice(tmp.path(), o);
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  AlignedBuffer b = Filled(4096, 1);
  WriteOp two[] = {{0, b.data(), 4096}, {8192, b.data(), 4096}};
  EXPECT_TRUE((*ro)->WriteBatch(two, 2).Is(Code::kReadOnly));
}

TEST(MemDeviceTest, WriteBatchWritesEveryRange) {
  MemDevice mem(4 << 20);
  CheckWriteBatch(&mem);
}

TEST(FileDeviceTest, MissingPathIsNotFound) {
  auto dev = OpenFileDevice("/tmp/agorafs_no_such_dir_xyz/dev", OpenOptions{});
  ASSERT_FALSE(dev.ok());
  EXPECT_TRUE(dev.status().Is(Code::kNotFound)) << dev.status().ToString();
  EXPECT_NE(dev.status().message().find("/tmp/agorafs_no_such_dir_xyz/dev"), std::string::npos);
  EXPECT_TRUE(OpenFileDevice("-", OpenOptions{}).status().Is(Code::kInvalid));
}

TEST(FileDeviceTest, ExistingFileIsNotShrunkByCreate) {
  TempPath tmp;
  OpenOptions o = Creating(128 * 1024);
  ASSERT_TRUE(OpenFileDevice(tmp.path(), o).ok());
  o.create_size = 64 * 1024;
  auto dev = OpenFileDevice(tmp.path(), o);
  ASSERT_TRUE(dev.ok());
  EXPECT_EQ((*dev)->Size(), 128u * 1024);
}

// ---------------------------------------------------------------- MemDevice

TEST(MemDeviceTest, CrashDropsUnflushedKeepsFlushed) {
  MemDevice dev(64 * 4096);
  AlignedBuffer a = Filled(4096, 0xAA), b = Filled(4096, 0xBB), c = Filled(4096, 0xCC);
  AlignedBuffer r(4096);

  ASSERT_TRUE(dev.Write(0, a.data(), 4096).ok());       // block 0 = A, flushed
  ASSERT_TRUE(dev.Write(4096, a.data(), 4096).ok());    // block 1 = A, flushed
  ASSERT_TRUE(dev.Flush().ok());
  ASSERT_TRUE(dev.Write(4096, b.data(), 4096).ok());    // overwrite of a flushed block
  ASSERT_TRUE(dev.Write(2 * 4096, c.data(), 4096).ok());  // never flushed
  ASSERT_TRUE(dev.Read(4096, r.data(), 4096).ok());
  EXPECT_TRUE(AllBytes(r.data(), 4096, 0xBB));  // visible before the crash
  EXPECT_EQ(dev.unflushed_bytes(), 2u * 4096);
  EXPECT_EQ(dev.writes(), 4u);
  EXPECT_EQ(dev.flushes(), 1u);

  dev.Crash();
  ASSERT_TRUE(dev.Read(0, r.data(), 4096).ok());
  EXPECT_TRUE(AllBytes(r.data(), 4096, 0xAA));
  ASSERT_TRUE(dev.Read(4096, r.data(), 4096).ok());
  EXPECT_TRUE(AllBytes(r.data(), 4096, 0xAA));  // reverted to the flushed content
  ASSERT_TRUE(dev.Read(2 * 4096, r.data(), 4096).ok());
  EXPECT_TRUE(AllBytes(r.data(), 4096, 0));
  EXPECT_EQ(dev.unflushed_bytes(), 0u);

  // The durable image round-trips into a new device.
  ASSERT_TRUE(dev.Write(3 * 4096, c.data(), 4096).ok());  // unflushed: not in the image
  MemDevice copy(dev.DurableImage());
  EXPECT_EQ(copy.Size(), 64u * 4096);
  ASSERT_TRUE(copy.Read(4096, r.data(), 4096).ok());
  EXPECT_TRUE(AllBytes(r.data(), 4096, 0xAA));
  ASSERT_TRUE(copy.Read(3 * 4096, r.data(), 4096).ok());
  EXPECT_TRUE(AllBytes(r.data(), 4096, 0));
}

TEST(MemDeviceTest, CrashTornKeepsEachSectorWholeOldOrNew) {
  MemDevice dev(16 * 4096);
  AlignedBuffer b = Filled(8 * 4096, 0xBB);
  ASSERT_TRUE(dev.Write(0, b.data(), b.size()).ok());
  dev.CrashTorn(42);
  AlignedBuffer r(8 * 4096);
  ASSERT_TRUE(dev.Read(0, r.data(), r.size()).ok());
  size_t kept = 0;
  for (size_t s = 0; s < r.size() / kSectorSize; s++) {
    const uint8_t* p = r.data() + s * kSectorSize;
    bool old = AllBytes(p, kSectorSize, 0), neu = AllBytes(p, kSectorSize, 0xBB);
    EXPECT_TRUE(old || neu) << s;
    kept += neu;
  }
  EXPECT_GT(kept, 0u);
  EXPECT_LT(kept, r.size() / kSectorSize);
  EXPECT_EQ(dev.DurableImage()[0], r.data()[0]);  // what survived is now durable
}

TEST(MemDeviceTest, EnforcesIoRules) {
  MemDevice dev(8 * 4096);
  AlignedBuffer b(8192);
  EXPECT_TRUE(dev.Read(1, b.data(), 512).Is(Code::kInvalid));
  EXPECT_TRUE(dev.Write(0, b.data() + 1, 512).Is(Code::kInvalid));
  EXPECT_TRUE(dev.Read(7 * 4096, b.data(), 8192).Is(Code::kInvalid));
}

// ---------------------------------------------------------------- FaultDevice

TEST(FaultDeviceTest, FailNthFiresExactlyOnce) {
  MemDevice mem(16 * 4096);
  FaultDevice dev(&mem);
  AlignedBuffer b(4096);
  dev.FailNth(IoKind::kWrite, 3);
  dev.FailNth(IoKind::kFlush, 1);
  dev.FailNth(IoKind::kRead, 2);
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());
  Status s = dev.Write(4096, b.data(), 4096);
  EXPECT_TRUE(s.Is(Code::kIOError));
  EXPECT_NE(s.message().find("injected"), std::string::npos);
  EXPECT_NE(s.message().find("4096"), std::string::npos);
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());  // only once
  EXPECT_TRUE(dev.Flush().Is(Code::kIOError));
  EXPECT_TRUE(dev.Flush().ok());
  EXPECT_TRUE(dev.Read(0, b.data(), 4096).ok());
  EXPECT_TRUE(dev.Read(0, b.data(), 4096).Is(Code::kIOError));
  EXPECT_TRUE(dev.Read(0, b.data(), 4096).ok());

  EXPECT_EQ(dev.writes(), 4u);
  EXPECT_EQ(dev.flushes(), 2u);
  EXPECT_EQ(dev.reads(), 3u);
  EXPECT_EQ(dev.injected(), 3u);
  EXPECT_EQ(mem.writes(), 3u);  // the failed write never reached the device
  EXPECT_EQ(mem.flushes(), 1u);
}

TEST(FaultDeviceTest, RangeRuleFailsOverlappingIoOnly) {
  MemDevice mem(16 * 4096);
  FaultDevice dev(&mem);
  AlignedBuffer b(2 * 4096);
  dev.FailRange(5 * 4096 + 512, 512, /*reads=*/false, /*writes=*/true);
  EXPECT_TRUE(dev.Write(4 * 4096, b.data(), 4096).ok());               // just before
  EXPECT_TRUE(dev.Write(5 * 4096, b.data(), 512).ok());                // adjacent sector
  EXPECT_TRUE(dev.Write(4 * 4096, b.data(), 2 * 4096).Is(Code::kIOError));  // spans it
  EXPECT_TRUE(dev.Write(5 * 4096 + 512, b.data(), 512).Is(Code::kIOError));
  EXPECT_TRUE(dev.Write(5 * 4096 + 1024, b.data(), 512).ok());         // just after
  EXPECT_TRUE(dev.Read(5 * 4096, b.data(), 4096).ok());                // reads unaffected
  dev.FailRange(0, 4096, true, false);
  EXPECT_TRUE(dev.Read(0, b.data(), 512).Is(Code::kIOError));
  EXPECT_TRUE(dev.Write(0, b.data(), 512).ok());
  dev.ClearRanges();
  EXPECT_TRUE(dev.Read(0, b.data(), 512).ok());
  EXPECT_TRUE(dev.Write(5 * 4096, b.data(), 4096).ok());
  EXPECT_EQ(dev.injected(), 3u);
}

TEST(FaultDeviceTest, GoneAfterFailsEverythingFromTheTrigger) {
  auto mem = std::make_shared<MemDevice>(16 * 4096);
  FaultDevice dev(mem);
  AlignedBuffer b(4096);
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());  // before the rule: not counted for it
  dev.GoneAfter(IoKind::kWrite, 2);
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());
  EXPECT_TRUE(dev.Read(0, b.data(), 4096).ok());  // other kinds do not trigger
  EXPECT_TRUE(dev.Flush().ok());
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());
  EXPECT_FALSE(dev.gone());
  Status s = dev.Write(0, b.data(), 4096);
  EXPECT_TRUE(s.Is(Code::kIOError));
  EXPECT_NE(s.message().find("gone"), std::string::npos);
  EXPECT_TRUE(dev.gone());
  EXPECT_TRUE(dev.Read(0, b.data(), 4096).Is(Code::kIOError));
  EXPECT_TRUE(dev.Flush().Is(Code::kIOError));
  EXPECT_EQ(mem->writes(), 3u);
  dev.Reset();
  EXPECT_TRUE(dev.Flush().ok());
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());

  dev.GoneAfter(IoKind::kFlush, 0);  // the next flush
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());
  EXPECT_TRUE(dev.Flush().Is(Code::kIOError));
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).Is(Code::kIOError));
  dev.SetGone(false);
  EXPECT_TRUE(dev.Write(0, b.data(), 4096).ok());
  dev.SetGone(true);
  EXPECT_TRUE(dev.Read(0, b.data(), 4096).Is(Code::kIOError));
}

}  // namespace
}  // namespace agorafs
