// NetChannel: UDP wake-up hints between nodes. See net_channel.h for the contract.
//
// Implementation notes
// - One UDP socket, bound only to the configured address, serves both directions.
//   Sending from the bound socket means the datagrams leave from the address the node
//   publishes (firewall rules and "bind only to what was configured" hold for outgoing
//   traffic too) and no second, ephemeral port is opened. A UDP sendto() concurrent
//   with recv() on another thread is safe. The price: a node bound to IPv4 cannot send
//   to an IPv6 peer and vice versa; such a send fails and is counted in send_errors.
// - The receive thread poll()s the socket and an eventfd; the destructor signals the
//   eventfd, so it returns promptly. poll() also has a timeout as a fallback.
// - recv() uses MSG_TRUNC into a 2048-byte buffer: the kernel reports the datagram's
//   true length, so any oversize datagram is seen as such.
// - Checks run cheapest-first and the replay table is touched only by datagrams that
//   passed the MAC and is_alive, so unauthenticated traffic cannot grow or poison it.
#include "cluster/net_channel.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sodium.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include <spdlog/spdlog.h>

#include "util/clock.h"

namespace agorafs {

namespace {

constexpr uint32_t kNetMagic = 0x574E4741;  // "AGNW" read as a little-endian u32
constexpr uint16_t kNetVersion = 1;
constexpr size_t kMacOffset = NetChannel::kWireSize - crypto_auth_BYTES;
constexpr size_t kRecvBuf = 2048;
constexpr int kPollTimeoutMs = 500;              // fallback only; the eventfd wakes us
constexpr size_t kMaxTracked = 4096;             // replay table bound
constexpr uint64_t kSweepIntervalMs = 30000;     // periodic sweep of dead generations
constexpr uint64_t kDropLogIntervalMs = 60000;   // at most one drop report per minute
constexpr char kKdfContext[] = "agorafs net v1";

static_assert(crypto_auth_BYTES == 32, "wire format has a 32-byte MAC");
static_assert(crypto_auth_KEYBYTES == 32, "derived key is 32 bytes");
static_assert(NetChannel::kWireSize == 96, "documented wire size");
static_assert(kRecvBuf > NetChannel::kWireSize);

// Wire offsets.
constexpr size_t kOffMagic = 0, kOffVersion = 4, kOffKind = 6, kOffUuid = 8, kOffSlot = 24,
                 kOffPad = 28, kOffGen = 32, kOffSeq = 40, kOffRing = 48, kOffEpoch = 56;
static_assert(kOffEpoch + 8 == kMacOffset);

template <typename T>
void PutLE(uint8_t* p, T v) {
  for (size_t i = 0; i < sizeof(T); i++) p[i] = uint8_t(uint64_t(v) >> (8 * i));
}
template <typename T>
T GetLE(const uint8_t* p) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); i++) v |= uint64_t(p[i]) << (8 * i);
  return T(v);
}

std::string ErrnoStr(int e) { return std::string(strerror(e)); }

bool SodiumReady() {
  static const bool ok = sodium_init() >= 0;  // thread-safe static init; runs once
  return ok;
}

// Parses "a.b.c.d:port" or "[v6]:port" / "[v6%scope]:port" (numeric only, no DNS).
Result<std::pair<sockaddr_storage, socklen_t>> ParseAddress(const std::string& s,
                                                            bool allow_port0) {
  auto bad = [&s](const char* why) {
    return Status(Code::kInvalid, "net address \"" + s + "\": " + why +
                                      " (expected \"ip:port\" or \"[ipv6]:port\")");
  };
  size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0) return bad("missing port");
  std::string host = s.substr(0, colon);
  std::string port_str = s.substr(colon + 1);
  unsigned port = 0;
  if (port_str.empty() || port_str.size() > 5) return bad("bad port");
  auto [pend, perr] = std::from_chars(port_str.data(), port_str.data() + port_str.size(), port);
  if (perr != std::errc() || pend != port_str.data() + port_str.size() || port > 65535) {
    return bad("bad port");
  }
  if (port == 0 && !allow_port0) return bad("port 0");

  sockaddr_storage ss{};
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') return bad("unbalanced brackets");
    host = host.substr(1, host.size() - 2);
    uint32_t scope = 0;
    size_t pct = host.find('%');
    if (pct != std::string::npos) {
      std::string sc = host.substr(pct + 1);
      host.resize(pct);
      if (sc.empty()) return bad("empty scope id");
      auto [e, ec] = std::from_chars(sc.data(), sc.data() + sc.size(), scope);
      if (ec != std::errc() || e != sc.data() + sc.size()) {
        scope = if_nametoindex(sc.c_str());
        if (scope == 0) return bad("unknown interface in scope id");
      }
    }
    auto* a6 = reinterpret_cast<sockaddr_in6*>(&ss);
    if (inet_pton(AF_INET6, host.c_str(), &a6->sin6_addr) != 1) return bad("bad IPv6 address");
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons(uint16_t(port));
    a6->sin6_scope_id = scope;
    return std::make_pair(ss, socklen_t(sizeof(sockaddr_in6)));
  }
  if (host.find(':') != std::string::npos) return bad("IPv6 address needs brackets");
  auto* a4 = reinterpret_cast<sockaddr_in*>(&ss);
  if (inet_pton(AF_INET, host.c_str(), &a4->sin_addr) != 1) return bad("bad IPv4 address");
  a4->sin_family = AF_INET;
  a4->sin_port = htons(uint16_t(port));
  return std::make_pair(ss, socklen_t(sizeof(sockaddr_in)));
}

std::string FormatAddress(const sockaddr_storage& ss) {
  char buf[INET6_ADDRSTRLEN + IF_NAMESIZE + 2] = {};
  if (ss.ss_family == AF_INET) {
    const auto* a4 = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a4->sin_addr, buf, sizeof(buf));
    return std::string(buf) + ":" + std::to_string(ntohs(a4->sin_port));
  }
  const auto* a6 = reinterpret_cast<const sockaddr_in6*>(&ss);
  inet_ntop(AF_INET6, &a6->sin6_addr, buf, sizeof(buf));
  std::string host = buf;
  if (a6->sin6_scope_id != 0) host += "%" + std::to_string(a6->sin6_scope_id);
  return "[" + host + "]:" + std::to_string(ntohs(a6->sin6_port));
}

}  // namespace

struct NetChannel::Impl {
  Options opts;  // opts.secret is wiped once the key is derived
  std::array<uint8_t, crypto_auth_KEYBYTES> key{};
  int fd = -1;
  int wake_fd = -1;
  int family = AF_INET;
  std::string bound;
  Stats stats;
  std::atomic<uint64_t> next_seq{1};
  std::atomic<bool> stop{false};
  std::thread thread;

  // Receive-thread state only.
  std::map<std::pair<uint32_t, uint64_t>, uint64_t> last_seq;
  uint64_t last_sweep_ms = 0;
  uint64_t last_drop_log_ms = 0;
  uint64_t drops_logged = 0;

  // Rate limit for send-error logging (any thread).
  std::mutex send_log_mu;
  uint64_t last_send_log_ms = 0;

  ~Impl() {
    sodium_memzero(key.data(), key.size());
    sodium_memzero(opts.secret.data(), opts.secret.size());
    if (fd >= 0) close(fd);
    if (wake_fd >= 0) close(wake_fd);
  }

  void Run();
  void Handle(const uint8_t* buf, size_t len);
  void Sweep();
  void MaybeLogDrops();
  void LogSendError(const std::string& addr, const std::string& why);
  uint64_t Drops() const {
    return stats.bad_size.load(std::memory_order_relaxed) +
           stats.bad_header.load(std::memory_order_relaxed) +
           stats.bad_mac.load(std::memory_order_relaxed) +
           stats.not_alive.load(std::memory_order_relaxed) +
           stats.replayed.load(std::memory_order_relaxed);
  }
};

Result<std::unique_ptr<NetChannel>> NetChannel::Start(Options opts) {
  if (!SodiumReady()) return Err(Code::kIOError, "net channel: sodium_init failed");
  if (!opts.is_alive || !opts.on_wake) {
    return Err(Code::kInvalid, "net channel: is_alive and on_wake callbacks are required");
  }
  AGFS_ASSIGN_OR_RETURN(auto addr, ParseAddress(opts.bind, /*allow_port0=*/true));

  auto impl = std::make_unique<Impl>();
  impl->opts = std::move(opts);
  crypto_generichash(impl->key.data(), impl->key.size(),
                     reinterpret_cast<const unsigned char*>(kKdfContext), sizeof(kKdfContext) - 1,
                     impl->opts.secret.data(), impl->opts.secret.size());
  sodium_memzero(impl->opts.secret.data(), impl->opts.secret.size());

  // Sequence numbers start at the wall clock in ns so that a channel re-created within
  // the same generation (e.g. after an address change) starts above the previous one's
  // numbers. If the clock stepped back, peers drop our wakes as replays until it
  // catches up: a liveness cost only (they still poll), never a safety one.
  impl->next_seq.store(std::max<uint64_t>(1, RealtimeNs()));

  impl->family = addr.first.ss_family;
  impl->fd = socket(impl->family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (impl->fd < 0) {
    return Err(Code::kIOError, "net channel: socket(): " + ErrnoStr(errno));
  }
  if (impl->family == AF_INET6) {
    int one = 1;  // [::] means IPv6 only: never silently take IPv4 as well
    if (setsockopt(impl->fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0) {
      return Err(Code::kIOError, "net channel: IPV6_V6ONLY: " + ErrnoStr(errno));
    }
  }
  if (bind(impl->fd, reinterpret_cast<const sockaddr*>(&addr.first), addr.second) != 0) {
    int e = errno;
    Code c = (e == EADDRNOTAVAIL || e == EINVAL || e == EAFNOSUPPORT) ? Code::kInvalid
                                                                       : Code::kIOError;
    return Err(c, "net channel: bind " + impl->opts.bind + ": " + ErrnoStr(e));
  }
  sockaddr_storage got{};
  socklen_t glen = sizeof(got);
  if (getsockname(impl->fd, reinterpret_cast<sockaddr*>(&got), &glen) != 0) {
    return Err(Code::kIOError, "net channel: getsockname: " + ErrnoStr(errno));
  }
  impl->bound = FormatAddress(got);
  impl->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (impl->wake_fd < 0) return Err(Code::kIOError, "net channel: eventfd: " + ErrnoStr(errno));

  impl->last_sweep_ms = BootNowMs();
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Run(); });

  std::unique_ptr<NetChannel> ch(new NetChannel());
  ch->impl_ = std::move(impl);
  spdlog::info("net channel: slot {} generation {} listening on {}", ch->impl_->opts.slot,
               ch->impl_->opts.generation, ch->impl_->bound);
  return ch;
}

NetChannel::~NetChannel() {
  if (!impl_) return;
  impl_->stop.store(true);
  uint64_t one = 1;
  ssize_t w = write(impl_->wake_fd, &one, sizeof(one));
  (void)w;  // if it failed, the poll timeout still ends the thread
  if (impl_->thread.joinable()) impl_->thread.join();
}

std::string NetChannel::address() const { return impl_->bound; }

const NetChannel::Stats& NetChannel::stats() const { return impl_->stats; }

std::array<uint8_t, NetChannel::kWireSize> NetChannel::Encode(uint64_t seq, uint64_t ring_seq,
                                                              uint64_t epoch) const {
  std::array<uint8_t, kWireSize> b{};
  PutLE<uint32_t>(b.data() + kOffMagic, kNetMagic);
  PutLE<uint16_t>(b.data() + kOffVersion, kNetVersion);
  PutLE<uint16_t>(b.data() + kOffKind, kKindWake);
  std::memcpy(b.data() + kOffUuid, impl_->opts.uuid.data(), 16);
  PutLE<uint32_t>(b.data() + kOffSlot, impl_->opts.slot);
  PutLE<uint32_t>(b.data() + kOffPad, 0);
  PutLE<uint64_t>(b.data() + kOffGen, impl_->opts.generation);
  PutLE<uint64_t>(b.data() + kOffSeq, seq);
  PutLE<uint64_t>(b.data() + kOffRing, ring_seq);
  PutLE<uint64_t>(b.data() + kOffEpoch, epoch);
  crypto_auth(b.data() + kMacOffset, b.data(), kMacOffset, impl_->key.data());
  return b;
}

void NetChannel::SendWake(const std::string& address, uint64_t ring_seq, uint64_t epoch) {
  auto addr = ParseAddress(address, /*allow_port0=*/false);
  if (!addr.ok()) {
    impl_->stats.send_errors.fetch_add(1, std::memory_order_relaxed);
    impl_->LogSendError(address, addr.status().message());
    return;
  }
  if (addr->first.ss_family != impl_->family) {
    impl_->stats.send_errors.fetch_add(1, std::memory_order_relaxed);
    impl_->LogSendError(address, "address family differs from the bound " + impl_->bound);
    return;
  }
  auto dgram = Encode(impl_->next_seq.fetch_add(1), ring_seq, epoch);
  ssize_t n;
  do {
    n = sendto(impl_->fd, dgram.data(), dgram.size(), MSG_DONTWAIT | MSG_NOSIGNAL,
               reinterpret_cast<const sockaddr*>(&addr->first), addr->second);
  } while (n < 0 && errno == EINTR);
  if (n == ssize_t(dgram.size())) {
    impl_->stats.sent.fetch_add(1, std::memory_order_relaxed);
  } else {
    int e = errno;
    impl_->stats.send_errors.fetch_add(1, std::memory_order_relaxed);
    impl_->LogSendError(address, n < 0 ? ErrnoStr(e) : "short send");
  }
}

void NetChannel::Impl::LogSendError(const std::string& addr, const std::string& why) {
  uint64_t now = BootNowMs();
  {
    std::lock_guard<std::mutex> g(send_log_mu);
    if (last_send_log_ms != 0 && now - last_send_log_ms < kDropLogIntervalMs) return;
    last_send_log_ms = now;
  }
  spdlog::warn("net channel: send to {} failed: {} ({} send errors so far)", addr, why,
               stats.send_errors.load(std::memory_order_relaxed));
}

void NetChannel::Impl::Run() {
  alignas(8) uint8_t buf[kRecvBuf];
  pollfd pfd[2] = {{fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
  while (!stop.load(std::memory_order_relaxed)) {
    int r = poll(pfd, 2, kPollTimeoutMs);
    if (r < 0 && errno != EINTR) {
      spdlog::error("net channel: poll: {}", ErrnoStr(errno));
      // Avoid a hot loop on a persistent error; the destructor's eventfd still works
      // on the next poll.
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    if (stop.load(std::memory_order_relaxed)) break;
    if (r > 0 && (pfd[0].revents & (POLLIN | POLLERR))) {
      // Drain what is queued, but re-check stop regularly so a flood cannot delay it.
      for (int i = 0; i < 256 && !stop.load(std::memory_order_relaxed); i++) {
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0) {
          if (errno == EINTR) continue;
          // EAGAIN: drained. Anything else (e.g. an ICMP error surfaced on the socket)
          // is consumed by this recv and is not about a received datagram.
          break;
        }
        Handle(buf, size_t(n));
      }
    }
    uint64_t now = BootNowMs();
    if (now - last_sweep_ms >= kSweepIntervalMs) {
      Sweep();
      last_sweep_ms = now;
    }
    MaybeLogDrops();
  }
}

void NetChannel::Impl::Handle(const uint8_t* b, size_t len) {
  if (len != kWireSize) {  // MSG_TRUNC: len is the datagram's true size
    stats.bad_size.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (GetLE<uint32_t>(b + kOffMagic) != kNetMagic ||
      GetLE<uint16_t>(b + kOffVersion) != kNetVersion ||
      GetLE<uint16_t>(b + kOffKind) != kKindWake || GetLE<uint32_t>(b + kOffPad) != 0 ||
      std::memcmp(b + kOffUuid, opts.uuid.data(), 16) != 0) {
    stats.bad_header.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (crypto_auth_verify(b + kMacOffset, b, kMacOffset, key.data()) != 0) {
    stats.bad_mac.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  uint32_t slot = GetLE<uint32_t>(b + kOffSlot);
  uint64_t gen = GetLE<uint64_t>(b + kOffGen);
  uint64_t seq = GetLE<uint64_t>(b + kOffSeq);
  if (!opts.is_alive(slot, gen)) {
    stats.not_alive.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  auto key_sg = std::make_pair(slot, gen);
  auto it = last_seq.find(key_sg);
  if (it != last_seq.end()) {
    if (seq <= it->second) {
      stats.replayed.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    it->second = seq;
  } else {
    if (last_seq.size() >= kMaxTracked) Sweep();
    if (last_seq.size() >= kMaxTracked) {
      // Only reachable if is_alive vouches for more than kMaxTracked pairs. Forget the
      // lowest one: at worst one old datagram of it can be replayed once, which costs a
      // disk read.
      last_seq.erase(last_seq.begin());
    }
    last_seq.emplace(key_sg, seq);
  }
  stats.accepted.fetch_add(1, std::memory_order_relaxed);
  opts.on_wake(slot);
}

void NetChannel::Impl::Sweep() {
  for (auto it = last_seq.begin(); it != last_seq.end();) {
    if (!opts.is_alive(it->first.first, it->first.second)) {
      it = last_seq.erase(it);
    } else {
      ++it;
    }
  }
}

void NetChannel::Impl::MaybeLogDrops() {
  uint64_t drops = Drops();
  if (drops == drops_logged) return;
  uint64_t now = BootNowMs();
  if (last_drop_log_ms != 0 && now - last_drop_log_ms < kDropLogIntervalMs) return;
  last_drop_log_ms = now;
  spdlog::warn(
      "net channel {}: {} datagrams dropped since last report (totals: bad_size={} "
      "bad_header={} bad_mac={} not_alive={} replayed={})",
      bound, drops - drops_logged, stats.bad_size.load(), stats.bad_header.load(),
      stats.bad_mac.load(), stats.not_alive.load(), stats.replayed.load());
  drops_logged = drops;
}

}  // namespace agorafs
