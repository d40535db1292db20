// NetChannel: the optional network accelerator. It carries only wake-up hints: "I
// (slot, generation) wrote to my message ring up to seq; read it now". The message
// itself is always on the disk first, so a lost, late, forged or replayed datagram can
// at worst cost the receiver one extra disk read; it never grants, revokes or changes
// any state. With the channel off (-o nonet) or cut, the receivers' polling finds the
// same messages a poll interval later.
//
// Contract
// - Transport: UDP datagrams of exactly kWireSize bytes to the "ip:port" a node
//   publishes in its heartbeat block. The socket binds only to the address given
//   (never INADDR_ANY unless that is what the administrator configured).
// - Wire format (little-endian): magic u32 "AGNW", version u16, kind u16, cluster
//   uuid[16], sender slot u32, pad u32, sender generation u64, sequence u64 (strictly
//   increasing per sender generation), ring seq u64, epoch u64, then a 32-byte MAC:
//   libsodium crypto_auth (HMAC-SHA512-256) over everything before it, keyed with
//   crypto_generichash(key = superblock cluster_secret, msg = "agorafs net v1").
// - A datagram is dropped and counted (Stats) when: its size is not kWireSize
//   (truncated / oversized; the receive buffer is larger than kWireSize so oversize is
//   seen), magic/version/uuid do not match, the MAC fails, the sender's (slot,
//   generation) is not alive according to is_alive, or its sequence is not above the
//   last accepted one from that (slot, generation) (replay). Otherwise on_wake(slot)
//   runs on the receive thread.
// - Sending never blocks on the peer: a send to an unreachable address just fails and
//   is counted.
//
// Thread-safety: Send and stats from any thread; callbacks run on the receive thread.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "format/format.h"
#include "util/status.h"

namespace agorafs {

class NetChannel {
 public:
  static constexpr size_t kWireSize = 4 + 2 + 2 + 16 + 4 + 4 + 8 + 8 + 8 + 8 + 32;
  static constexpr uint16_t kKindWake = 1;

  struct Options {
    std::string bind;  // "ip:port"; port 0 picks one (see address())
    std::array<uint8_t, 32> secret{};
    Uuid uuid{};
    uint32_t slot = 0;
    uint64_t generation = 0;
    std::function<bool(uint32_t slot, uint64_t generation)> is_alive;
    std::function<void(uint32_t slot)> on_wake;
  };
  struct Stats {
    std::atomic<uint64_t> sent{0}, send_errors{0}, accepted{0};
    std::atomic<uint64_t> bad_size{0}, bad_header{0}, bad_mac{0}, not_alive{0}, replayed{0};
  };

  static Result<std::unique_ptr<NetChannel>> Start(Options opts);
  ~NetChannel();  // stops the receive thread, closes the socket

  std::string address() const;  // the bound "ip:port", to publish in the slot
  // Sends a wake-up to `address` ("ip:port") telling it our ring reached `ring_seq`.
  void SendWake(const std::string& address, uint64_t ring_seq, uint64_t epoch);
  const Stats& stats() const;

  // Builds a datagram exactly as SendWake would (for tests of the receive checks).
  std::array<uint8_t, kWireSize> Encode(uint64_t seq, uint64_t ring_seq, uint64_t epoch) const;

 private:
  NetChannel() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace agorafs
