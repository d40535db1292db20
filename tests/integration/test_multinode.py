"""Multi-node mounts: several real `agorafs mount` daemons on one image, each with its
own mount point. Every case runs twice: the daemons open the image file directly, and
each daemon reaches the disk through its own nbdkit server from its own network
namespace that holds nothing but loopback (no network between nodes at all).

What is checked: every operation's effect is visible on the other nodes as soon as
the call returns; a coherence checker (no read older than a write that completed
before it began); three nodes racing on one set of names; shared memory maps with
msync on two nodes; trees built on one node and deleted from another; O_APPEND records
from three nodes all land whole; a node killed
with SIGKILL during a metadata-heavy workload (ten rounds) loses nothing it fsync'ed
and the others go on; one node mounting and unmounting over and over does not
disturb two others at work; fsck is clean afterwards."""
import errno
import hashlib
import mmap
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import unittest

import agfs
import nbdnet

CRASH_ROUNDS = int(os.environ.get("AGORAFS_MULTINODE_CRASH_ROUNDS", "10"))


class MountRig:
    """One image, `count` node seats; seat i mounts at <scratch>/mnt<i>."""

    def __init__(self, count, via_nbd, size="256M", slots=8):
        self.scratch = agfs.Scratch(size=size, nodes=slots, profile="fast")
        self.via_nbd = via_nbd
        self.count = count
        self.servers, self.namespaces = [], []
        self.mps = [os.path.join(self.scratch.dir, f"mnt{i}") for i in range(count)]
        for mp in self.mps:
            os.makedirs(mp, exist_ok=True)
        try:
            if via_nbd:
                for i in range(count):
                    d = self.scratch.dir
                    self.servers.append(nbdnet.NbdServer(self.scratch.image,
                                                         os.path.join(d, f"nbd{i}.sock")))
                    self.namespaces.append(nbdnet.NetNamespace(f"agfsm{os.getpid()}n{i}"))
        except BaseException:
            self.close()
            raise

    def device(self, i):
        return self.servers[i].uri if self.via_nbd else self.scratch.image

    def mount(self, i, opts=""):
        argv = [agfs.BIN, "mount", *(["-o", opts] if opts else []), self.device(i), self.mps[i]]
        if self.via_nbd:
            argv = self.namespaces[i].cmd(argv)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if p.returncode != 0 or not agfs.is_mounted(self.mps[i]):
            raise AssertionError(f"mount of node {i} failed: {p.stderr}{p.stdout}")
        if self.via_nbd:
            pid = self.pid(i)
            assert nbdnet.netns_of_pid(pid) == self.namespaces[i].ident(), \
                "the daemon is not in its node's namespace"
        return self.mps[i]

    def pid(self, i):
        pids = agfs.daemon_pids(self.mps[i])
        return pids[0] if pids else None

    def wait_gone(self, pid, timeout=30):
        deadline = time.time() + timeout
        while pid and os.path.exists(f"/proc/{pid}") and time.time() < deadline:
            time.sleep(0.05)
        return not (pid and os.path.exists(f"/proc/{pid}"))

    def unmount(self, i):
        pid = self.pid(i)
        agfs.umount(self.mps[i])
        if not self.wait_gone(pid):
            raise AssertionError(f"daemon of node {i} did not exit after umount")

    def kill9(self, i):
        pid = self.pid(i)
        os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", self.mps[i]], capture_output=True)
        self.wait_gone(pid, 10)

    def close(self):
        for i in range(self.count):
            if agfs.is_mounted(self.mps[i]):
                agfs.umount(self.mps[i])
            pid = self.pid(i)
            if pid and not self.wait_gone(pid, 15):
                os.kill(pid, signal.SIGKILL)
        for s in self.servers:
            s.stop()
        for ns in self.namespaces:
            ns.delete()
        self.scratch.cleanup()


def run_for(threads, seconds, stop):
    """Starts `threads`, lets them run for `seconds`, sets `stop` and joins them."""
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()


def read(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


def write(path, data, flags="wb"):
    with open(path, flags) as f:
        f.write(data)


# A workload for one node: creates, renames, writes, unlinks in its own directory and
# records every file whose fsync (and its directory's fsync) returned, with a digest of
# its content, in a log outside the filesystem. Runs until killed or the mount goes.
WORKLOAD = r"""
import hashlib, os, sys
mnt, sub, log, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
root = os.path.join(mnt, sub)
os.makedirs(root, exist_ok=True)
out = open(log, "a", buffering=1)
i = 0
try:
    while True:
        name = os.path.join(root, f"f{seed}-{i}")
        data = os.urandom(100 + (i * 7919) % 20000)
        with open(name + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(name + ".tmp", name)
        d = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(d)
        os.close(d)
        out.write(f"{os.path.relpath(name, mnt)} {hashlib.sha256(data).hexdigest()}\n")
        if i % 3 == 0:
            os.mkdir(name + ".d")
            open(os.path.join(name + ".d", "x"), "w").write("x")
        if i % 5 == 4:
            os.unlink(os.path.join(root, f"f{seed}-{i - 4}.d", "x"))
            os.rmdir(os.path.join(root, f"f{seed}-{i - 4}.d")) if (i - 4) % 3 == 0 else None
        i += 1
except OSError:
    pass
"""


class MultiNodeCases:
    via_nbd = False

    def rig(self, count=3, slots=8):
        if self.via_nbd:
            if not nbdnet.have_nbdkit():
                self.skipTest("nbdkit not installed")
            ok, why = nbdnet.netns_available()
            if not ok:
                self.skipTest(f"network namespaces unavailable: {why}")
        r = MountRig(count, self.via_nbd, slots=slots)
        self.addCleanup(r.close)
        return r

    def assert_fsck_clean(self, r):
        p = r.scratch.fsck()
        self.assertEqual(p.returncode, 0, f"fsck not clean:\n{p.stdout}{p.stderr}")

    def test_every_operation_is_visible_at_once_on_three_nodes(self):
        r = self.rig()
        mps = [r.mount(i) for i in range(3)]

        def on(i, *parts):
            return os.path.join(mps[i], *parts)

        def everywhere_but(i):
            return [k for k in range(3) if k != i]

        # create + write, on each node in turn; the others read at once.
        for i in range(3):
            data = os.urandom(5000 + i * 100000)
            write(on(i, f"file{i}"), data)
            for k in everywhere_but(i):
                self.assertEqual(read(on(k, f"file{i}")), data, f"node {k} reading node {i}'s file")
        # overwrite in place and extend
        with open(on(0, "file1"), "r+b") as f:
            f.seek(10)
            f.write(b"OVERWRITE")
        for k in (1, 2):
            self.assertEqual(read(on(k, "file1"))[10:19], b"OVERWRITE")
        # truncate (shrink and grow)
        os.truncate(on(1, "file2"), 1234)
        for k in (0, 2):
            self.assertEqual(os.stat(on(k, "file2")).st_size, 1234)
        os.truncate(on(2, "file2"), 300000)
        self.assertEqual(read(on(0, "file2"))[1234:], b"\0" * (300000 - 1234))
        # mkdir, rename, link, symlink
        os.mkdir(on(0, "dir"))
        for k in (1, 2):
            self.assertTrue(stat.S_ISDIR(os.stat(on(k, "dir")).st_mode))
        os.rename(on(1, "file0"), on(1, "dir", "moved"))
        for k in (0, 2):
            self.assertFalse(os.path.exists(on(k, "file0")))
            self.assertTrue(os.path.exists(on(k, "dir", "moved")))
        os.link(on(2, "dir", "moved"), on(2, "hard"))
        for k in (0, 1):
            self.assertEqual(os.stat(on(k, "hard")).st_nlink, 2)
            self.assertEqual(os.stat(on(k, "hard")).st_ino, os.stat(on(k, "dir", "moved")).st_ino)
        os.symlink("dir/moved", on(0, "sym"))
        for k in (1, 2):
            self.assertEqual(os.readlink(on(k, "sym")), "dir/moved")
        # chmod, chown, utimens. A path walk refreshes attributes through its lookup; a
        # descriptor opened before (and fstat'ed, so the kernel caches its attributes)
        # sees the change only through the invalidation sent when the lock moved.
        fds = [os.open(on(k, "hard"), os.O_RDONLY) for k in range(3)]
        for fd in fds:
            os.fstat(fd)
        os.chmod(on(1, "hard"), 0o640)
        os.chown(on(2, "hard"), 1234, 5678)
        os.utime(on(0, "hard"), ns=(1_000_000_123, 2_000_000_456))
        for k in range(3):
            for st in (os.stat(on(k, "dir", "moved")), os.fstat(fds[k])):
                self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid),
                                 (0o640, 1234, 5678), f"node {k}")
                self.assertEqual((st.st_atime_ns, st.st_mtime_ns), (1_000_000_123, 2_000_000_456),
                                 f"node {k}")
        # data written on one node: the others' descriptors see the new size at once
        with open(on(1, "hard"), "ab") as f:
            f.write(b"x" * 777)
        sizes = {os.fstat(fds[k]).st_size for k in range(3)}
        self.assertEqual(sizes, {os.stat(on(1, "hard")).st_size})
        for fd in fds:
            os.close(fd)
        # ctime moves with every change and every node sees the same value
        ct = {os.stat(on(k, "hard")).st_ctime_ns for k in range(3)}
        self.assertEqual(len(ct), 1)
        # xattrs
        os.setxattr(on(1, "hard"), "user.color", b"blue")
        for k in (0, 2):
            self.assertEqual(os.getxattr(on(k, "dir", "moved"), "user.color"), b"blue")
        os.removexattr(on(2, "hard"), "user.color")
        with self.assertRaises(OSError):
            os.getxattr(on(0, "hard"), "user.color")
        # a name created on one node is found at once where it was absent a moment ago
        self.assertFalse(os.path.exists(on(2, "late")))
        write(on(0, "late"), b"now")
        self.assertEqual(read(on(2, "late")), b"now")
        # unlink, rmdir
        os.unlink(on(1, "hard"))
        os.unlink(on(2, "late"))
        for k in (0, 1):
            self.assertFalse(os.path.exists(on(k, "late")))
        self.assertEqual(os.stat(on(0, "dir", "moved")).st_nlink, 1)
        os.unlink(on(0, "dir", "moved"))
        os.rmdir(on(2, "dir"))
        for k in (0, 1):
            self.assertFalse(os.path.exists(on(k, "dir")))
        # listings agree
        names = [sorted(os.listdir(mps[k])) for k in range(3)]
        self.assertEqual(names[0], names[1])
        self.assertEqual(names[0], names[2])
        # statfs agrees
        free = {os.statvfs(mps[k]).f_bfree for k in range(3)}
        self.assertEqual(len(free), 1, free)
        # O_DIRECT write on one node, buffered and O_DIRECT reads on the others
        data = os.urandom(1 << 16)
        wbuf = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT wants
        wbuf.write(data)
        fd = os.open(on(0, "direct"), os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
        self.assertEqual(os.write(fd, wbuf), 1 << 16)
        os.close(fd)
        self.assertEqual(read(on(1, "direct")), data)
        rbuf = mmap.mmap(-1, 1 << 16)
        fd = os.open(on(2, "direct"), os.O_RDONLY | os.O_DIRECT)
        self.assertEqual(os.readv(fd, [rbuf]), 1 << 16)
        os.close(fd)
        self.assertEqual(rbuf[:], data)
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_reader_sees_each_new_version_in_an_open_file(self):
        # A reader that keeps its file open on node 1 sees every write node 0 made
        # before the read began (cached pages are dropped when mtime moves).
        r = self.rig(2)
        a, b = r.mount(0), r.mount(1)
        write(os.path.join(a, "v"), b"%08d" % 0 * 512)
        with open(os.path.join(b, "v"), "rb", buffering=0) as rf, \
                open(os.path.join(a, "v"), "r+b", buffering=0) as wf:
            for version in range(1, 60):
                wf.seek(0)
                wf.write(b"%08d" % version * 512)
                rf.seek(0)
                self.assertEqual(rf.read(4096), b"%08d" % version * 512, f"version {version}")
        r.unmount(0)
        r.unmount(1)
        self.assert_fsck_clean(r)

    def test_multi_mmap(self):
        # What docs/DESIGN.md promises for memory maps (ocfs2-test's multi_mmap): a
        # shared mapping's writes reach the other nodes at msync; a mapping sees another
        # node's write(2) after this node's next read(2) of the file.
        r = self.rig(2)
        a, b = r.mount(0), r.mount(1)
        size = 4 * mmap.PAGESIZE
        write(os.path.join(a, "m"), b"\0" * size)
        fa = os.open(os.path.join(a, "m"), os.O_RDWR)
        fb = os.open(os.path.join(b, "m"), os.O_RDWR)
        try:
            ma = mmap.mmap(fa, size, mmap.MAP_SHARED)
            mb = mmap.mmap(fb, size, mmap.MAP_SHARED)
            for rnd in range(1, 6):
                page = (rnd % 4) * mmap.PAGESIZE
                stamp = b"A%03d" % rnd * 16
                ma[page:page + len(stamp)] = stamp
                ma.flush()  # msync(MS_SYNC)
                self.assertEqual(os.pread(fb, len(stamp), page), stamp, f"round {rnd}: B read(2)")
                self.assertEqual(mb[page:page + len(stamp)], stamp, f"round {rnd}: B's mapping")
                stamp = b"B%03d" % rnd * 16
                mb[page + 1024:page + 1024 + len(stamp)] = stamp
                mb.flush()
                self.assertEqual(os.pread(fa, len(stamp), page + 1024), stamp, f"round {rnd}: A read(2)")
                self.assertEqual(ma[page + 1024:page + 1024 + len(stamp)], stamp, f"round {rnd}: A's map")
                os.pwrite(fa, b"W%03d" % rnd * 8, page + 2048)  # write(2) on A
                os.pread(fb, 1, 0)  # B's next read(2) of the file
                self.assertEqual(mb[page + 2048:page + 2048 + 32], b"W%03d" % rnd * 8, f"round {rnd}")
            ma.close()
            mb.close()
        finally:
            os.close(fa)
            os.close(fb)
        data = read(os.path.join(b, "m"))
        self.assertEqual(data[mmap.PAGESIZE:mmap.PAGESIZE + 64], b"A005" * 16)  # rounds 1 and 5
        r.unmount(0)
        r.unmount(1)
        self.assert_fsck_clean(r)

    def test_cross_delete(self):
        # ocfs2-test's cross_delete: each node builds a tree, another node deletes it
        # while the builder starts the next one; nothing is left over, fsck is clean.
        r = self.rig()
        mps = [r.mount(i) for i in range(3)]
        for rnd in range(3):
            for i in range(3):
                top = os.path.join(mps[i], f"tree{i}-{rnd}")
                for d in range(4):
                    os.makedirs(os.path.join(top, f"d{d}", "sub"))
                    for f in range(10):
                        write(os.path.join(top, f"d{d}", "sub" if f % 2 else "", f"f{f}"),
                              b"x" * (f * 300))
            errors = []

            def delete(node, tree):
                try:
                    for root, dirs, files in os.walk(tree, topdown=False):
                        for f in files:
                            os.unlink(os.path.join(root, f))
                        for d in dirs:
                            os.rmdir(os.path.join(root, d))
                    os.rmdir(tree)
                except OSError as e:
                    errors.append(f"node {node} deleting {tree}: {e!r}")
            ts = [threading.Thread(target=delete,
                                   args=((i + 1) % 3, os.path.join(mps[(i + 1) % 3], f"tree{i}-{rnd}")))
                  for i in range(3)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            self.assertEqual(errors, [])
            for k in range(3):
                self.assertEqual(sorted(os.listdir(mps[k])), [], f"node {k} after round {rnd}")
        free = {os.statvfs(mps[k]).f_bfree for k in range(3)}
        self.assertEqual(len(free), 1, free)
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_open_delete(self):
        # ocfs2-test's open_delete: a file deleted on one node stays readable and
        # writable on the nodes that have it open; its space comes back once the last
        # of them closed it, also when that node is killed with the file open.
        r = self.rig()
        mps = [r.mount(i) for i in range(3)]
        size = 8 << 20
        data = os.urandom(size)
        for name in ("f", "g"):
            write(os.path.join(mps[0], name), data)

        def free_bytes():
            st = os.statvfs(mps[0])
            return st.f_bfree * st.f_frsize

        def wait_freed(at_least, timeout):
            deadline = time.time() + timeout
            while free_bytes() < at_least and time.time() < deadline:
                time.sleep(0.1)
            return free_bytes()

        fb = open(os.path.join(mps[1], "f"), "r+b", buffering=0)
        fc = open(os.path.join(mps[2], "f"), "rb", buffering=0)
        gc = open(os.path.join(mps[2], "g"), "rb", buffering=0)

        def close_all():
            for f in (fb, fc, gc):
                try:
                    f.close()
                except OSError:
                    pass  # the mount of a killed node
        self.addCleanup(close_all)
        before = free_bytes()
        os.unlink(os.path.join(mps[0], "f"))
        os.unlink(os.path.join(mps[0], "g"))
        for k in range(3):
            self.assertEqual(sorted(os.listdir(mps[k])), [], f"node {k}")
        self.assertEqual(os.fstat(fb.fileno()).st_nlink, 0)
        self.assertEqual(fc.read(), data)
        fb.seek(size)
        fb.write(b"written on B after the delete")
        os.fsync(fb.fileno())
        fc.seek(size)
        self.assertEqual(fc.read(), b"written on B after the delete")
        fb.seek(0)
        self.assertEqual(fb.read(size), data)
        self.assertLess(free_bytes(), before + size // 2, "freed while open on B and C")

        fb.close()  # still open on C
        time.sleep(1)
        self.assertLess(free_bytes(), before + size // 2, "freed while still open on C")
        self.assertEqual(fc.read(), b"")
        fc.seek(0)
        self.assertEqual(fc.read(size), data)
        fc.close()
        self.assertGreaterEqual(wait_freed(before + size, 10), before + size,
                                "f not freed after its last close")

        # C dies with g open: once C is recovered, a survivor frees g.
        self.assertEqual(gc.read(4096), data[:4096])
        r.kill9(2)
        close_all()
        self.assertGreaterEqual(wait_freed(before + 2 * size, 60), before + 2 * size,
                                "g not freed after the node that had it open died")
        for i in range(2):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_open_o_creat_of_one_new_name_on_three_nodes_at_once(self):
        # open(O_CREAT) without O_EXCL never fails with EEXIST, also when another node
        # creates the name between this kernel's lookup and its create. Two barriers a
        # round: nobody creates before every node has looked the name up.
        r = self.rig()
        mps = [r.mount(i) for i in range(3)]
        rounds = 60
        barrier = threading.Barrier(3)
        errors, inos = [], [[None] * rounds for _ in range(3)]

        def opener(i):
            for k in range(rounds):
                # Each kernel first learns that the name does not exist (a negative
                # entry, cached while the nodes share the lock), so that the create
                # races the other nodes' creates.
                barrier.wait()
                self.assertFalse(os.path.exists(os.path.join(mps[i], f"n{k}")))
                barrier.wait()
                try:
                    fd = os.open(os.path.join(mps[i], f"n{k}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                    inos[i][k] = os.fstat(fd).st_ino
                    os.write(fd, b"%d\n" % i)
                    os.close(fd)
                except OSError as e:
                    errors.append(f"node {i} round {k}: {e!r}")

        ts = [threading.Thread(target=opener, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(errors, [])
        for k in range(rounds):
            self.assertEqual(len({inos[i][k] for i in range(3)}), 1, f"round {k}: {inos}")
            self.assertEqual(sorted(read(os.path.join(mps[0], f"n{k}")).split()), [b"0", b"1", b"2"])
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_o_append_records_from_three_nodes_all_land_whole(self):
        r = self.rig()
        mps = [r.mount(i) for i in range(3)]
        write(os.path.join(mps[0], "log"), b"")
        per_node = 150

        def appender(i, errors):
            try:
                fd = os.open(os.path.join(mps[i], "log"), os.O_WRONLY | os.O_APPEND)
                for k in range(per_node):
                    rec = (f"node{i} record {k:05d} " + "x" * (k % 50) + "\n").encode()
                    self.assertEqual(os.write(fd, rec), len(rec))
                os.close(fd)
            except BaseException as e:  # noqa: B902 (reported below)
                errors.append(e)

        errors = []
        threads = [threading.Thread(target=appender, args=(i, errors)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        for k in range(3):
            lines = read(os.path.join(mps[k], "log")).split(b"\n")
            self.assertEqual(lines[-1], b"")
            lines = lines[:-1]
            self.assertEqual(len(lines), 3 * per_node, f"node {k}")
            for i in range(3):
                mine = [ln for ln in lines if ln.startswith(b"node%d " % i)]
                self.assertEqual([int(ln.split()[2]) for ln in mine], list(range(per_node)),
                                 b"\n".join(ln for ln in lines if not ln.startswith(b"node") or len(ln.split()) != 4 or ln.split()[1] != b"record")[:2000])
                for ln in mine:
                    n = int(ln.split()[2])
                    self.assertEqual(ln, (f"node{i} record {n:05d} " + "x" * (n % 50)).encode())
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_kill9_during_metadata_work_loses_nothing_synced(self):
        r = self.rig()
        mps = [r.mount(i) for i in range(3)]
        logs = []
        for rnd in range(CRASH_ROUNDS):
            victim = 2 if rnd % 2 == 0 else 1
            log = os.path.join(r.scratch.dir, f"synced-{rnd}.log")
            logs.append(log)
            w = subprocess.Popen([sys.executable, "-c", WORKLOAD, mps[victim], f"w{rnd}", log,
                                  str(rnd)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # The survivors work meanwhile.
            survivors = [k for k in range(3) if k != victim]
            for j in range(20):
                write(os.path.join(mps[survivors[j % 2]], f"s{rnd}-{j}"), b"s" * j)
                time.sleep(0.05)
            time.sleep(0.5 + 0.1 * (rnd % 5))
            r.kill9(victim)
            w.kill()
            w.wait()
            # The others go on: they wait for the recovery of the dead node's journal
            # and then see everything it had fsync'ed.
            t0 = time.time()
            for j in range(20):
                self.assertEqual(read(os.path.join(mps[survivors[0]], f"s{rnd}-{j}")), b"s" * j)
            write(os.path.join(mps[survivors[1]], f"after{rnd}"), b"after")
            self.assertLess(time.time() - t0, 60)
            synced = 0
            for lg in logs:
                with open(lg) as f:
                    for line in f:
                        rel, digest = line.split()
                        data = read(os.path.join(mps[survivors[0]], rel))
                        self.assertEqual(hashlib.sha256(data).hexdigest(), digest,
                                         f"round {rnd}: {rel} damaged")
                        synced += 1
            self.assertGreater(synced, rnd, "the workload synced nothing before the kill")
            r.mount(victim)
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_coherence_checker(self):
        # Two nodes write versioned records to files they own while all three read.
        # Every read must return a version no older than the newest write to that file
        # that completed before the read began. The nodes also run the network hint
        # channel (with via_nbd each node is in its own namespace, so the hints go
        # nowhere and the disk carries everything).
        r = self.rig()
        base = 47100 + (os.getpid() % 500) * 3
        mps = [r.mount(i, f"net=127.0.0.1:{base + i}") for i in range(3)]
        files = [f"rec{k}" for k in range(4)]
        for f in files:
            write(os.path.join(mps[0], f), b"%015d\n" % 0 * 256)
        done = {f: [] for f in files}    # (t_done, version)
        reads = []                       # (file, t_start, version, node)
        errors = []
        stop = threading.Event()

        def writer(node, mine):
            try:
                fds = {f: os.open(os.path.join(mps[node], f), os.O_WRONLY) for f in mine}
                v = 0
                while not stop.is_set():
                    v += 1
                    for f in mine:
                        os.pwrite(fds[f], b"%015d\n" % v * 256, 0)
                        done[f].append((time.monotonic(), v))
                for fd in fds.values():
                    os.close(fd)
            except BaseException as e:  # noqa: B902 (reported below)
                errors.append(f"writer {node}: {e!r}")

        def reader(node, which, closed=False):
            # Readers look at other nodes' files: within one node the kernel's page
            # cache does not make a read atomic with a concurrent write (as on ext4).
            # A `closed` reader keeps no file open: it stats the file (the kernel may
            # then cache its attributes, docs/DESIGN.md "The kernel's caches") and reads
            # it through a fresh open each time.
            try:
                fds = {} if closed else {
                    f: os.open(os.path.join(mps[node], f), os.O_RDONLY) for f in which}
                n = 0
                while not stop.is_set():
                    f = which[n % len(which)]
                    t = time.monotonic()
                    if closed:
                        os.stat(os.path.join(mps[node], f))
                        data = read(os.path.join(mps[node], f))
                    elif n % 7 == 0:  # sometimes through a fresh open
                        data = read(os.path.join(mps[node], f))
                    else:
                        data = os.pread(fds[f], 4096, 0)
                    recs = set(data.split(b"\n")[:-1])
                    if len(recs) != 1 or len(data) != 4096:
                        errors.append(f"node {node} read a torn record of {f}: {sorted(recs)[:3]}")
                        return
                    reads.append((f, t, int(recs.pop()), node))
                    n += 1
                for fd in fds.values():
                    os.close(fd)
            except BaseException as e:  # noqa: B902 (reported below)
                errors.append(f"reader {node}: {e!r}")

        ts = [threading.Thread(target=writer, args=(0, files[:2])),
              threading.Thread(target=writer, args=(1, files[2:])),
              threading.Thread(target=reader, args=(0, files[2:])),
              threading.Thread(target=reader, args=(1, files[:2])),
              threading.Thread(target=reader, args=(2, files[:2])),
              threading.Thread(target=reader, args=(2, files[2:], True))]
        run_for(ts, float(os.environ.get("AGFS_COHERENCE_SECONDS", "8")), stop)
        self.assertEqual(errors, [])
        self.assertGreater(len(reads), 50)
        self.assertGreater(min(len(v) for v in done.values()), 5)
        stale = []
        for f, t, v, node in reads:
            newest = 0
            for td, vd in done[f]:
                if td < t:
                    newest = vd
                else:
                    break
            if v < newest:
                stale.append((f, node, v, newest))
        print(f"coherence: {len(reads)} reads, {len(stale)} stale", file=sys.stderr)
        self.assertEqual(stale, [], f"{len(stale)} of {len(reads)} reads were stale")
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_create_racer(self):
        # Three nodes create, rename, link and unlink one small set of names in one
        # directory at once (ocfs2-test's create_racer). Only the errors those races
        # explain are allowed; afterwards the nodes agree and fsck is clean.
        r = self.rig()
        mps = [r.mount(i) for i in range(3)]
        os.mkdir(os.path.join(mps[0], "race"))
        allowed = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR,
                   errno.ESTALE}
        errors, counts = [], [0, 0, 0]
        stop = threading.Event()

        def racer(i):
            import random
            rnd = random.Random(i)
            d = os.path.join(mps[i], "race")
            try:
                while not stop.is_set():
                    a = os.path.join(d, f"n{rnd.randrange(12)}")
                    b = os.path.join(d, f"n{rnd.randrange(12)}")
                    op = rnd.randrange(6)
                    try:
                        if op == 0:
                            fd = os.open(a, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                            try:
                                os.write(fd, b"x" * rnd.randrange(10000))
                            finally:
                                os.close(fd)
                        elif op == 1:
                            os.rename(a, b)
                        elif op == 2:
                            os.unlink(a)
                        elif op == 3:
                            os.link(a, b)
                        elif op == 4:
                            os.mkdir(a)
                        else:
                            os.rmdir(a)
                        counts[i] += 1
                    except OSError as e:
                        # link() of a directory is EPERM
                        if e.errno not in allowed and not (op == 3 and e.errno == errno.EPERM):
                            errors.append(f"node {i} op {op}: {e!r}")
                            return
            except BaseException as e:  # noqa: B902 (reported below)
                errors.append(f"node {i}: {e!r}")

        run_for([threading.Thread(target=racer, args=(i,)) for i in range(3)], 8, stop)
        self.assertEqual(errors, [])
        self.assertGreater(sum(counts), 30)
        listings = [sorted(os.listdir(os.path.join(mps[k], "race"))) for k in range(3)]
        self.assertEqual(listings[0], listings[1])
        self.assertEqual(listings[0], listings[2])
        for i in range(3):
            r.unmount(i)
        self.assert_fsck_clean(r)

    def test_node_in_a_freed_slot_sees_what_changed_while_it_was_away(self):
        r = self.rig(count=2, slots=2)
        a, b = r.mount(0), r.mount(1)
        write(os.path.join(a, "f"), b"one")
        self.assertEqual(read(os.path.join(b, "f")), b"one")
        self.assertEqual(os.listdir(b), ["f"])
        for k in range(3):
            r.unmount(1)
            write(os.path.join(a, "f"), f"version {k}".encode())
            os.mkdir(os.path.join(a, f"d{k}"))
            b = r.mount(1)  # two slots: the one it just left
            self.assertEqual(read(os.path.join(b, "f")), f"version {k}".encode())
            self.assertEqual(sorted(os.listdir(b)), sorted(["f"] + [f"d{j}" for j in range(k + 1)]))
        r.unmount(0)
        r.unmount(1)
        self.assert_fsck_clean(r)

    def test_mount_unmount_churn_while_two_nodes_work(self):
        # Three slots: the churning node always takes the slot it just left, within the
        # same lock epoch (see LockService.NextOccupantOfASlotIgnoresItsPredecessorsGrants).
        r = self.rig(slots=3)
        a, b = r.mount(0), r.mount(1)
        stop = threading.Event()
        errors = []
        counts = [0, 0]
        done = [-1, -1]  # newest file each worker has written and read back

        def worker(i, mp):
            try:
                os.makedirs(os.path.join(mp, f"work{i}"), exist_ok=True)
                n = 0
                while not stop.is_set():
                    p = os.path.join(mp, f"work{i}", f"f{n}")
                    data = (f"{i}:{n}:" + "d" * (n % 3000)).encode()
                    write(p, data)
                    if read(p) != data:
                        errors.append(f"node {i} read back something else in {p}")
                    done[i] = n
                    if n >= 10:
                        os.unlink(os.path.join(mp, f"work{i}", f"f{n - 10}"))
                    n += 1
                counts[i] = n
            except BaseException as e:  # noqa: B902 (reported below)
                errors.append(repr(e))

        ts = [threading.Thread(target=worker, args=(0, a)), threading.Thread(target=worker, args=(1, b))]
        for t in ts:
            t.start()
        try:
            for k in range(5):
                c = r.mount(2)
                names = os.listdir(c)
                self.assertIn("work0", names)
                self.assertIn("work1", names)
                # The new node sees each worker at least as far as it had got before
                # the listing began.
                for i in range(2):
                    before = done[i]
                    got = [int(n[1:]) for n in os.listdir(os.path.join(c, f"work{i}"))]
                    self.assertGreaterEqual(max(got, default=-1), before, (k, i, sorted(got)))
                r.unmount(2)
        finally:
            stop.set()
            for t in ts:
                t.join()
        self.assertEqual(errors, [])
        self.assertGreater(min(counts), 10)
        # Each worker's last ten files are there, seen from the other node.
        for i, other in ((0, b), (1, a)):
            names = sorted(os.listdir(os.path.join(other, f"work{i}")))
            self.assertEqual(len(names), 10, names)
        r.unmount(0)
        r.unmount(1)
        self.assert_fsck_clean(r)


class FileMultiNodeTest(MultiNodeCases, unittest.TestCase):
    via_nbd = False


class NbdMultiNodeTest(MultiNodeCases, unittest.TestCase):
    via_nbd = True


if __name__ == "__main__":
    unittest.main()
