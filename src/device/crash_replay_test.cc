// RecordingDevice and CrashLog: the log is what was executed, and every image the
// replayer builds is one the crash model allows.
#include "device/crash_replay.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "device/mem_device.h"
#include "device/recording_device.h"

namespace agorafs {
namespace {

void Put(BlockDevice* d, uint64_t off, size_t len, uint8_t fill) {
  AlignedBuffer b(len);
  std::memset(b.data(), fill, len);
  ASSERT_TRUE(d->Write(off, b.data(), len).ok());
}

TEST(RecordingDeviceTest, LogsWritesAndFlushesInOrderAndForwardsEverything) {
  MemDevice mem(1 << 20);
  RecordingDevice rec(&mem);
  Put(&rec, 0, 4096, 1);
  Put(&rec, 8192, 512, 2);
  EXPECT_EQ(rec.barriers(), 0u);
  ASSERT_TRUE(rec.Flush().ok());
  EXPECT_EQ(rec.barriers(), 1u);
  Put(&rec, 0, 1024, 3);
  // A refused write is forwarded, fails, and is not logged.
  AlignedBuffer b(4096);
  EXPECT_FALSE(rec.Write(100, b.data(), 512).ok());
  EXPECT_EQ(mem.unflushed_bytes(), 1024u);
  AlignedBuffer r(4096);
  ASSERT_TRUE(rec.Read(0, r.data(), 4096).ok());
  EXPECT_EQ(r.data()[0], 3);
  EXPECT_EQ(r.data()[1024], 1);
  auto log = rec.TakeLog();
  ASSERT_EQ(log.size(), 4u);
  EXPECT_EQ(log[0].kind, IoRecord::Kind::kWrite);
  EXPECT_EQ(log[0].offset, 0u);
  EXPECT_EQ(log[0].data, std::vector<uint8_t>(4096, 1));
  EXPECT_EQ(log[1].offset, 8192u);
  EXPECT_EQ(log[1].data.size(), 512u);
  EXPECT_EQ(log[2].kind, IoRecord::Kind::kFlush);
  EXPECT_EQ(log[3].data, std::vector<uint8_t>(1024, 3));
  // Recording ends with TakeLog; I/O still goes through.
  Put(&rec, 0, 512, 4);
  ASSERT_TRUE(rec.Flush().ok());
  EXPECT_TRUE(rec.TakeLog().empty());
  EXPECT_EQ(rec.barriers(), 1u);
}

// Log: epoch 0 writes sectors 0..7 (A) and 8..15 (B); barrier 1; epoch 1 writes
// sectors 0..7 again (C) and 16..23 (D); barrier 2; epoch 2 writes 24 (E).
std::unique_ptr<CrashLog> SmallLog() {
  std::vector<IoRecord> log;
  auto w = [&](uint64_t sector, size_t n, uint8_t fill) {
    IoRecord r;
    r.offset = sector * kSectorSize;
    r.data.assign(n * kSectorSize, fill);
    log.push_back(r);
  };
  auto f = [&] {
    IoRecord r;
    r.kind = IoRecord::Kind::kFlush;
    log.push_back(r);
  };
  w(0, 8, 'A');
  w(8, 8, 'B');
  f();
  w(0, 8, 'C');
  w(16, 8, 'D');
  f();
  w(24, 1, 'E');
  auto c = CrashLog::Make(std::vector<uint8_t>(32 * kSectorSize, '.'), std::move(log));
  EXPECT_TRUE(c.ok());
  return c.ok() ? std::move(c).value() : nullptr;
}

// Sector s of `img` as one character.
char SectorAt(const std::vector<uint8_t>& img, uint64_t s) {
  const uint8_t* p = img.data() + s * kSectorSize;
  for (size_t i = 1; i < kSectorSize; i++) EXPECT_EQ(p[i], p[0]) << "sector torn inside";
  return char(p[0]);
}

TEST(CrashLogTest, PrefixImagesHoldExactlyTheWritesBeforeEachBarrier) {
  auto c = SmallLog();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->barriers(), 2u);
  EXPECT_EQ(c->writes(), 5u);
  EXPECT_EQ(c->EpochWrites(0), 2u);
  EXPECT_EQ(c->EpochWrites(1), 2u);
  EXPECT_EQ(c->EpochWrites(2), 1u);
  std::vector<CrashImageSpec> specs(3);
  for (uint32_t k = 0; k < 3; k++) specs[k].cut = k;
  std::vector<std::string> got;
  c->ForEachImage(specs, [&](const CrashImageSpec& s, std::vector<uint8_t> img,
                             const std::string&) {
    EXPECT_EQ(s.sample, 0u);
    std::string row;
    for (uint64_t sec : {0, 8, 16, 24}) row += SectorAt(img, sec);
    got.push_back(row);
    return true;
  });
  EXPECT_EQ(got, (std::vector<std::string>{"....", "AB..", "CBD."}));
  EXPECT_EQ(c->Build(specs[2]), c->Build(specs[2]));
  // Few images: half are prefixes, half samples.
  auto few = c->Plan(1, 4);
  ASSERT_EQ(few.size(), 4u);
  EXPECT_EQ(std::count_if(few.begin(), few.end(), [](auto& s) { return s.sample == 0; }), 2);
}

TEST(CrashLogTest, SamplesOnlyMixTheOpenEpochOverItsPrefix) {
  auto c = SmallLog();
  ASSERT_TRUE(c);
  auto specs = c->Plan(7, 3 + 600);
  ASSERT_EQ(specs.size(), 603u);
  std::set<std::string> seen1;
  std::set<std::string> grains;
  size_t n = 0;
  c->ForEachImage(specs, [&](const CrashImageSpec& s, std::vector<uint8_t> img,
                             const std::string& what) {
    n++;
    std::string row;
    for (uint64_t sec = 0; sec < 32; sec++) row += SectorAt(img, sec);
    for (uint64_t sec = 0; sec < 32; sec++) {
      const char ch = row[sec];
      // What the model allows per sector at each cut.
      std::string allowed;
      if (s.cut == 0) allowed = sec < 8 ? ".A" : sec < 16 ? ".B" : ".";
      if (s.cut == 1) allowed = sec < 8 ? "AC" : sec < 16 ? "B" : sec < 24 ? ".D" : ".";
      if (s.cut == 2) allowed = sec < 8 ? "C" : sec < 16 ? "B" : sec < 24 ? "D" : sec == 24 ? ".E" : ".";
      EXPECT_NE(allowed.find(ch), std::string::npos)
          << "cut " << s.cut << " sector " << sec << " holds " << ch << ": " << what;
    }
    if (s.cut == 1) seen1.insert(row.substr(0, 8));
    if (s.sample != 0) grains.insert(what.substr(what.find("grain"), 12));
    // Reproducible from the spec alone.
    if (n % 50 == 0) {
      EXPECT_EQ(c->Build(s), img);
    }
    return true;
  });
  EXPECT_EQ(n, 603u);
  EXPECT_EQ(grains.size(), 3u);  // whole writes, 4 KiB blocks and sectors all came up
  // Torn at sector grain, some sectors of C landed and others did not.
  bool mixed = false;
  for (const auto& r : seen1) mixed |= r.find('A') != std::string::npos && r.find('C') != std::string::npos;
  EXPECT_TRUE(mixed);
  EXPECT_TRUE(seen1.count("AAAAAAAA"));
  EXPECT_TRUE(seen1.count("CCCCCCCC"));
}

TEST(CrashLogTest, RejectsWritesOutsideTheBase) {
  std::vector<IoRecord> log(1);
  log[0].offset = 4096;
  log[0].data.assign(512, 1);
  EXPECT_FALSE(CrashLog::Make(std::vector<uint8_t>(4096), std::move(log)).ok());
}

}  // namespace
}  // namespace agorafs
