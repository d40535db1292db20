/*
 * cluster.pml -- Promela model of the agorafs cluster layer (docs/DESIGN.md,
 * "Cluster layer"; src/cluster/membership.h, timings.h; MsgOp in src/format/format.h):
 * membership by delta leases, the lease/lapse/fence handshake, dead-node recovery,
 * lock-master epochs (new-master reclaim) and the lock grant/revoke/release/cancel
 * protocol, with crashes, pauses, late-landing writes and a lost network.
 * Checked by model/check.sh (Spin). The Disk Paxos election itself is model/paxos.pml.
 *
 * WHAT IS MODELLED
 *  - NN nodes (default 3). Node 0 is the master of epoch 1. Each node owns, on the
 *    shared disk, a heartbeat block (counter + verdicts), a message ring, and writes
 *    data blocks covered by the one lock it may hold. Nobody writes another's block.
 *  - Time: a Tick process advances a global interval. Every node has a lease
 *    (ticks left); every slot has a disk heartbeat age (ticks since its heartbeat
 *    last *landed*). Lease L_T < dead-after D_T. A heartbeat landing sets the lease
 *    to L_T - (ticks since that write was *issued*): the lease runs from the issue of
 *    the last completed heartbeat write, exactly as LeaseMs() is specified.
 *  - Late-landing writes: every write (heartbeat, data, ring message, verdict) is
 *    issued into a per-node pending slot and lands at a later, nondeterministic step
 *    of the Disk process. The only timing assumption: a write lands within B_T ticks
 *    of its issue (Tick is disabled while a write older than B_T is pending). Crashed
 *    or paused nodes' in-flight writes still land.
 *  - GuardedDevice: every write a node issues is guarded by VALID(i) (state kActive
 *    and lease not run out), checked at the instant of issue.
 *  - Pauses: a node simply takes no step for any number of ticks. Crashes: a node
 *    stops forever (at most MAXCRASH crashes). Fenced nodes stop (no rejoin).
 *    Lock requests are bounded (MAXREQ in all) and a holder writes one data block
 *    per holding: this bounds the state space, not the interleavings.
 *  - Lapse + fence handshake (membership.h): lease runs out -> kLapsed; the node reads
 *    the verdicts naming it (fenced if any), writes its heartbeat once, waits for it
 *    to land, reads again (fenced if any), else goes back to kActive.
 *  - DeclareDead (lock master only): slot dead = its heartbeat stood still for D_T;
 *    write verdict, wait for it to land, re-read victim's heartbeat; moved -> withdraw,
 *    else confirmed: recovery, the victim's lock is freed. "Moved" is read as "its
 *    heartbeat landed less than D_T ago" (if it landed and then stood still for D_T
 *    again, the node's lease has run out again and it fences at its next handshake).
 *  - Epochs: when the current master's heartbeat stood still for D_T a live node may
 *    start the next epoch (up to MAXE) and becomes its master. The Disk Paxos ballot is
 *    abstracted to one atomic decision (its agreement is checked in paxos.pml). Nodes
 *    adopt the new epoch by reading it at any later step (lazily); a deposed master
 *    keeps acting as master of its old epoch until it adopts the new one. On adopting,
 *    a node sends reclaim (if it holds the lock), reclaim-done, then re-requests.
 *    The new master grants nothing until every slot sent reclaim-done or was recovered.
 *    Messages carry their epoch; receivers drop messages of another epoch.
 *  - Messages: ring[w*NN+r] = the messages in writer w's on-disk ring addressed to r
 *    (FIFO, capacity RC = the unacknowledged window; a writer blocks when full).
 *    A ring append is one late-landing write; a node's ring writes are serialized.
 *    Receivers poll (a Node step). The UDP wake-up hint is not modelled at all: the
 *    network is lost, polling alone must do.
 *  - Lock service (one lock, exclusive): master table = holder + FIFO queue; head is
 *    granted when there is no holder; otherwise one revoke goes to the holder. Holder:
 *    on revoke (or voluntarily) waits until its data writes have landed ("blocks home")
 *    and only then writes the release. Cancel: a node may withdraw a request; a grant
 *    that crosses the cancel is accepted and released at once (see RELEASE RACES).
 *    A master's own requests/releases/grants are local (no ring).
 *
 * CONFIGURATIONS CHECKED (check.sh; exhaustive, -DCOLLAPSE)
 *  - cluster_recovery: NN=2, one epoch, L_T=2 D_T=3 B_T=1 (in-flight bound = margin),
 *    MAXREQ=2 lock requests in all, one crash: lapses, fencing, dead-node recovery,
 *    release, cancel, late writes.
 *  - cluster_failover: NN=2, two epochs, L_T=1 D_T=2 B_T=0 (writes land late but
 *    before the next tick): election, reclaim, deposed master still granting.
 *  - live_progress / live_cancel: LIVE builds, weak fairness (pan -a -f).
 *  - mutations that must fail: B_T=2 > D_T-L_T, BUG_EARLY_RELEASE, BUG_LEASE_ONLY,
 *    BUG_DROP_GRANT.
 *  NN=3 (master + two clients) is supported by the source but its exhaustive search
 *  did not finish within 150 s / 4.7 GB, so it is not part of check.sh; with NN=2 the
 *  master is itself a lock client (local grants) and the other node uses the rings.
 *
 * PROPERTIES (see check.sh)
 *  - Monitor: never two nodes that both believe they hold the lock while both are
 *    VALID (kActive with lease left).
 *  - Disk: a data write landing after another node accepted a grant of the lock
 *    (dstale) is an error -- this is where a revoked, released or recovered holder's
 *    late write is caught. With B_T <= D_T - L_T it is proved impossible; with a
 *    larger B_T Spin finds the residual-risk trail (check.sh runs that as an
 *    expected failure).
 *  - RCL assertion: the new master never receives two reclaims of the lock.
 *  - LIVE build: weak fairness; node NN-1 requests and eventually holds unless it
 *    cancelled itself (ltl `progress`), while the disk answers (writes land within
 *    B_T) and live nodes heartbeat every tick (Tick waits for them); any one node
 *    (the master, the holder) may crash. Optional actions stay nondeterministic, the
 *    duties (release on revoke, grant, declare dead, reclaim) are taken when enabled.
 *
 * RELEASE RACES (sanlock e40e1f6 / 933a474). sanlock's releases raced with a ballot
 * run by another host: (a) a release written right after acquire was overwritten by
 * the other host's late commit of the same ballot, and (b) an acquire that was given
 * up could still be committed by another host's ballot that had already read our
 * block -- both leave the lease owned on disk by a host that thinks it does not hold
 * it (stuck lock), or owned twice. The agorafs analogues modelled here:
 *  - a release whose covered data writes are still in flight (BUG_EARLY_RELEASE
 *    drops the "blocks home first" rule: Spin finds the late write landing after the
 *    next grant);
 *  - a cancel crossing a grant (BUG_DROP_GRANT ignores such a grant, as sanlock (b)
 *    did: the master believes the node holds the lock, revokes are ignored, and the
 *    LIVE check finds the requester starving);
 *  - a release or request in flight while a new epoch is elected (late messages of
 *    the old epoch; deposed master still granting);
 *  - a lapsed node counted valid again before its handshake finished (BUG_LEASE_ONLY
 *    makes the write guard look at the clock only: Spin finds two valid holders).
 *
 * ABSTRACTED (and why)
 *  - Real time -> integer ticks; clock-rate differences and scan granularity are part
 *    of the margin max(H, D/10) which appears here as D_T - L_T >= B_T.
 *  - Observers: a slot counts as dead when its heartbeat stood still on the *disk* for
 *    D_T ticks. Every real observer's clock starts when it *sees* a change, i.e. no
 *    earlier than the landing, so real observers declare dead no earlier: this is a
 *    superset of their behaviours (sound for safety). The observer-restart rule only
 *    suppresses verdicts, so it is omitted (again a superset).
 *  - Disk Paxos -> an atomic decision per epoch (paxos.pml checks agreement).
 *  - One exclusive lock (shared modes and downgrades are table lookups on the master;
 *    the message races are the same). Data = one pending write per node.
 *  - No Join/Rejoin: fenced or crashed nodes stay out; slots are never reused.
 *  - Ring acks/overwrite protection -> channel capacity. Torn writes are covered by
 *    the two-copy rule and are not modelled (a torn write = a write that did not land).
 *  - The withdrawal of a verdict is immediate (it only makes nodes fence less).
 *
 * PROTOCOL REQUIREMENTS THE MODEL RELIES ON (state them in the implementation):
 *  - GuardedDevice/CheckWrite must refuse writes while State() != kActive, not only
 *    when the clock is past the lease: between the handshake's heartbeat landing and
 *    its second read the lease is "valid" by the clock but the node may be fenced.
 *  - A node's ring appends are serialized (one in flight), and messages of a
 *    different epoch are dropped by the receiver.
 *  - A grant that arrives after the node cancelled is accepted and released.
 */

#ifndef NN
#define NN 3
#endif
#ifndef L_T
#define L_T 2
#endif
#ifndef D_T
#define D_T 3
#endif
#ifndef B_T
#define B_T 1
#endif
#ifndef MAXE
#define MAXE 2
#endif
#ifndef MAXCRASH
#define MAXCRASH 1
#endif
#ifndef RC
#define RC 2
#endif
#ifndef MAXREQ
#define MAXREQ 3
#endif

#define NONE 255
#define ALL ((1 << NN) - 1)

/* node modes (Membership::SelfState) */
#define ACTIVE  0
#define LAPSED  1
#define FENCED  2
#define CRASHED 3

mtype = { REQ, REL, RCL, RDONE, CAN, GRANT, REVOKE };

#ifdef BUG_LEASE_ONLY
#define VALID(i) (lease[i] > 0 && (mode[i] == ACTIVE || mode[i] == LAPSED))
#else
#define VALID(i) (mode[i] == ACTIVE && lease[i] > 0)
#endif
#ifdef LIVE
#define OTHERWISE :: else
#else
#define OTHERWISE         /* SAFETY: a disabled step blocks (no self-loops) */
#endif
#ifdef LIVE
#define HBT(i) hbt[i] = 1   /* LIVE: Tick waits for every live node's beat */
#else
#define HBT(i) skip         /* SAFETY: beats as often as it likes */
#endif
#define BIT(x, b) (((x) >> (b)) & 1)

/* ---- shared disk ---- */
byte hbage[NN];      /* ticks since slot's heartbeat last landed (capped at D_T) */
byte verd[NN];       /* bit j: j's heartbeat block carries a verdict naming the slot */
chan ring[NN * NN] = [RC] of { mtype, byte };   /* writer*NN+reader: (op, epoch) */

/* ---- writes in flight: 0 = none, else (ticks since issue) + 1 ---- */
byte hbp[NN];  /* heartbeat */
byte dp[NN];   /* data block under the lock */
byte rp[NN];   /* ring append */
byte vp[NN];   /* verdict (own heartbeat block) */
mtype rp_op[NN];
byte rp_ep[NN];
byte rp_ch[NN];
byte vslot[NN];

/* ---- epochs: abstract Disk Paxos decisions ---- */
byte epoch = 1;
byte master_of[MAXE + 1];

/* ---- node state ---- */
byte mode[NN];
byte lease[NN];
bit hbt[NN];     /* heartbeat issued in this tick interval */
byte hs[NN];     /* handshake phase */
byte ep[NN];     /* epoch adopted */
byte rcl[NN];    /* reclaim step after adopting: 0 none, 1 reclaim, 2 done, 3 re-request */
bit want[NN];
bit held[NN];
bit revk[NN];    /* revoke received: release when blocks are home */
bit canc[NN];    /* cancel sent; a crossing grant may still come */
bit dstale[NN];  /* ghost: another node accepted a grant while dp[] was in flight */
byte crashes;
byte reqs;       /* lock requests made so far (bounded by MAXREQ) */
bit wrote[NN];   /* one data write per holding is enough to expose a late write */

/* ---- lock-master state (meaningful while mep[j] == ep[j] != 0) ---- */
byte mep[NN];        /* epoch node j is master of (0 = none) */
byte holder[NN];
byte mq[NN * NN];    /* FIFO queue of master j: mq[j*NN + 0 ..] */
bit revsent[NN];
byte rdone[NN];      /* bit s: s reclaimed, or recovered */
byte rcv[NN];        /* bit s: s recovered by this master */
byte dd[NN];         /* slot being declared dead, NONE if none */

#define ISMASTER(j) (mep[j] != 0 && mep[j] == ep[j])
#define CUR_MASTER(i) master_of[ep[i]]
#define RING_FREE(i, d) (rp[i] == 0 && len(ring[(i) * NN + (d)]) < RC)

inline send(i, d, op, e) {
  rp[i] = 1; rp_op[i] = op; rp_ep[i] = e; rp_ch[i] = i * NN + d
}

inline enqueue(j, n) {
  t = 0;
  do
  :: t < NN && mq[j * NN + t] == n -> break          /* already queued */
  :: t < NN && mq[j * NN + t] == NONE -> mq[j * NN + t] = n; break
  :: t < NN && mq[j * NN + t] != n && mq[j * NN + t] != NONE -> t++
  :: t == NN -> assert(false)                         /* queue overflow */
  od;
  t = 0
}

inline unqueue(j, n) {                                /* remove n, keep order */
  t = 0;
  do
  :: t < NN && mq[j * NN + t] != n -> t++
  :: t < NN && mq[j * NN + t] == n ->
     do
     :: t < NN - 1 -> mq[j * NN + t] = mq[j * NN + t + 1]; t++
     :: t == NN - 1 -> mq[j * NN + t] = NONE; break
     od;
     break
  :: t == NN -> break
  od;
  t = 0
}

/* node n (valid) starts to use the lock: every other node's in-flight data write is
   now stale. A node that is not VALID cannot use it before its handshake succeeds. */
inline mark_stale(n) {
  t = 0;
  do
  :: t < NN -> if :: t != n && dp[t] != 0 -> dstale[t] = 1 :: else fi; t++
  :: t == NN -> t = 0; break
  od
}
inline accept(n) {
  held[n] = 1; want[n] = 0; wrote[n] = 0;
  if :: VALID(n) -> mark_stale(n) :: else fi
}

inline clear_master(j) {
  t = 0;
  do
  :: t < NN -> mq[j * NN + t] = NONE; t++
  :: t == NN -> t = 0; break
  od;
  holder[j] = NONE; revsent[j] = 0; rcv[j] = 0; dd[j] = NONE
}

/* ---- node steps (each atomic; a step whose guard is false does nothing) ---- */

inline step_heartbeat() {
  if
  :: VALID(i) && hbp[i] == 0 && !hbt[i] -> hbp[i] = 1; HBT(i)
  OTHERWISE
  fi
}

inline step_handshake() {
  if
  :: mode[i] == LAPSED && hs[i] == 0 && hbp[i] == 0 ->
     if
     :: verd[i] != 0 -> mode[i] = FENCED
     :: else -> hbp[i] = 1; hs[i] = 1          /* write heartbeat once (not guarded) */
     fi
  :: mode[i] == LAPSED && hs[i] == 1 && hbp[i] == 0 ->   /* it landed: read again */
     hs[i] = 0;
     if
     :: verd[i] != 0 -> mode[i] = FENCED
     :: else -> if :: lease[i] > 0 -> mode[i] = ACTIVE; if :: held[i] -> mark_stale(i) :: else fi :: else fi
     fi
  OTHERWISE
  fi
}

inline step_adopt() {            /* read the Paxos blocks, adopt a newer epoch */
  if
  :: mode[i] == ACTIVE && ep[i] < epoch ->
     ep[i] = epoch; revk[i] = 0; canc[i] = 0;
     if :: mep[i] != 0 -> mep[i] = 0 :: else fi;     /* deposed */
     rcl[i] = 1
  OTHERWISE
  fi
}

inline step_elect() {
  if
  :: VALID(i) && ep[i] == epoch && epoch < MAXE && master_of[epoch] != i &&
     hbage[master_of[epoch]] >= D_T ->
     epoch++; master_of[epoch] = i; ep[i] = epoch; mep[i] = epoch;
     clear_master(i);
     rdone[i] = (1 << i); revk[i] = 0; canc[i] = 0; rcl[i] = 0;
     if :: held[i] -> holder[i] = i :: else fi;
     if :: want[i] -> enqueue(i, i) :: else fi
  OTHERWISE
  fi
}

inline step_reclaim() {
  if
  :: rcl[i] != 0 && VALID(i) && RING_FREE(i, CUR_MASTER(i)) ->
     if
     :: rcl[i] == 1 -> if :: held[i] -> send(i, CUR_MASTER(i), RCL, ep[i]) :: else fi; rcl[i] = 2
     :: rcl[i] == 2 -> send(i, CUR_MASTER(i), RDONE, ep[i]); rcl[i] = 3
     :: rcl[i] == 3 -> if :: want[i] -> send(i, CUR_MASTER(i), REQ, ep[i]) :: else fi; rcl[i] = 0
     fi
  OTHERWISE
  fi
}

inline step_request() {
  if
  :: !want[i] && !held[i] && rcl[i] == 0 && VALID(i) && ISMASTER(i) && reqs < MAXREQ ->
     want[i] = 1; enqueue(i, i); reqs++
  :: !want[i] && !held[i] && rcl[i] == 0 && VALID(i) && !ISMASTER(i) &&
     CUR_MASTER(i) != i && RING_FREE(i, CUR_MASTER(i)) && reqs < MAXREQ ->
     want[i] = 1; send(i, CUR_MASTER(i), REQ, ep[i]); reqs++
  OTHERWISE
  fi
}

inline step_cancel() {
  if
  :: want[i] && rcl[i] == 0 && VALID(i) && ISMASTER(i) -> want[i] = 0; unqueue(i, i)
  :: want[i] && rcl[i] == 0 && VALID(i) && !ISMASTER(i) && CUR_MASTER(i) != i &&
     RING_FREE(i, CUR_MASTER(i)) ->
     want[i] = 0; canc[i] = 1; send(i, CUR_MASTER(i), CAN, ep[i])
  OTHERWISE
  fi
}

inline step_write_data() {
  if
  :: held[i] && !revk[i] && !wrote[i] && VALID(i) && dp[i] == 0 -> dp[i] = 1; dstale[i] = 0; wrote[i] = 1
  OTHERWISE
  fi
}

/* release: only after the covered blocks are home (no data write in flight) */
#ifdef BUG_EARLY_RELEASE
#define BLOCKS_HOME(i) true
#else
#define BLOCKS_HOME(i) (dp[i] == 0)
#endif
inline do_release() {
  if
  :: ISMASTER(i) -> held[i] = 0; revk[i] = 0; wrote[i] = 0;
     if :: holder[i] == i -> holder[i] = NONE; revsent[i] = 0 :: else fi
  :: !ISMASTER(i) && CUR_MASTER(i) != i && RING_FREE(i, CUR_MASTER(i)) ->
     held[i] = 0; revk[i] = 0; wrote[i] = 0; send(i, CUR_MASTER(i), REL, ep[i])
  OTHERWISE
  fi
}
inline step_release(voluntary) {
  if
  :: held[i] && (revk[i] || voluntary) && BLOCKS_HOME(i) && rcl[i] == 0 && VALID(i) ->
     do_release()
  OTHERWISE
  fi
}

/* handle one message from ring[k*NN+i] */
inline handle(k) {
  if
  :: op == GRANT || op == REVOKE ->                  /* master k -> node i */
     if
     :: e == ep[i] && master_of[e] == k ->
        if
        :: op == GRANT && want[i] -> accept(i); canc[i] = 0
        :: op == GRANT && !want[i] && canc[i] ->
#ifdef BUG_DROP_GRANT
           canc[i] = 0                               /* gave up: ignore the grant */
#else
           accept(i); canc[i] = 0; revk[i] = 1       /* accept, release at once */
#endif
        :: op == GRANT && !want[i] && !canc[i] -> assert(false)  /* unexplained grant */
        :: op == REVOKE -> if :: held[i] -> revk[i] = 1 :: else fi
        fi
     :: else                                         /* other epoch: drop */
     fi
  :: else ->                                         /* node k -> master i */
     if
     :: ISMASTER(i) && e == mep[i] && !BIT(rcv[i], k) ->
        if
        :: op == REQ -> if :: holder[i] != k -> enqueue(i, k) :: else fi
        :: op == CAN -> unqueue(i, k)                /* holder: its grant crossed */
        :: op == REL -> if :: holder[i] == k -> holder[i] = NONE; revsent[i] = 0 :: else fi
        :: op == RCL ->   /* a valid master never gets two reclaims of the lock */
           assert(!VALID(i) || holder[i] == NONE || holder[i] == k); holder[i] = k
        :: op == RDONE -> rdone[i] = rdone[i] | (1 << k)
        fi
     :: else
     fi
  fi
}

#define RECV(k) \
  :: atomic { k != i && nempty(ring[(k) * NN + i]) && mode[i] == ACTIVE -> \
       ring[(k) * NN + i]?op, e; handle(k); op = 0; e = 0 }

inline step_grant() {
  if
  :: ISMASTER(i) && rdone[i] == ALL && holder[i] == NONE && mq[i * NN] != NONE &&
     VALID(i) && (mq[i * NN] == i || RING_FREE(i, mq[i * NN])) ->
     holder[i] = mq[i * NN]; revsent[i] = 0; unqueue(i, holder[i]);
     if
     :: holder[i] == i -> accept(i)
     :: else -> send(i, holder[i], GRANT, mep[i])
     fi
  :: ISMASTER(i) && rdone[i] == ALL && holder[i] != NONE && mq[i * NN] != NONE &&
     !revsent[i] && VALID(i) && (holder[i] == i || RING_FREE(i, holder[i])) ->
     revsent[i] = 1;
     if
     :: holder[i] == i -> if :: held[i] -> revk[i] = 1 :: else fi
     :: else -> send(i, holder[i], REVOKE, mep[i])
     fi
  OTHERWISE
  fi
}

#define CAND(t) (t != i && !BIT(rcv[i], t) && hbage[t] >= D_T)
#ifdef LIVE
#define SKIPOK(t) !CAND(t)     /* LIVE: the first dead slot is always taken */
#else
#define SKIPOK(t) true         /* SAFETY: any dead slot, or none yet */
#endif
inline step_declare() {           /* DeclareDead: start */
  if
  :: ISMASTER(i) && VALID(i) && dd[i] == NONE && vp[i] == 0 ->
     t = 0;
     do
     :: t < NN && CAND(t) -> break
     :: t < NN && SKIPOK(t) -> t++
     :: t == NN -> break
     od;
     if
     :: t < NN -> dd[i] = t; vp[i] = 1; vslot[i] = t
     :: else
     fi;
     t = 0
  OTHERWISE
  fi
}

inline step_confirm() {           /* DeclareDead: verdict landed, re-read victim */
  if
  :: dd[i] != NONE && vp[i] == 0 && VALID(i) ->
     if
     :: hbage[dd[i]] < D_T -> verd[dd[i]] = verd[dd[i]] & ~(1 << i)   /* withdraw */
     :: else ->                  /* confirmed: recovery, then free its lock */
        if
        :: ISMASTER(i) ->
           rcv[i] = rcv[i] | (1 << dd[i]); rdone[i] = rdone[i] | (1 << dd[i]);
           if :: holder[i] == dd[i] -> holder[i] = NONE; revsent[i] = 0 :: else fi;
           unqueue(i, dd[i])
        :: else
        fi
     fi;
     dd[i] = NONE
  OTHERWISE
  fi
}

inline step_crash() {
  if
  :: crashes < MAXCRASH && mode[i] != CRASHED -> mode[i] = CRASHED; crashes++
  OTHERWISE
  fi
}

proctype Node(byte i) {
  mtype op; byte e; byte t;
#ifndef LIVE
end:
  do
  :: mode[i] == CRASHED || mode[i] == FENCED -> break
  :: atomic { step_heartbeat() }
  :: atomic { step_handshake() }
  :: atomic { step_adopt() }
  :: atomic { step_elect() }
  :: atomic { step_reclaim() }
  :: atomic { step_request() }
  :: atomic { step_cancel() }
  :: atomic { step_write_data() }
  :: atomic { step_release(1) }
  :: atomic { step_grant() }
  :: atomic { step_declare() }
  :: atomic { step_confirm() }
  :: atomic { step_crash() }
  RECV(0)
  RECV(1)
#if NN > 2
  RECV(2)
#endif
  od
#else
  /* LIVE: a fixed round of steps, so weak (process) fairness means every step is
     taken infinitely often; optional actions stay nondeterministic. */
end:
  do
  :: mode[i] == CRASHED || mode[i] == FENCED -> break
  :: else ->
     atomic { step_heartbeat() };
     atomic { step_adopt() };
     atomic { step_elect() };
     atomic { step_reclaim() };
     if :: atomic { step_request() } :: skip fi;
#ifdef LIVE_CANCEL
     if :: i == NN - 1 -> atomic { step_cancel() } :: skip fi;
#endif
     if :: atomic { step_write_data() } :: skip fi;
     if :: i != NN - 1 -> atomic { step_release(1) } :: atomic { step_release(0) } fi;
     atomic { step_grant() };
     atomic { step_declare() };
     atomic { step_confirm() };
     if :: atomic { step_crash() } :: skip fi;
     do
     RECV(0)
     RECV(1)
#if NN > 2
     RECV(2)
#endif
     :: else -> break
     od
  od
#endif
}

/* the disk: in-flight writes land at any later step (within B_T ticks, see Tick) */
#define LAND(k) \
  :: atomic { hbp[k] > 0 -> lease[k] = L_T - (hbp[k] - 1); hbp[k] = 0; hbage[k] = 0 } \
  :: atomic { dp[k] > 0 -> assert(!dstale[k]); dp[k] = 0; dstale[k] = 0 } \
  :: atomic { rp[k] > 0 -> ring[rp_ch[k]]!rp_op[k], rp_ep[k]; rp[k] = 0; rp_op[k] = 0; rp_ep[k] = 0; rp_ch[k] = 0 } \
  :: atomic { vp[k] > 0 -> verd[vslot[k]] = verd[vslot[k]] | (1 << k); vp[k] = 0; vslot[k] = 0 }

active proctype Disk() {
end:
  do
  LAND(0)
  LAND(1)
#if NN > 2
  LAND(2)
#endif
  od
}

#define YOUNG(k) (hbp[k] <= B_T && dp[k] <= B_T && rp[k] <= B_T && vp[k] <= B_T)
#ifdef LIVE
#define BEATING(k) (mode[k] != ACTIVE || hbt[k])
#else
#define BEATING(k) true
#endif
#define AGE(x) if :: x > 0 -> x++ :: else fi

active proctype Tick() {
  byte k;
end:
  do
  :: atomic {
       YOUNG(0) && YOUNG(1) && (NN < 3 || YOUNG(NN - 1)) &&
       BEATING(0) && BEATING(1) && (NN < 3 || BEATING(NN - 1)) ->
       k = 0;
       do
       :: k < NN ->
          AGE(hbp[k]); AGE(dp[k]); AGE(rp[k]); AGE(vp[k]);
          if :: lease[k] > 0 -> lease[k]-- :: else fi;
          if :: mode[k] == ACTIVE && lease[k] == 0 -> mode[k] = LAPSED; hs[k] = 0 :: else fi;
          if :: hbage[k] < D_T -> hbage[k]++ :: else fi;
          hbt[k] = 0;
          k++
       :: k == NN -> k = 0; break
       od
     }
  od
}

#ifndef LIVE
/* mutual exclusion of beliefs: two valid holders at once is an error */
#define EXCL(a, b) !(held[a] && held[b] && VALID(a) && VALID(b))
active proctype Monitor() {
  atomic {
    !(EXCL(0, 1) && (NN < 3 || (EXCL(0, NN - 1) && EXCL(1, NN - 1)))) -> assert(false)
  }
}
#endif

init {
  byte k;
  atomic {
    master_of[1] = 0;
    k = 0;
    do
    :: k < NN ->
       lease[k] = L_T; ep[k] = 1; holder[k] = NONE; dd[k] = NONE; mep[k] = 0;
       mq[k * NN] = NONE; mq[k * NN + 1] = NONE;
#if NN > 2
       mq[k * NN + 2] = NONE;
#endif
       k++
    :: k == NN -> break
    od;
    mep[0] = 1; rdone[0] = ALL;
    k = 0;
    do
    :: k < NN -> run Node(k); k++
    :: k == NN -> break
    od
  }
}

#ifdef LIVE
/* progress: node NN-1, while it is live (not crashed), gets the lock it asks for unless
   it cancels the request itself (want drops to 0 only by a grant or its own cancel) */
ltl progress { [] (want[NN - 1] -> <> (held[NN - 1] || !want[NN - 1] || mode[NN - 1] == CRASHED)) }
#endif
