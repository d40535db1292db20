"""Crash consistency: kill -9 the daemon under a metadata-heavy workload, remount
(journal replay), check that everything the workload fsynced is intact, then fsck.

One image for all iterations, so damage would accumulate and every workload runs on
top of what the earlier ones (and their crashes) left. Each iteration runs WORKERS
workload processes (crash_workload.py), each in its own tree (w0, w1, ...) with its own
manifest outside the mount recording what it synced and, before and after each
operation, what it was about to change; crash_workload.verify() turns a manifest into
the promises the filesystem must keep, across all iterations so far.

Every third iteration recovers with `agorafs fsck --repair` (which must replay the
journal and find nothing else to fix but orphans) before mounting, instead of letting
the mount replay.

Environment: AGORAFS_CRASH_ITERS (default 30), AGORAFS_CRASH_WORKERS (default 2),
AGORAFS_CRASH_SEED (default random, printed), AGORAFS_KEEP_SCRATCH=1 keeps the image and
manifests of a failed run.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import unittest

import agfs
import crash_workload

HERE = os.path.dirname(os.path.abspath(__file__))
# What fsck --repair may legitimately find on a crashed image: the journal to replay and
# the crashed node's orphans (unlinked-while-open files, unfinished truncations).
CRASH_REPAIRS = {"journal-needs-replay", "orphan"}
WORKLOAD = os.path.join(HERE, "crash_workload.py")


def log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


class CrashTest(unittest.TestCase):
    def setUp(self):
        # Short cluster timings: every remount after a kill waits until the dead node
        # is declared dead (dead-after) and its journal replayed by the survivor.
        self.s = agfs.Scratch(size="512M", extra=("--heartbeat-ms", "250", "--io-timeout-ms",
                                                  "1000", "--dead-after-ms", "3000"))
        self.failed = True
        self.addCleanup(self.cleanup)

    def cleanup(self):
        if self.failed and os.environ.get("AGORAFS_KEEP_SCRATCH"):
            for mp in list(self.s.mounts):
                agfs.umount(mp)
            self.s.kill9()
            log(f"kept scratch directory {self.s.dir}")
            return
        self.s.cleanup()

    def mount(self):
        """Mounts like Scratch.mount, but returns how many journal transactions were
        replayed (the daemon logs it to stderr before it detaches)."""
        mp = os.path.join(self.s.dir, "mnt")
        os.makedirs(mp, exist_ok=True)
        r = agfs.run("mount", self.s.image, mp)
        self.assertTrue(agfs.is_mounted(mp), f"{mp} not mounted: {r.stderr}")
        self.s.mounts.append(mp)
        m = re.search(r"\((\d+) journal transactions replayed\)", r.stderr + r.stdout)
        return mp, int(m.group(1)) if m else -1

    def stop_workload(self, proc):
        """The daemon is dead: the workload must notice (ENOTCONN) and stop by itself."""
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        return proc.returncode

    @staticmethod
    def repair_manifest_tail(path):
        """Drops a torn last line (only possible if the workload had to be SIGKILLed)."""
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            with open(path, "wb") as f:
                f.write(data[:data.rfind(b"\n") + 1])

    def test_kill9_under_metadata_workload(self):
        iters = int(os.environ.get("AGORAFS_CRASH_ITERS", "30"))
        workers = int(os.environ.get("AGORAFS_CRASH_WORKERS", "2"))
        seed = int(os.environ.get("AGORAFS_CRASH_SEED", random.randrange(1, 1 << 31)))
        log(f"\ncrash test: seed {seed} (AGORAFS_CRASH_SEED), {iters} iterations x {workers} "
            f"workload processes, image {self.s.image}")
        rng = random.Random(seed)
        manifests = [os.path.join(self.s.dir, f"manifest{k}.jsonl") for k in range(workers)]
        t_start = time.time()
        total_ops = total_synced = total_replayed = 0
        for it in range(iters):
            t0 = time.time()
            ctx = f"iteration {it}, seed {seed} (AGORAFS_CRASH_SEED={seed})"
            mp, _ = self.mount()
            roots = [os.path.join(mp, f"w{k}") for k in range(workers)]
            if it == 0:
                for root in roots:
                    os.mkdir(root)
                fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(fd)
                os.close(fd)
            procs, outs = [], []
            for k in range(workers):
                out_path = os.path.join(self.s.dir, f"workload-{it}-{k}.out")
                outs.append(out_path)
                with open(out_path, "w") as out:
                    procs.append(subprocess.Popen(
                        [sys.executable, WORKLOAD, "run", "--root", roots[k],
                         "--manifest", manifests[k], "--seed", str((seed * 1000 + it) * 16 + k),
                         "--max-bytes", str((120 << 20) // workers)],
                        stdout=out, stderr=subprocess.STDOUT))
            # The delay counts from when every workload has scanned its tree and started.
            deadline = time.time() + 60
            while not all("ready:" in read(o) for o in outs):
                if any(p.poll() is not None for p in procs) or time.time() > deadline:
                    break
                time.sleep(0.02)
            delay = rng.uniform(0.2, 3.0)
            time.sleep(delay)
            early = [p.poll() for p in procs]
            self.s.kill9()
            rcs = [self.stop_workload(p) for p in procs]
            stats = []
            for k in range(workers):
                out = read(outs[k])
                self.assertEqual(early[k], None,
                                 f"{ctx}: workload {k} exited before the crash:\n{out}")
                self.assertEqual(rcs[k], 0, f"{ctx}: workload {k} failed ({rcs[k]}):\n{out}")
                self.assertIn("filesystem gone", out, f"{ctx}: workload {k}: {out}")
                self.repair_manifest_tail(manifests[k])
                last = out.strip().splitlines()[-1]
                m = re.search(r"ops (\d+), synced (\d+)", last)
                if m:
                    total_ops += int(m.group(1))
                    total_synced += int(m.group(2))
                    stats.append(f"{m.group(1)}/{m.group(2)}")
            t_kill = time.time()

            via_fsck = it % 3 == 2
            if via_fsck:
                r = agfs.run("fsck", "--repair", "--json", self.s.image, check=False, timeout=600)
                self.assertIn(r.returncode, (0, 1), f"{ctx}: fsck --repair after the crash "
                              f"exited {r.returncode}:\n{r.stdout}{r.stderr}")
                rep = json.loads(r.stdout)
                odd = [p for p in rep["problems"] if p["kind"] not in CRASH_REPAIRS]
                self.assertEqual(odd, [], f"{ctx}: fsck --repair after a crash found more than "
                                 f"a journal to replay and orphans:\n{r.stdout}")
                r = self.s.fsck()
                self.assertEqual(r.returncode, 0, f"{ctx}: fsck after fsck --repair exited "
                                 f"{r.returncode}:\n{r.stdout}{r.stderr}")
                fsck_replayed = rep.get("journal_transactions_replayed", 0)

            # Remount: replays the dead node's journal and frees its orphans.
            mp, replayed = self.mount()
            if via_fsck:
                replayed = fsck_replayed
            total_replayed += max(replayed, 0)
            t_mount = time.time()
            checked = 0
            for k in range(workers):
                root = os.path.join(mp, f"w{k}")
                if not os.path.exists(manifests[k]):
                    continue
                n, problems = crash_workload.verify(root, manifests[k])
                checked += n
                self.assertEqual(problems, [],
                                 f"{ctx}: after kill -9 at {delay:.2f}s and remount "
                                 f"({replayed} transactions replayed), workload {k}: "
                                 f"{len(problems)} of {n} promises broken:\n" +
                                 "\n".join(problems[:50]) +
                                 f"\nmanifest {manifests[k]}\nworkload output:\n" +
                                 read(outs[k])[-3000:])
            nfiles, ndirs, nbytes = crash_workload.walk_all(mp)
            self.s.unmount(mp)
            t_fsck = time.time()
            r = self.s.fsck()
            self.assertEqual(r.returncode, 0,
                             f"{ctx}: fsck after crash, replay and clean unmount exited "
                             f"{r.returncode}:\n{r.stdout}{r.stderr}")
            t_end = time.time()
            log(f"  iter {it:2d}: kill after {delay:.2f}s (ops/synced {' '.join(stats)}); "
                f"{'fsck --repair + ' if via_fsck else ''}remount {t_mount - t_kill:.1f}s, "
                f"{replayed} txns replayed; {checked} promises "
                f"ok; tree {nfiles} files {ndirs} dirs {nbytes >> 20} MiB; "
                f"fsck {t_end - t_fsck:.1f}s; iteration {t_end - t0:.1f}s")
        log(f"crash test: {iters} iterations, {total_ops} workload ops, {total_synced} fsynced "
            f"promises made, {total_replayed} journal transactions replayed, "
            f"{time.time() - t_start:.0f}s")
        self.assertGreater(total_synced, 0)
        self.failed = False


    def test_crashed_node_slot_stays_mounted(self):
        """A node killed with -9 leaves its slot marked mounted (its heartbeat stops), so
        that the next mount, or another node, knows its journal must be replayed."""
        mp, _ = self.mount()
        info = json.loads(agfs.run("info", "--json", self.s.image).stdout)
        slot = [x for x in info["slots"] if x["state"] == "mounted"]
        path = os.path.join(mp, "synced")
        fd = os.open(path, os.O_CREAT | os.O_WRONLY)
        os.write(fd, b"durable" * 1000)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        # A few heartbeats (500 ms in the fast profile) go by before the crash.
        time.sleep(info["heartbeat_interval_ms"] * 3 / 1000)
        states = {x["slot"]: x["state"] for x in
                  json.loads(agfs.run("info", "--json", self.s.image).stdout)["slots"]}
        self.s.kill9()
        after = {x["slot"]: x["state"] for x in
                 json.loads(agfs.run("info", "--json", self.s.image).stdout)["slots"]}
        self.assertEqual(len(slot), 1, f"right after mount, one slot should be mounted: {info}")
        n = slot[0]["slot"]
        self.assertEqual(states.get(n), "mounted",
                         f"slot {n} of the live node reads {states.get(n)!r} after a few "
                         f"heartbeats (the heartbeat rewrote the slot block?)")
        self.assertEqual(after.get(n), "mounted",
                         f"slot {n} of the node killed with -9 reads {after.get(n)!r}")
        mp, _ = self.mount()
        with open(os.path.join(mp, "synced"), "rb") as f:
            self.assertEqual(f.read(), b"durable" * 1000)
        self.s.unmount(mp)
        r = self.s.fsck()
        self.assertEqual(r.returncode, 0, f"{r.stdout}{r.stderr}")
        self.failed = False


if __name__ == "__main__":
    unittest.main()
