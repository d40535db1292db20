"""agorafs on a shared disk served over NBD: mkfs and mount through nbd+unix:// URIs,
nodes in their own network namespaces, server-side write errors."""
import errno
import os
import subprocess
import time
import unittest

import agfs
import nbdnet

IMAGE_SIZE = 256 << 20

_NETNS_OK, _NETNS_WHY = (None, "")


def netns_ok():
    global _NETNS_OK, _NETNS_WHY
    if _NETNS_OK is None:
        _NETNS_OK, _NETNS_WHY = nbdnet.netns_available()
    return _NETNS_OK


def wait_daemons_gone(spec, timeout=30):
    deadline = time.time() + timeout
    while agfs.daemon_pids(spec) and time.time() < deadline:
        time.sleep(0.05)
    return not agfs.daemon_pids(spec)


@unittest.skipUnless(nbdnet.have_nbdkit(), "nbdkit not installed")
class NbdTest(unittest.TestCase):
    def setUp(self):
        self.s = agfs.Scratch(mkfs=False)
        self.addCleanup(self.s.cleanup)
        with open(self.s.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        self.sock = os.path.join(self.s.dir, "nbd.sock")
        self.log = os.path.join(self.s.dir, "nbd.log")
        self.fail_file = os.path.join(self.s.dir, "fail-writes")

    def serve(self, **kw):
        srv = nbdnet.start_nbdkit(self.s.image, self.sock, **kw)
        self.addCleanup(srv.stop)
        return srv

    def netns(self, tag):
        if not netns_ok():
            self.skipTest(f"network namespaces unavailable: {_NETNS_WHY}")
        ns = nbdnet.NetNamespace(f"agfs-{tag}-{os.getpid()}")
        self.addCleanup(ns.delete)
        return ns

    def mount(self, uri, name="mnt", ns=None):
        """Mounts `uri` (as a daemon, inside `ns` if given); returns the mount point."""
        mp = os.path.join(self.s.dir, name)
        os.makedirs(mp, exist_ok=True)
        argv = [agfs.BIN, "mount", uri, mp]
        p = subprocess.run(ns.cmd(argv) if ns else argv, capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(p.returncode, 0, f"mount failed: {p.stderr}{p.stdout}")
        self.assertTrue(agfs.is_mounted(mp))
        self.addCleanup(self.force_unmount, mp, uri)
        return mp

    def force_unmount(self, mp, uri):
        if agfs.is_mounted(mp):
            agfs.umount(mp)
        if not wait_daemons_gone(uri, 10):
            for pid in agfs.daemon_pids(uri):
                os.kill(pid, 9)
            wait_daemons_gone(uri, 10)

    def unmount(self, mp, uri):
        agfs.umount(mp)
        self.assertTrue(wait_daemons_gone(uri), "agorafs daemon did not exit after umount")

    def assert_fsck_clean(self):
        r = self.s.fsck()  # on the plain image file, not through NBD
        self.assertEqual(r.returncode, 0, f"fsck not clean:\n{r.stdout}{r.stderr}")

    def test_mkfs_and_mount_over_nbd_in_netns(self):
        srv = self.serve(log_file=self.log)
        agfs.run("mkfs", "--nodes", "2", "--profile", "fast", srv.uri)
        mkfs_writes = srv.writes()
        self.assertTrue(mkfs_writes, "mkfs wrote nothing through NBD")

        ns = self.netns("node0")
        # The namespace has a loopback device and nothing else.
        links = ns.run(["ip", "-o", "link"]).stdout.splitlines()
        self.assertEqual(len(links), 1, links)
        self.assertIn(" lo:", links[0])

        mp = self.mount(srv.uri, ns=ns)
        pids = agfs.daemon_pids(srv.uri)
        self.assertEqual(len(pids), 1, pids)
        self.assertEqual(nbdnet.netns_of_pid(pids[0]), ns.ident(),
                         "the daemon is not in the node's namespace")
        self.assertNotEqual(nbdnet.netns_of_pid(os.getpid()), ns.ident())

        data = {f"f{i}": os.urandom(1000 + i * 7919) for i in range(20)}
        os.mkdir(os.path.join(mp, "d"))
        for name, content in data.items():
            with open(os.path.join(mp, "d", name), "wb") as f:
                f.write(content)
        big = os.urandom(8 << 20)
        with open(os.path.join(mp, "big"), "wb") as f:
            f.write(big)
            os.fsync(f.fileno())
        for name, content in data.items():
            with open(os.path.join(mp, "d", name), "rb") as f:
                self.assertEqual(f.read(), content)
        self.unmount(mp, srv.uri)

        # The daemon's writes went through NBD, on connections of its own (mkfs used
        # connections 1-4; the pool spreads the daemon's I/O over several more).
        writes = srv.writes()
        self.assertGreater(len(writes), len(mkfs_writes) + 1, sorted(writes))
        mount_writes = sum(len(v) for v in writes.values()) - \
            sum(len(v) for v in mkfs_writes.values())
        self.assertGreater(mount_writes, 0)
        self.assertTrue(all(r.ret == 0 for v in writes.values() for r in v))
        self.assert_fsck_clean()

        # Remount from a second, fresh namespace: the data is there.
        ns2 = self.netns("node1")
        mp = self.mount(srv.uri, name="mnt2", ns=ns2)
        for name, content in data.items():
            with open(os.path.join(mp, "d", name), "rb") as f:
                self.assertEqual(f.read(), content)
        with open(os.path.join(mp, "big"), "rb") as f:
            self.assertEqual(f.read(), big)
        self.unmount(mp, srv.uri)
        self.assert_fsck_clean()

    def test_info_and_fsck_through_uri(self):
        srv = self.serve()
        agfs.run("mkfs", "--nodes", "2", "--profile", "fast", srv.uri)
        r = agfs.run("info", srv.uri)
        self.assertIn("node slots:       2,", r.stdout)
        r = agfs.run("fsck", srv.uri, check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_write_errors_give_eio_and_no_corruption(self):
        srv = self.serve(log_file=self.log,
                         error={"error-pwrite-rate": "100%",
                                "error-pwrite-file": self.fail_file})
        agfs.run("mkfs", "--nodes", "2", "--profile", "fast", srv.uri)
        ns = self.netns("node0") if netns_ok() else None
        mp = self.mount(srv.uri, ns=ns)
        before = os.urandom(200000)
        with open(os.path.join(mp, "before"), "wb") as f:
            f.write(before)
            os.fsync(f.fileno())

        # From now on the disk fails every write.
        open(self.fail_file, "w").close()
        with self.assertRaises(OSError) as cm:
            with open(os.path.join(mp, "after"), "wb") as f:
                f.write(os.urandom(300000))
                os.fsync(f.fileno())
        self.assertEqual(cm.exception.errno, errno.EIO)
        failed = [r for v in srv.writes().values() for r in v if r.ret == -1]
        self.assertTrue(failed, "no write failed at the server")
        self.assertTrue(all(r.error == "EIO" for r in failed))

        # The node goes away (as a node whose disk failed would); the disk recovers.
        self.force_unmount(mp, srv.uri)
        os.unlink(self.fail_file)
        srv.stop()
        srv.start()

        mp = self.mount(srv.uri, name="mnt2", ns=ns)  # replays the journal
        with open(os.path.join(mp, "before"), "rb") as f:
            self.assertEqual(f.read(), before)
        with open(os.path.join(mp, "again"), "wb") as f:
            f.write(b"x" * 5000)
            os.fsync(f.fileno())
        self.unmount(mp, srv.uri)
        # The log spans both server runs; the second run's writes all succeeded.
        again = srv.writes(run=-1)
        self.assertTrue(again)
        self.assertTrue(all(r.ret == 0 and r.run == 1 for v in again.values() for r in v))
        self.assertTrue(all(isinstance(k, tuple) for k in srv.writes()))
        self.assert_fsck_clean()


@unittest.skipUnless(nbdnet.have_nbdkit(), "nbdkit not installed")
class NbdNetHarnessTest(unittest.TestCase):
    """The harness itself: pause/resume and the log parser."""

    def test_pause_holds_requests(self):
        s = agfs.Scratch(mkfs=False)
        self.addCleanup(s.cleanup)
        with open(s.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        log = os.path.join(s.dir, "nbd.log")
        srv = nbdnet.start_nbdkit(s.image, os.path.join(s.dir, "nbd.sock"), log_file=log,
                                  pause_control=os.path.join(s.dir, "pause.sock"),
                                  delay={"delay-write": "1ms"})
        self.addCleanup(srv.stop)
        srv.pause()
        p = subprocess.Popen([agfs.BIN, "mkfs", "--nodes", "2", srv.uri],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        self.assertIsNone(p.poll(), "mkfs finished while the disk was paused")
        self.assertEqual(sum(r.ret == 0 for v in srv.writes().values() for r in v), 0)
        t_resume = time.time()
        srv.resume()
        out, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 0, err)
        done = [r for v in srv.writes().values() for r in v if r.ret == 0]
        self.assertTrue(done)
        self.assertTrue(all(r.end_time >= t_resume - 0.05 for r in done))
        self.assertTrue(all(r.offset % 512 == 0 and r.count > 0 for r in done))
        for conn, reqs in srv.writes().items():
            self.assertEqual([r.time for r in reqs], sorted(r.time for r in reqs), conn)


if __name__ == "__main__":
    unittest.main()
