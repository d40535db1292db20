"""Cluster-wide application locks: flock() and POSIX fcntl byte-range locks taken
through one node's mount are honoured through every other node's mount.

Three real `agorafs mount` daemons on one image (each case runs twice: on the image
file, and each daemon through its own nbdkit server from its own network namespace
that holds nothing but loopback, so the nodes share no network at all). Locks are
taken by separate "agent" processes (one per node, plus extra ones where a case needs
them) that execute flock/fcntl commands read from a pipe, so a blocking call really
blocks a process. Checked: exclusive and shared flock across nodes, a blocking flock
that returns only after the holder on another node unlocks; byte ranges (a write lock
on [0,100) on A lets B lock [100,200) but not [50,60)); F_GETLK type/start/len (pid 0
for a holder on another node, the real pid on the same node); a signal interrupts a
blocking F_SETLKW with EINTR; an F_SETLKW that would close a cycle of waiting
processes on several nodes gets EDEADLK; more blocked waiters than the daemon has FUSE worker
threads do not stall the node; an OFD lock goes when its open file description closes
(not at another close of the same process); killing the holder process frees its locks; kill -9 of
the holder's node (the daemon) frees its locks once the node is recovered, and the
blocked waiters on the other nodes then get them. Timeouts are generous; nothing
asserts speed."""
import errno
import fcntl
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import unittest

import nbdnet
from test_multinode import MountRig

AGENT = r"""
import errno, fcntl, os, signal, struct, sys
def on_usr1(*a):
    raise InterruptedError(errno.EINTR, "interrupted")
signal.signal(signal.SIGUSR1, on_usr1)
FL = "hhqqi4x"  # struct flock on x86-64 / arm64: type, whence, start, len, pid
fd = None
print("ready", flush=True)
for line in sys.stdin:
    c = line.split()
    try:
        if c[0] == "open":
            fd = os.open(c[1], os.O_RDWR | os.O_CREAT, 0o644)
            out = "ok"
        elif c[0] == "close":
            os.close(fd)
            out = "ok"
        elif c[0] == "open2":  # a second open file description, closed with close2
            fd2 = os.open(c[1], os.O_RDWR)
            out = "ok"
        elif c[0] == "close2":
            os.close(fd2)
            out = "ok"
        elif c[0] == "flock":
            op = {"ex": fcntl.LOCK_EX, "sh": fcntl.LOCK_SH, "un": fcntl.LOCK_UN}[c[1]]
            if len(c) > 2 and c[2] == "nb":
                op |= fcntl.LOCK_NB
            fcntl.flock(fd, op)
            out = "ok"
        elif c[0] in ("setlk", "setlkw", "getlk", "ofdsetlk", "ofdsetlkw"):
            t = {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}[c[1]]
            cmd = {"setlk": fcntl.F_SETLK, "setlkw": fcntl.F_SETLKW, "getlk": fcntl.F_GETLK,
                   "ofdsetlk": fcntl.F_OFD_SETLK, "ofdsetlkw": fcntl.F_OFD_SETLKW}[c[0]]
            res = fcntl.fcntl(fd, cmd, struct.pack(FL, t, os.SEEK_SET, int(c[2]), int(c[3]), 0))
            if c[0] == "getlk":
                t, _, start, length, pid = struct.unpack(FL, res)
                names = {fcntl.F_RDLCK: "r", fcntl.F_WRLCK: "w", fcntl.F_UNLCK: "u"}
                out = f"{names[t]} {start} {length} {pid}" if t != fcntl.F_UNLCK else "u"
            else:
                out = "ok"
        elif c[0] == "pid":
            out = str(os.getpid())
        else:
            out = "bad command"
    except OSError as e:
        out = f"err {errno.errorcode.get(e.errno, e.errno)}"
    print(out, flush=True)
"""

LONG = 120  # seconds: a reply that should come


class Agent:
    """A process taking locks through one node's mount, one command at a time."""

    def __init__(self, path):
        self.p = subprocess.Popen([sys.executable, "-c", AGENT], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)
        self.q = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.reply() == "ready"
        assert self.do(f"open {path}") == "ok"

    def _read(self):
        for line in self.p.stdout:
            self.q.put(line.strip())
        self.q.put(None)

    def send(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def reply(self, timeout=LONG):
        return self.q.get(timeout=timeout)

    def no_reply_for(self, seconds):
        """True if no reply arrives within `seconds` (the call still blocks)."""
        try:
            r = self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        self.q.put(r)
        return False

    def do(self, cmd, timeout=LONG):
        self.send(cmd)
        return self.reply(timeout)

    @property
    def pid(self):
        return self.p.pid

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.reader.join(10)
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass


def eventually(fn, want, timeout=LONG):
    """Calls fn until it returns `want`; returns the last answer."""
    deadline = time.time() + timeout
    got = fn()
    while got != want and time.time() < deadline:
        time.sleep(0.2)
        got = fn()
    return got


class AppLockCases:
    via_nbd = False

    def rig(self, count=3):
        if self.via_nbd:
            if not nbdnet.have_nbdkit():
                self.skipTest("nbdkit not installed")
            ok, why = nbdnet.netns_available()
            if not ok:
                self.skipTest(f"network namespaces unavailable: {why}")
        r = MountRig(count, self.via_nbd)
        self.addCleanup(r.close)
        self.mps = [r.mount(i) for i in range(count)]
        with open(os.path.join(self.mps[0], "lockfile"), "wb") as f:
            f.write(b"x" * 4096)
        return r

    def agent(self, node):
        a = Agent(os.path.join(self.mps[node], "lockfile"))
        self.addCleanup(a.kill)
        return a

    def assert_fsck_clean(self, r):
        p = r.scratch.fsck()
        self.assertEqual(p.returncode, 0, f"fsck not clean:\n{p.stdout}{p.stderr}")

    def test_flock_is_honoured_on_every_node(self):
        r = self.rig()
        a, b, c = self.agent(0), self.agent(1), self.agent(2)
        self.assertEqual(a.do("flock ex"), "ok")
        for x in (b, c):
            self.assertEqual(x.do("flock ex nb"), "err EAGAIN")
            self.assertEqual(x.do("flock sh nb"), "err EAGAIN")
        # A blocking flock on B returns once A unlocks, and not before.
        b.send("flock ex")
        self.assertTrue(b.no_reply_for(3), "B got the lock while A held it")
        self.assertEqual(a.do("flock un"), "ok")
        self.assertEqual(b.reply(), "ok")
        self.assertEqual(a.do("flock sh nb"), "err EAGAIN")
        self.assertEqual(c.do("flock ex nb"), "err EAGAIN")
        # Shared locks coexist; an exclusive one waits for all of them.
        self.assertEqual(b.do("flock sh"), "ok")  # converts in place
        self.assertEqual(a.do("flock sh nb"), "ok")
        self.assertEqual(c.do("flock sh nb"), "ok")
        self.assertEqual(c.do("flock ex nb"), "err EAGAIN")  # A and B hold shared
        self.assertEqual(a.do("flock un"), "ok")
        self.assertEqual(b.do("flock un"), "ok")
        self.assertEqual(c.do("flock ex nb"), "ok")
        # flock and POSIX locks are independent (as on Linux).
        self.assertEqual(a.do("setlk w 0 0"), "ok")
        for x in (a, b, c):
            x.kill()
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_fcntl_byte_ranges_getlk_and_interrupted_waits(self):
        r = self.rig()
        a, b, c = self.agent(0), self.agent(1), self.agent(2)
        self.assertEqual(a.do("setlk w 0 100"), "ok")
        self.assertEqual(b.do("setlk w 100 100"), "ok")
        self.assertEqual(b.do("setlk w 50 10"), "err EAGAIN")
        self.assertEqual(c.do("setlk r 99 1"), "err EAGAIN")
        # F_GETLK: type, start and length of the holder; pid 0 for another node's.
        self.assertEqual(b.do("getlk w 50 10"), "w 0 100 0")
        self.assertEqual(c.do("getlk r 150 1"), "w 100 100 0")
        self.assertEqual(c.do("getlk w 300 10"), "u")
        self.assertEqual(a.do("getlk w 0 1000"), "w 100 100 0")  # its own lock is no conflict
        a2 = self.agent(0)  # another process on A's node: the holder's real pid
        self.assertEqual(a2.do("getlk r 10 1"), f"w 0 100 {a.pid}")
        # Same-owner changes: split by an unlock in the middle, downgrade.
        self.assertEqual(a.do("setlk u 40 20"), "ok")
        self.assertEqual(c.do("setlk w 45 10"), "ok")
        self.assertEqual(c.do("getlk w 0 50"), "w 0 40 0")
        self.assertEqual(a.do("setlk r 0 40"), "ok")
        self.assertEqual(c.do("setlk r 0 10"), "ok")
        # A blocking F_SETLKW waits, and a signal ends the wait with EINTR.
        c.send("setlkw w 150 10")
        self.assertTrue(c.no_reply_for(2), "C got a lock B holds")
        os.kill(c.pid, signal.SIGUSR1)
        self.assertEqual(c.reply(), "err EINTR")
        # ... and the interrupted wait is gone: B unlocking does not hand it to C.
        self.assertEqual(b.do("setlk u 100 100"), "ok")
        self.assertEqual(a2.do("getlk w 150 10"), "u")
        # A blocking wait is granted when the holder on another node unlocks.
        self.assertEqual(b.do("setlk w 100 100"), "ok")
        c.send("setlkw w 150 10")
        self.assertTrue(c.no_reply_for(2), "C got a lock B holds")
        self.assertEqual(b.do("setlk u 0 0"), "ok")
        self.assertEqual(c.reply(), "ok")
        self.assertEqual(b.do("getlk r 155 1"), "w 150 10 0")
        for x in (a, a2, b, c):
            x.kill()
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_fcntl_wait_that_would_deadlock_is_edeadlk_on_any_nodes(self):
        r = self.rig()
        a, b, c = self.agent(0), self.agent(1), self.agent(2)
        a2 = self.agent(0)
        self.assertEqual(a.do("setlk w 0 10"), "ok")
        self.assertEqual(b.do("setlk w 100 10"), "ok")
        # A waits for B's range; B then waiting for A's would close the cycle.
        a.send("setlkw w 100 1")
        self.assertTrue(a.no_reply_for(2), "A got a lock B holds")
        deadlock = f"err {errno.errorcode[errno.EDEADLK]}"  # Python names it EDEADLOCK
        self.assertEqual(b.do("setlkw w 5 1"), deadlock)
        # Through a third node and a second process on A's node: A waits for B, B
        # for C, C for A2; A2 waiting for A closes A2 -> A -> B -> C -> A2.
        self.assertEqual(c.do("setlk w 200 10"), "ok")
        self.assertEqual(a2.do("setlk w 300 10"), "ok")
        b.send("setlkw w 200 1")
        self.assertTrue(b.no_reply_for(1), "B got a lock C holds")
        c.send("setlkw w 300 1")
        self.assertTrue(c.no_reply_for(1), "C got a lock A2 holds")
        self.assertEqual(a2.do("setlkw w 0 1"), deadlock)
        # A signal ends C's wait, and its record with it: now A2 just waits.
        os.kill(c.pid, signal.SIGUSR1)
        self.assertEqual(c.reply(), "err EINTR")
        a2.send("setlkw w 0 1")
        self.assertTrue(a2.no_reply_for(2), "A2 got a lock A holds")
        # Unlocking hands every wait on: C lets go of 200 (B gets it), B of 100 (A gets
        # it), A of 0..9 (A2 gets it).
        self.assertEqual(c.do("setlk u 200 10"), "ok")
        self.assertEqual(b.reply(), "ok")
        self.assertEqual(b.do("setlk u 100 10"), "ok")
        self.assertEqual(a.reply(), "ok")
        self.assertEqual(a.do("setlk u 0 10"), "ok")
        self.assertEqual(a2.reply(), "ok")
        for x in (a, a2, b, c):
            x.kill()
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_more_blocked_waiters_than_fuse_workers_do_not_stall_the_node(self):
        r = self.rig()
        a = self.agent(0)
        self.assertEqual(a.do("flock ex"), "ok")
        waiters = [self.agent(1) for _ in range(12)]  # the daemon has 8 FUSE workers
        for w in waiters:
            w.send("flock ex")
        self.assertTrue(waiters[-1].no_reply_for(2))
        # Node 1 still serves everything else meanwhile.
        p = os.path.join(self.mps[1], "other")
        with open(p, "wb") as f:
            f.write(b"served")
        with open(p, "rb") as f:
            self.assertEqual(f.read(), b"served")
        self.assertEqual(sorted(os.listdir(self.mps[1])), ["lockfile", "other"])
        # Each waiter gets the lock in turn once the one before lets go.
        self.assertEqual(a.do("flock un"), "ok")
        left = list(waiters)
        deadline = time.time() + LONG
        while left and time.time() < deadline:
            for w in list(left):
                if not w.no_reply_for(0.05):
                    self.assertEqual(w.reply(), "ok")
                    for other in left:
                        if other is not w:
                            self.assertTrue(other.q.empty(), "two exclusive holders")
                    self.assertEqual(w.do("flock un"), "ok")
                    left.remove(w)
        self.assertEqual(left, [])
        for x in [a, *waiters]:
            x.kill()
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_killing_the_holder_process_frees_its_locks(self):
        r = self.rig()
        a, b, c = self.agent(0), self.agent(1), self.agent(2)
        self.assertEqual(a.do("setlk w 0 0"), "ok")
        self.assertEqual(a.do("flock ex"), "ok")
        b.send("setlkw w 10 10")
        c.send("flock ex")
        self.assertTrue(b.no_reply_for(2))
        self.assertTrue(c.no_reply_for(0.1))
        a.kill()  # its close (flush) and last release drop both locks
        self.assertEqual(b.reply(), "ok")
        self.assertEqual(c.reply(), "ok")
        for x in (b, c):
            x.kill()
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_ofd_locks_go_with_their_open_file_not_with_the_process(self):
        r = self.rig(count=2)
        a, b = self.agent(0), self.agent(1)
        path = os.path.join(self.mps[0], "lockfile")
        self.assertEqual(a.do("ofdsetlk w 0 10"), "ok")
        self.assertEqual(a.do("setlk w 20 10"), "ok")  # a process (classic POSIX) lock
        self.assertEqual(b.do("setlk w 0 10"), "err EAGAIN")
        # Closing another descriptor of the same process drops its process locks
        # (POSIX), but not the lock of the still open description.
        self.assertEqual(a.do(f"open2 {path}"), "ok")
        self.assertEqual(a.do("close2"), "ok")
        b.send("setlkw w 20 10")
        self.assertEqual(b.reply(), "ok")
        self.assertEqual(b.do("setlk w 0 10"), "err EAGAIN")
        self.assertTrue(b.no_reply_for(0.1))
        # Closing the description frees its OFD lock on every node.
        b.send("setlkw w 0 10")
        self.assertTrue(b.no_reply_for(2), "B got the range while A's description was open")
        self.assertEqual(a.do("close"), "ok")
        self.assertEqual(b.reply(), "ok")
        for x in (a, b):
            x.kill()
        for i in range(2):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_kill9_of_the_holder_node_frees_its_locks_once_recovered(self):
        r = self.rig()
        a, b, c = self.agent(0), self.agent(1), self.agent(2)
        self.assertEqual(a.do("setlk w 0 100"), "ok")
        self.assertEqual(a.do("flock ex"), "ok")
        b.send("setlkw w 50 10")
        c.send("flock sh")
        self.assertTrue(b.no_reply_for(2))
        self.assertTrue(c.no_reply_for(0.1))
        r.kill9(0)  # the daemon: the holder process keeps its (dead) descriptor
        # The survivors declare node 0 dead, replay its journal, and only then ignore
        # its locks: the blocked waiters get theirs.
        self.assertEqual(b.reply(timeout=240), "ok")
        self.assertEqual(c.reply(timeout=240), "ok")
        a.kill()
        # Node 0 comes back as a new generation and sees the survivors' locks.
        r.mount(0)
        a = self.agent(0)
        self.assertEqual(a.do("setlk w 55 1"), "err EAGAIN")
        self.assertEqual(a.do("getlk w 0 0"), "w 50 10 0")
        self.assertEqual(a.do("flock ex nb"), "err EAGAIN")
        self.assertEqual(a.do("flock sh nb"), "ok")
        for x in (a, b, c):
            x.kill()
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)


class FileAppLockTest(AppLockCases, unittest.TestCase):
    via_nbd = False


class NbdAppLockTest(AppLockCases, unittest.TestCase):
    via_nbd = True


if __name__ == "__main__":
    unittest.main()
