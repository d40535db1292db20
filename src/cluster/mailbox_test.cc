// Mailbox tests: one writer's ring on a MemDevice, read back by another slot's reader,
// with flow control (SetFloor/Room) as the lock service drives it.
#include "cluster/mailbox.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "device/mem_device.h"
#include "fs/super.h"

namespace agorafs {
namespace {

class MailboxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dev_ = std::make_shared<MemDevice>(uint64_t(96) << 20);
    auto sb = Mkfs(dev_.get(), MkfsOptions{});
    ASSERT_TRUE(sb.ok()) << sb.status().ToString();
    g_ = GeometryOf(*sb);
    Uuid uuid;
    std::memcpy(uuid.data(), sb->hdr.uuid, uuid.size());
    writer_ = std::make_unique<Mailbox>(dev_.get(), dev_.get(), g_, uuid, 0, 7);
    reader_ = std::make_unique<Mailbox>(dev_.get(), dev_.get(), g_, uuid, 1, 3);
  }
  // Appends `n` messages numbered from `*lock` on (their lock field), as Flush does:
  // no more than Room() at a time. Returns how many went out.
  uint64_t AppendUpTo(uint64_t n, uint64_t* lock) {
    uint64_t room = writer_->Room();
    std::vector<Msg> msgs(std::min(n, room));
    for (Msg& m : msgs) m.lock = (*lock)++;
    if (msgs.empty()) return 0;
    auto r = writer_->Append(msgs);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return msgs.size();
  }

  std::shared_ptr<MemDevice> dev_;
  Geometry g_;
  std::unique_ptr<Mailbox> writer_, reader_;
};

// A reader that has read nothing is never overrun, however many small appends the
// writer makes: once the ring is full, Room() stays 0 (also when the writer's next seq
// sits on a block boundary, where Room() used to admit one more block per call), and
// what the reader then reads is every message in order. Moving the floor frees room.
TEST_F(MailboxTest, WriterStopsAtTheFloorAndTheReaderGetsEverything) {
  const uint64_t start = writer_->next_seq();
  writer_->SetFloor(start);
  uint64_t lock = 1000;
  uint64_t sent = 0;
  for (int call = 0; call < 2000; call++) sent += AppendUpTo(7 + call % 300, &lock);
  EXPECT_LE(sent, Mailbox::kCapacity);
  EXPECT_GE(sent, Mailbox::kCapacity - 2 * kMsgsPerRingBlock);
  EXPECT_EQ(writer_->Room(), 0u) << "the ring is full, the reader has read nothing";
  std::vector<Msg> more(1);
  auto refused = writer_->Append(more);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(refused.status().Is(Code::kBusy)) << refused.status().ToString();

  uint64_t next = start;
  uint64_t expect_lock = 1000;
  while (next < writer_->next_seq()) {
    auto got = reader_->Read(0, 7, &next);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ASSERT_FALSE(got->empty()) << "stuck at seq " << next;
    for (const Msg& m : *got) ASSERT_EQ(m.lock, expect_lock++);
  }
  EXPECT_EQ(expect_lock, lock);

  // Everything read: the floor moves up, and the writer goes on where it stopped.
  writer_->SetFloor(next);
  EXPECT_GE(writer_->Room(), Mailbox::kCapacity - 2 * kMsgsPerRingBlock);
  ASSERT_EQ(AppendUpTo(300, &lock), 300u);
  auto got = reader_->Read(0, 7, &next);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_EQ(got->size(), 300u);
  EXPECT_EQ(got->front().lock, expect_lock);
}

}  // namespace
}  // namespace agorafs
