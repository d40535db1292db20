#include "cluster/net_channel.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sodium.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace agorafs {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
constexpr size_t kWire = NetChannel::kWireSize;

std::array<uint8_t, 32> Secret(uint8_t v) {
  std::array<uint8_t, 32> s{};
  for (size_t i = 0; i < s.size(); i++) s[i] = uint8_t(v + i * 7);
  return s;
}
Uuid MakeUuid(uint8_t v) {
  Uuid u{};
  for (size_t i = 0; i < u.size(); i++) u[i] = uint8_t(v ^ (i * 13));
  return u;
}

bool WaitFor(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 3s) {
  auto end = Clock::now() + timeout;
  while (Clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return pred();
}

// What the receiving side observed, plus a switchable liveness oracle.
struct Observer {
  std::mutex mu;
  std::vector<uint32_t> wakes;
  std::set<std::pair<uint32_t, uint64_t>> dead;  // (slot, generation) pairs declared dead
  std::set<uint32_t> known_slots{1, 2, 3, 4, 5};
  std::atomic<uint64_t> alive_calls{0};

  bool IsAlive(uint32_t slot, uint64_t gen) {
    alive_calls++;
    std::lock_guard<std::mutex> g(mu);
    return known_slots.count(slot) && !dead.count({slot, gen});
  }
  void OnWake(uint32_t slot) {
    std::lock_guard<std::mutex> g(mu);
    wakes.push_back(slot);
  }
  size_t WakeCount() {
    std::lock_guard<std::mutex> g(mu);
    return wakes.size();
  }
  std::vector<uint32_t> Wakes() {
    std::lock_guard<std::mutex> g(mu);
    return wakes;
  }
};

struct ChanSpec {
  std::string bind = "127.0.0.1:0";
  uint8_t secret = 1;
  uint8_t uuid = 9;
  uint32_t slot = 1;
  uint64_t generation = 10;
};

Result<std::unique_ptr<NetChannel>> StartChannel(const ChanSpec& s, Observer* obs) {
  NetChannel::Options o;
  o.bind = s.bind;
  o.secret = Secret(s.secret);
  o.uuid = MakeUuid(s.uuid);
  o.slot = s.slot;
  o.generation = s.generation;
  o.is_alive = [obs](uint32_t slot, uint64_t gen) { return obs->IsAlive(slot, gen); };
  o.on_wake = [obs](uint32_t slot) { obs->OnWake(slot); };
  return NetChannel::Start(std::move(o));
}

uint64_t Drops(const NetChannel::Stats& s) {
  return s.bad_size + s.bad_header + s.bad_mac + s.not_alive + s.replayed;
}

// A plain UDP socket for crafted datagrams.
class RawSender {
 public:
  explicit RawSender(const std::string& to) {
    fd_ = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    EXPECT_GE(fd_, 0);
    size_t colon = to.rfind(':');
    dst_.sin_family = AF_INET;
    dst_.sin_port = htons(uint16_t(std::stoi(to.substr(colon + 1))));
    EXPECT_EQ(inet_pton(AF_INET, to.substr(0, colon).c_str(), &dst_.sin_addr), 1);
  }
  ~RawSender() { close(fd_); }
  void Send(const uint8_t* p, size_t n) {
    ssize_t r = sendto(fd_, p, n, 0, reinterpret_cast<const sockaddr*>(&dst_), sizeof(dst_));
    EXPECT_EQ(r, ssize_t(n)) << strerror(errno);
  }
  template <size_t N>
  void Send(const std::array<uint8_t, N>& a) { Send(a.data(), a.size()); }
  void Send(const std::vector<uint8_t>& v) { Send(v.data(), v.size()); }

 private:
  int fd_ = -1;
  sockaddr_in dst_{};
};

class NetChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto rx = StartChannel({.slot = 2, .generation = 20}, &rx_obs_);
    ASSERT_TRUE(rx.ok()) << rx.status().ToString();
    rx_ = std::move(rx).value();
    auto tx = StartChannel({.slot = 1, .generation = 10}, &tx_obs_);
    ASSERT_TRUE(tx.ok()) << tx.status().ToString();
    tx_ = std::move(tx).value();
    auto bar = StartChannel({.slot = 3, .generation = 30}, &tx_obs_);
    ASSERT_TRUE(bar.ok()) << bar.status().ToString();
    bar_ = std::move(bar).value();
    sender_ = std::make_unique<RawSender>(rx_->address());
  }

  // Sends a fresh valid datagram from a separate (slot 3, generation 30) and waits until
  // it is accepted, so every datagram sent before it (same socket, loopback keeps
  // order) has been judged. Its wakes carry slot 3.
  void Barrier() {
    uint64_t before = rx_->stats().accepted;
    size_t wakes = rx_obs_.WakeCount();
    sender_->Send(bar_->Encode(++barrier_seq_, 0, 0));
    ASSERT_TRUE(WaitFor([&] { return rx_->stats().accepted == before + 1; }));
    ASSERT_TRUE(WaitFor([&] { return rx_obs_.WakeCount() == wakes + 1; }));
  }

  Observer rx_obs_, tx_obs_;
  std::unique_ptr<NetChannel> rx_, tx_, bar_;
  std::unique_ptr<RawSender> sender_;
  uint64_t barrier_seq_ = 0;
};

TEST_F(NetChannelTest, AddressIsBoundLoopbackWithRealPort) {
  std::string a = rx_->address();
  EXPECT_EQ(a.rfind("127.0.0.1:", 0), 0u) << a;
  EXPECT_NE(a, "127.0.0.1:0");
  EXPECT_NE(rx_->address(), tx_->address());
}

TEST_F(NetChannelTest, ValidWakeReachesOnWakeWithSenderSlot) {
  tx_->SendWake(rx_->address(), 42, 7);
  ASSERT_TRUE(WaitFor([&] { return rx_obs_.WakeCount() == 1; }));
  EXPECT_EQ(rx_obs_.Wakes(), std::vector<uint32_t>{1});
  EXPECT_EQ(tx_->stats().sent, 1u);
  EXPECT_EQ(tx_->stats().send_errors, 0u);
  EXPECT_EQ(rx_->stats().accepted, 1u);
  EXPECT_EQ(Drops(rx_->stats()), 0u);

  // Several wakes in a row: sequence numbers strictly increase, none is a "replay".
  for (int i = 0; i < 20; i++) tx_->SendWake(rx_->address(), 43 + i, 7);
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().accepted == 21; }));
  EXPECT_EQ(rx_->stats().replayed, 0u);
  EXPECT_EQ(rx_obs_.WakeCount(), 21u);

  // And the other direction.
  rx_->SendWake(tx_->address(), 1, 7);
  ASSERT_TRUE(WaitFor([&] { return tx_obs_.WakeCount() == 1; }));
  EXPECT_EQ(tx_obs_.Wakes(), std::vector<uint32_t>{2});
}

TEST_F(NetChannelTest, WireFormatMatchesContract) {
  // Capture what SendWake puts on the wire with a plain socket.
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t alen = sizeof(a);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &alen), 0);
  timeval tv{2, 0};
  ASSERT_EQ(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
  std::string to = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));

  tx_->SendWake(to, 0x1122334455667788ull, 0x99);
  tx_->SendWake(to, 0x1122334455667789ull, 0x99);
  uint8_t b1[2048], b2[2048];
  ASSERT_EQ(recv(fd, b1, sizeof(b1), 0), ssize_t(kWire));
  ASSERT_EQ(recv(fd, b2, sizeof(b2), 0), ssize_t(kWire));
  close(fd);

  auto u64 = [](const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; };
  auto u32 = [](const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; };
  auto u16 = [](const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; };
  EXPECT_EQ(std::memcmp(b1, "AGNW", 4), 0);
  EXPECT_EQ(u16(b1 + 4), 1u);                      // version
  EXPECT_EQ(u16(b1 + 6), NetChannel::kKindWake);   // kind
  Uuid uuid = MakeUuid(9);
  EXPECT_EQ(std::memcmp(b1 + 8, uuid.data(), 16), 0);
  EXPECT_EQ(u32(b1 + 24), 1u);                     // slot
  EXPECT_EQ(u32(b1 + 28), 0u);                     // pad
  EXPECT_EQ(u64(b1 + 32), 10u);                    // generation
  uint64_t seq1 = u64(b1 + 40), seq2 = u64(b2 + 40);
  EXPECT_GT(seq1, 0u);
  EXPECT_GT(seq2, seq1);                           // strictly increasing
  EXPECT_EQ(u64(b1 + 48), 0x1122334455667788ull);  // ring seq
  EXPECT_EQ(u64(b2 + 48), 0x1122334455667789ull);
  EXPECT_EQ(u64(b1 + 56), 0x99u);                  // epoch

  // The MAC, recomputed independently from the documented derivation.
  ASSERT_GE(sodium_init(), 0);
  auto secret = Secret(1);
  uint8_t key[crypto_auth_KEYBYTES];
  const char ctx[] = "agorafs net v1";
  crypto_generichash(key, sizeof(key), reinterpret_cast<const uint8_t*>(ctx), sizeof(ctx) - 1,
                     secret.data(), secret.size());
  EXPECT_EQ(crypto_auth_verify(b1 + kWire - 32, b1, kWire - 32, key), 0);
  EXPECT_EQ(crypto_auth_verify(b2 + kWire - 32, b2, kWire - 32, key), 0);

  // Encode builds exactly what SendWake sends.
  auto enc = tx_->Encode(seq1, 0x1122334455667788ull, 0x99);
  EXPECT_EQ(std::memcmp(enc.data(), b1, kWire), 0);
}

TEST_F(NetChannelTest, ForgedMacIsDropped) {
  auto d = tx_->Encode(5, 1, 1);
  auto mac_flip = d;
  mac_flip[kWire - 1] ^= 0x01;
  auto body_flip = d;
  body_flip[48] ^= 0x80;  // ring seq changed, MAC left as it was
  auto slot_flip = d;
  slot_flip[24] = 3;      // claim to be another (alive) slot
  sender_->Send(mac_flip);
  sender_->Send(body_flip);
  sender_->Send(slot_flip);
  Barrier();
  EXPECT_EQ(rx_->stats().bad_mac, 3u);
  EXPECT_EQ(rx_obs_.Wakes(), std::vector<uint32_t>{3});  // only the barrier's
  // The untouched original is still fresh: the forgeries did not consume its sequence.
  sender_->Send(d);
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().accepted == 2; }));
  EXPECT_EQ(rx_->stats().replayed, 0u);
  EXPECT_EQ(rx_obs_.Wakes(), (std::vector<uint32_t>{3, 1}));
}

TEST_F(NetChannelTest, WrongKeyIsDropped) {
  Observer o;
  auto other = StartChannel({.secret = 2, .slot = 1, .generation = 10}, &o);
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  (*other)->SendWake(rx_->address(), 1, 1);
  sender_->Send((*other)->Encode(7, 1, 1));
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().bad_mac == 2; }));
  Barrier();
  EXPECT_EQ(rx_->stats().bad_mac, 2u);
  EXPECT_EQ(rx_obs_.Wakes(), std::vector<uint32_t>{3});
}

TEST_F(NetChannelTest, WrongUuidAndBadHeaderAreDropped) {
  Observer o;
  auto other = StartChannel({.uuid = 77, .slot = 1, .generation = 10}, &o);
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  (*other)->SendWake(rx_->address(), 1, 1);

  auto d = tx_->Encode(5, 1, 1);
  auto magic = d;
  magic[0] ^= 0xff;
  auto version = d;
  version[4] = 2;
  auto kind = d;
  kind[6] = 9;
  auto uuid = d;
  uuid[8 + 15] ^= 0x01;
  sender_->Send(magic);
  sender_->Send(version);
  sender_->Send(kind);
  sender_->Send(uuid);
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().bad_header == 5; }));
  Barrier();
  EXPECT_EQ(rx_->stats().bad_header, 5u);
  EXPECT_EQ(rx_->stats().bad_mac, 0u);
  EXPECT_EQ(rx_obs_.Wakes(), std::vector<uint32_t>{3});
}

TEST_F(NetChannelTest, TruncatedAndOversizedAreDropped) {
  auto d = tx_->Encode(5, 1, 1);
  sender_->Send(d.data(), kWire - 1);  // truncated valid datagram
  sender_->Send(d.data(), 0);          // empty
  std::vector<uint8_t> big(kWire + 1);
  std::memcpy(big.data(), d.data(), kWire);  // valid datagram plus one byte
  sender_->Send(big);
  std::vector<uint8_t> mtu(1500, 0xab);
  std::memcpy(mtu.data(), d.data(), kWire);
  sender_->Send(mtu);
  std::vector<uint8_t> huge(9000, 0xcd);  // larger than the receive buffer
  std::memcpy(huge.data(), d.data(), kWire);
  sender_->Send(huge);
  Barrier();
  EXPECT_EQ(rx_->stats().bad_size, 5u);
  EXPECT_EQ(rx_->stats().bad_header + rx_->stats().bad_mac, 0u);
  EXPECT_EQ(rx_obs_.Wakes(), std::vector<uint32_t>{3});
  // The prefix's sequence was never consumed.
  sender_->Send(d);
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().accepted == 2; }));
}

TEST_F(NetChannelTest, ReplayIsDropped) {
  auto d = tx_->Encode(100, 1, 1);
  sender_->Send(d);
  sender_->Send(d);  // exact replay
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().replayed == 1; }));
  EXPECT_EQ(rx_->stats().accepted, 1u);
  sender_->Send(tx_->Encode(99, 1, 1));  // older sequence, validly signed
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().replayed == 2; }));
  sender_->Send(tx_->Encode(101, 1, 1));  // newer: accepted
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().accepted == 2; }));
  EXPECT_EQ(rx_obs_.WakeCount(), 2u);

  // A new generation of the same slot has its own sequence space.
  Observer o;
  auto reborn = StartChannel({.slot = 1, .generation = 11}, &o);
  ASSERT_TRUE(reborn.ok());
  sender_->Send((*reborn)->Encode(1, 1, 1));
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().accepted == 3; }));
  EXPECT_EQ(rx_->stats().replayed, 2u);
}

TEST_F(NetChannelTest, StaleGenerationAndUnknownSlotAreDropped) {
  {
    std::lock_guard<std::mutex> g(rx_obs_.mu);
    rx_obs_.dead.insert({1, 10});  // the sender's generation is dead
  }
  tx_->SendWake(rx_->address(), 1, 1);
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().not_alive == 1; }));

  Observer o;
  auto stranger = StartChannel({.slot = 900, .generation = 1}, &o);  // unknown slot
  ASSERT_TRUE(stranger.ok());
  (*stranger)->SendWake(rx_->address(), 1, 1);
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().not_alive == 2; }));

  auto newer = StartChannel({.slot = 1, .generation = 12}, &o);  // live generation
  ASSERT_TRUE(newer.ok());
  sender_->Send((*newer)->Encode(1, 1, 1));
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().accepted == 1; }));
  EXPECT_EQ(rx_obs_.Wakes(), std::vector<uint32_t>{1});
  EXPECT_EQ(rx_->stats().not_alive, 2u);
  EXPECT_EQ(rx_->stats().bad_mac + rx_->stats().bad_header + rx_->stats().bad_size, 0u);

  // A generation that dies after being accepted is refused from then on.
  {
    std::lock_guard<std::mutex> g(rx_obs_.mu);
    rx_obs_.dead.insert({1, 12});
  }
  sender_->Send((*newer)->Encode(2, 1, 1));
  ASSERT_TRUE(WaitFor([&] { return rx_->stats().not_alive == 3; }));
  EXPECT_EQ(rx_obs_.WakeCount(), 1u);
}

TEST_F(NetChannelTest, GarbageFloodNeitherCrashesNorBlocks) {
  std::mt19937_64 rng(12345);
  auto valid = tx_->Encode(1, 1, 1);
  std::vector<uint8_t> buf(2100);
  auto start = Clock::now();
  for (int i = 0; i < 10000; i++) {
    size_t n;
    switch (i % 4) {
      case 0: n = rng() % 2100; break;  // anything
      case 1: n = kWire; break;         // right size, random bytes
      case 2: n = kWire; break;         // valid header, random rest
      default: n = rng() % (kWire * 2); break;
    }
    for (size_t j = 0; j < n; j++) buf[j] = uint8_t(rng());
    if (i % 4 == 2) std::memcpy(buf.data(), valid.data(), 32);  // up to the pad: MAC path
    sender_->Send(buf.data(), n);
  }
  EXPECT_LT(Clock::now() - start, 10s);
  // Loopback may drop some of the flood when the socket buffer fills; what arrived was
  // all rejected and nothing woke the receiver.
  ASSERT_TRUE(WaitFor([&] {
    uint64_t before = Drops(rx_->stats());
    std::this_thread::sleep_for(50ms);
    return Drops(rx_->stats()) == before;
  }, 10s));
  EXPECT_GT(Drops(rx_->stats()), 0u);
  EXPECT_LE(Drops(rx_->stats()), 10000u);
  EXPECT_EQ(rx_->stats().accepted, 0u);
  EXPECT_EQ(rx_->stats().replayed + rx_->stats().not_alive, 0u);
  EXPECT_EQ(rx_obs_.WakeCount(), 0u);

  // Still healthy.
  tx_->SendWake(rx_->address(), 5, 5);
  ASSERT_TRUE(WaitFor([&] { return rx_obs_.WakeCount() == 1; }));
  EXPECT_EQ(rx_obs_.Wakes(), std::vector<uint32_t>{1});
}

TEST_F(NetChannelTest, DestructorReturnsPromptly) {
  auto t0 = Clock::now();
  rx_.reset();
  auto idle = Clock::now() - t0;
  // The poll() fallback timeout is 500 ms; the eventfd must end it well before.
  EXPECT_LT(idle, 300ms);

  // Also while a flood is arriving.
  Observer o;
  auto ch = StartChannel({.slot = 3}, &o);
  ASSERT_TRUE(ch.ok());
  RawSender s((*ch)->address());
  std::atomic<bool> done{false};
  std::thread flood([&] {
    std::vector<uint8_t> junk(200, 0x5a);
    while (!done) s.Send(junk);
  });
  std::this_thread::sleep_for(50ms);
  t0 = Clock::now();
  ch = Result<std::unique_ptr<NetChannel>>(Status(Code::kInvalid, "gone"));  // destroys it
  auto busy = Clock::now() - t0;
  done = true;
  flood.join();
  EXPECT_LT(busy, 300ms);
}

TEST_F(NetChannelTest, SendFailuresAreCountedNotFatal) {
  tx_->SendWake("not an address", 1, 1);
  tx_->SendWake("127.0.0.1:0", 1, 1);
  tx_->SendWake("[::1]:5000", 1, 1);  // IPv6 peer from an IPv4-bound channel
  EXPECT_EQ(tx_->stats().send_errors, 3u);
  EXPECT_EQ(tx_->stats().sent, 0u);
  // Nobody listening: UDP cannot tell, the send itself succeeds and never blocks.
  auto t0 = Clock::now();
  for (int i = 0; i < 100; i++) tx_->SendWake("127.0.0.1:9", 1, 1);
  EXPECT_LT(Clock::now() - t0, 2s);
  EXPECT_EQ(tx_->stats().sent + tx_->stats().send_errors, 103u);
}

TEST(NetChannelStart, BadBindAddressFailsClearly) {
  Observer o;
  for (const char* bad : {"", "127.0.0.1", "127.0.0.1:", "localhost:0", "not-an-ip:1",
                          "127.0.0.1:99999", "127.0.0.1:12ab", "::1:5", "[::1:5", "[::1]",
                          "1.2.3.4.5:0", "[fe80::1%nosuchif0]:0"}) {
    auto r = StartChannel({.bind = bad}, &o);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), Code::kInvalid) << bad << ": " << r.status().ToString();
    EXPECT_NE(r.status().message().find(bad), std::string::npos) << r.status().ToString();
  }
  // Well-formed but not an address of this host (TEST-NET-1).
  auto r = StartChannel({.bind = "192.0.2.1:0"}, &o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalid) << r.status().ToString();
  EXPECT_NE(r.status().message().find("192.0.2.1:0"), std::string::npos);
}

TEST(NetChannelStart, PortInUseIsIOError) {
  Observer o;
  auto a = StartChannel({}, &o);
  ASSERT_TRUE(a.ok());
  auto b = StartChannel({.bind = (*a)->address()}, &o);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kIOError) << b.status().ToString();
}

TEST(NetChannelStart, MissingCallbacksAreInvalid) {
  NetChannel::Options opts;
  opts.bind = "127.0.0.1:0";
  auto r = NetChannel::Start(opts);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalid);
}

TEST(NetChannelStart, Ipv6Loopback) {
  Observer orx, otx;
  auto rx = StartChannel({.bind = "[::1]:0", .slot = 2}, &orx);
  if (!rx.ok()) GTEST_SKIP() << "no IPv6 loopback here: " << rx.status().ToString();
  auto tx = StartChannel({.bind = "[::1]:0", .slot = 4}, &otx);
  ASSERT_TRUE(tx.ok()) << tx.status().ToString();
  EXPECT_EQ((*rx)->address().rfind("[::1]:", 0), 0u) << (*rx)->address();
  (*tx)->SendWake((*rx)->address(), 1, 1);
  ASSERT_TRUE(WaitFor([&] { return orx.WakeCount() == 1; }));
  EXPECT_EQ(orx.Wakes(), std::vector<uint32_t>{4});
  (*tx)->SendWake("127.0.0.1:9", 1, 1);  // family mismatch
  EXPECT_EQ((*tx)->stats().send_errors, 1u);
}

}  // namespace
}  // namespace agorafs
