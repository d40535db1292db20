/*
 * paxos.pml -- Disk Paxos election of the lock master (src/cluster/paxos.h), checked
 * by model/check.sh with Spin.
 *
 * WHAT IS MODELLED
 *  - N nodes (3); each owns one Paxos block {instance, mbal, bal, inp, decided epoch,
 *    decided value} on the shared disk and is the only writer of it. Values are the
 *    proposer's own slot (+1; 0 = none), as in Propose(e, self).
 *  - Propose(e, v) exactly as the contract states: mbal = round*N + slot + 1 above
 *    every mbal seen; phase 1 = write own block (instance e, mbal), then read every
 *    block ONE AT A TIME (other nodes interleave between the reads); abort and retry
 *    with a higher ballot if some block of instance e has a higher mbal; kStale if
 *    some block has a higher instance (the caller then reads the decision). Value =
 *    inp of the highest bal seen for instance e, else v. Phase 2 = write own block
 *    (bal = mbal, inp), read every block with the same abort rule; then the value is
 *    chosen; the decision is written into the own block; a node may then go on to
 *    the next epoch (MAXE epochs).
 *  - A block of an older instance reads as the initial state for instance e.
 *  - Late-landing writes: a write is issued into a pending slot and lands at a later
 *    nondeterministic step; the writer waits for completion before its next step
 *    ("each write completed before the next step"), others run meanwhile.
 *  - Crashes at any step (at most MAXCRASH); a crashed node's in-flight write may land
 *    after it crashed. With -DRESTART a crashed node comes back (after its in-flight
 *    write landed, which the lease margin guarantees) as a new generation that
 *    rebuilds its own block state from its on-disk block (see FINDING below).
 *  - Ballots are bounded (MAXR rounds per node per epoch); a node that runs out of
 *    rounds gives up (this bounds the state space; agreement must hold regardless).
 *
 * PROPERTY: at most one value is chosen per epoch -- every Propose that completes and
 * every ReadDecided returns the same master for that epoch (assertions on chosen[]).
 *
 * ABSTRACTED: the two-copy torn-write rule (a torn write reads as the previous value,
 * i.e. as a write that has not landed yet -- covered by late landing); generations and
 * checksums; timing (Disk Paxos is safe under any asynchrony, so no clock is needed).
 *
 * FINDING (see -DRESTART_FRESH -DCHOSEN; check.sh: paxos_restart_fresh_own): the
 * contract lets Propose start from an in-memory copy of the own block (`own_`). If a
 * node that crashed after its phase 2 (before writing the decision) comes back and
 * proposes for the same epoch with a fresh `own_` (mbal from round 0, bal = 0, no
 * inp), its first write erases the value it had accepted and lowers its mbal; a slow
 * proposer whose phase-1 read comes after that erasure then chooses its own value:
 * two different values complete phase 2 in one epoch (Spin trail, 2 nodes, depth
 * 292). Whether two Propose *returns* can then differ was not shown within the
 * explored bound (the erased node never returned), but the Disk Paxos invariant the
 * proof rests on is broken. Fix (modelled by -DRESTART and by the first start):
 * Propose loads `own_` from its own on-disk block before its first write of an
 * instance, keeping mbal/bal/inp when the block is of the same instance, and picks
 * its ballot above that mbal (Gafni & Lamport's recovery rule). Checked: N=2, two
 * epochs (check.sh paxos_epochs_restart); N=3, one epoch, one crash + restart:
 * 93,437,249 states, 0 errors, 136 s, 4.2 GB (too big for check.sh; run with
 * `spin -DMAXE=1 -DRESTART -a paxos.pml; gcc -DSAFETY -DCOLLAPSE; ./pan -w26`).
 *
 * CHECKED IN check.sh: paxos_agreement = N=3, one epoch, MAXR=2, one crash whose
 * in-flight write may land after the crash.
 */

#ifndef N
#define N 3
#endif
#ifndef MAXR
#define MAXR 2
#endif
#ifndef MAXE
#define MAXE 2
#endif
#ifndef MAXCRASH
#define MAXCRASH 1
#endif

typedef Block { byte inst; byte mbal; byte bal; byte inp; byte dece; byte decv };

Block disk[N];       /* the shared disk: one Paxos block per slot */
Block pend[N];       /* write in flight */
bit pending[N];
byte chosen[MAXE + 1];
byte crashes;

/* issue a write of the own block and wait until it has landed */
inline write_own() {
  if
  :: atomic { crashes < MAXCRASH -> crashes++ }; goto crash   /* crash before the write */
  :: atomic { pend[p].inst = own.inst; pend[p].mbal = own.mbal; pend[p].bal = own.bal;
              pend[p].inp = own.inp; pend[p].dece = own.dece; pend[p].decv = own.decv; pending[p] = 1 }
  fi;
  if
  :: atomic { crashes < MAXCRASH -> crashes++ }; goto crash   /* crash, write in flight */
  :: (pending[p] == 0)
  fi
}

inline read_block(q) {
  atomic { b.inst = disk[q].inst; b.mbal = disk[q].mbal; b.bal = disk[q].bal;
           b.inp = disk[q].inp; b.dece = disk[q].dece; b.decv = disk[q].decv }
}

/* one read-all pass; sets res: 0 ok, 1 abort (higher mbal), 2 stale (higher instance) */
inline read_all() {
  q = 0; res = 0;
  do
  :: q < N ->
     read_block(q);
     atomic {
       if
       :: b.inst > e -> res = 2
       :: b.inst == e && b.mbal > own.mbal -> res = 1; if :: b.mbal > maxseen -> maxseen = b.mbal :: else fi
       :: b.inst == e && b.mbal <= own.mbal && b.bal > maxbal -> maxbal = b.bal; val = b.inp
       :: else
       fi;
       if :: b.dece > 0 -> assert(chosen[b.dece] == 0 || chosen[b.dece] == b.decv) :: else fi;
       b.inst = 0; b.mbal = 0; b.bal = 0; b.inp = 0; b.dece = 0; b.decv = 0;
       q++
     };
     if :: res != 0 -> break :: else fi
  :: q == N -> break
  od;
  q = 0
}

/* ReadDecided: highest decision recorded in any block, and highest instance started */
inline read_decided() {
  q = 0; hide = 0; hidv = 0; hinst = 0;
  do
  :: q < N ->
     read_block(q);
     atomic {
       if :: b.dece > hide -> hide = b.dece; hidv = b.decv :: else fi;
       if :: b.inst > hinst -> hinst = b.inst :: else fi;
       b.inst = 0; b.mbal = 0; b.bal = 0; b.inp = 0; b.dece = 0; b.decv = 0;
       q++
     }
  :: q == N -> break
  od;
  q = 0;
  if :: hide > 0 -> assert(chosen[hide] == 0 || chosen[hide] == hidv) :: else fi
}

proctype Proposer(byte p) {
  Block own; Block b;
  byte e, r, q, res, maxbal, val, maxseen, hide, hidv, hinst;

restart:
  /* learn where the cluster is; propose for the first undecided epoch */
  read_decided();
  atomic { e = hide + 1; hide = 0; hidv = 0; hinst = 0 };
  if :: e > MAXE -> goto done :: else fi;
#ifndef RESTART_FRESH
  /* load own_ from the on-disk block (the fix; trivially initial on first start) */
  atomic { own.inst = disk[p].inst; own.mbal = disk[p].mbal; own.bal = disk[p].bal;
           own.inp = disk[p].inp; own.dece = disk[p].dece; own.decv = disk[p].decv;
           if :: own.mbal > maxseen -> maxseen = own.mbal :: else fi }
#endif
  r = 0;
ballot:
  /* fresh ballot above every mbal seen */
  do
  :: r < MAXR && r * N + p + 1 <= maxseen -> r++
  :: r < MAXR && r * N + p + 1 > maxseen -> break
  :: r == MAXR -> goto done                 /* give up (bounds the model) */
  od;
  atomic {
    if :: own.inst != e -> own.inst = e; own.bal = 0; own.inp = 0 :: else fi;
    own.mbal = r * N + p + 1; r++; maxbal = 0; val = 0
  };
  /* phase 1 */
  write_own();
  read_all();
  if :: res == 1 -> goto ballot :: res == 2 -> goto stale :: else fi;
  res = 0;
  /* phase 2 */
  atomic {
    own.bal = own.mbal;
    if :: maxbal > 0 -> own.inp = val :: else -> own.inp = p + 1 fi;
    maxbal = 0; val = 0
  };
  write_own();
  read_all();
  if :: res == 1 -> goto ballot :: res == 2 -> goto stale :: else fi;
  res = 0;
  /* phase 2 complete: own.inp is chosen. The contract's promise is about what Propose
     returns, i.e. after the decision is written; -DCHOSEN checks the stronger Paxos
     invariant (two completed phase 2s never disagree) right here. */
#ifdef CHOSEN
  atomic { assert(chosen[e] == 0 || chosen[e] == own.inp); chosen[e] = own.inp };
#endif
  own.dece = e; own.decv = own.inp;
  write_own();
#ifndef CHOSEN
  atomic { assert(chosen[e] == 0 || chosen[e] == own.inp); chosen[e] = own.inp };  /* returns */
#endif
  /* the master of e may die: go on to the next epoch (nondeterministically) */
  if
  :: e < MAXE -> e++; r = 0; maxseen = 0; goto ballot
  :: true -> goto done
  fi;
stale:
  read_decided();
  if
  :: hide + 1 <= MAXE -> atomic { e = hide + 1; r = 0; res = 0; hide = 0; hidv = 0; hinst = 0 }; goto ballot
  :: else -> goto done
  fi;
crash:
#if defined(RESTART) || defined(RESTART_FRESH)
  /* back as a new generation, once its in-flight write has landed */
  (pending[p] == 0);
  atomic {
    own.inst = 0; own.mbal = 0; own.bal = 0; own.inp = 0; own.dece = 0; own.decv = 0;
    e = 0; r = 0; res = 0; maxbal = 0; val = 0; maxseen = 0
  };
  goto restart;
#endif
done:
  atomic { own.inst = 0; own.mbal = 0; own.bal = 0; own.inp = 0; own.dece = 0; own.decv = 0;
           e = 0; r = 0; res = 0; maxbal = 0; val = 0; maxseen = 0 }
}

/* the disk lands in-flight writes; crashes; restarts */
active proctype Disk() {
  byte k;
end:
  do
  :: atomic {
       select(k : 0 .. N - 1);
       if
       :: pending[k] ->
          disk[k].inst = pend[k].inst; disk[k].mbal = pend[k].mbal; disk[k].bal = pend[k].bal;
          disk[k].inp = pend[k].inp; disk[k].dece = pend[k].dece; disk[k].decv = pend[k].decv;
          pending[k] = 0;
          pend[k].inst = 0; pend[k].mbal = 0; pend[k].bal = 0; pend[k].inp = 0;
          pend[k].dece = 0; pend[k].decv = 0
       :: else
       fi;
       k = 0
     }
  od
}

init {
  byte k;
  atomic {
    k = 0;
    do
    :: k < N -> run Proposer(k); k++
    :: k == N -> k = 0; break
    od
  }
}
