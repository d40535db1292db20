"""Bad input: foreign, zeroed, random, tiny, corrupted and full devices."""
import errno
import os
import struct
import subprocess
import unittest

import agfs


class BadDeviceTest(unittest.TestCase):
    def setUp(self):
        self.s = agfs.Scratch(mkfs=False)
        self.addCleanup(self.s.cleanup)
        self.mp = os.path.join(self.s.dir, "mnt")
        os.makedirs(self.mp)

    def make(self, size, content=None):
        with open(self.s.image, "wb") as f:
            if content is not None:
                f.write(content)
            f.truncate(size)

    def assert_mount_refused(self, needle):
        r = agfs.run("mount", self.s.image, self.mp, check=False)
        self.assertNotEqual(r.returncode, 0)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertIn(needle, lines[0])
        self.assertFalse(agfs.is_mounted(self.mp))

    def test_zeroed_device(self):
        self.make(64 << 20)
        self.assert_mount_refused("empty (zeroed)")

    def test_random_bytes(self):
        self.make(64 << 20, os.urandom(1 << 20))
        self.assert_mount_refused("not agorafs")

    def test_ext4_image(self):
        self.make(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", self.s.image], check=True, capture_output=True)
        self.assert_mount_refused("ext2/3/4")
        r = agfs.run("mkfs", self.s.image, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--force", r.stderr)
        agfs.run("mkfs", "--force", self.s.image)

    def test_too_small(self):
        self.make(1 << 20)
        r = agfs.run("mkfs", self.s.image, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("too small", r.stderr)

    def test_mkfs_refuses_existing_agorafs(self):
        self.make(128 << 20)
        agfs.run("mkfs", self.s.image)
        r = agfs.run("mkfs", self.s.image, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("already holds an agorafs filesystem", r.stderr)

    def test_truncated_image(self):
        self.make(256 << 20)
        agfs.run("mkfs", self.s.image)
        os.truncate(self.s.image, 128 << 20)
        self.assert_mount_refused("smaller")

    def test_corrupt_superblock_uses_copy(self):
        self.make(128 << 20)
        agfs.run("mkfs", self.s.image)
        with open(self.s.image, "r+b") as f:
            f.seek(100)
            f.write(b"garbage!")
        mp = self.s.mount()
        open(os.path.join(mp, "ok"), "w").close()


class CorruptObjectTest(unittest.TestCase):
    """One damaged inode: EIO for it, the rest works, fsck names it."""

    def test_damaged_inode(self):
        s = agfs.Scratch(size="128M")
        self.addCleanup(s.cleanup)
        mp = s.mount()
        os.mkdir(os.path.join(mp, "d"))
        for n in ["good", "bad"]:
            with open(os.path.join(mp, "d", n), "w") as f:
                f.write(n * 100)
        bad_ino = os.stat(os.path.join(mp, "d", "bad")).st_ino
        s.unmount(mp)
        with open(s.image, "r+b") as f:
            f.seek(bad_ino * 4096 + 300)
            f.write(b"\xff" * 16)
        mp = s.mount()
        with self.assertRaises(OSError) as cm:
            os.stat(os.path.join(mp, "d", "bad"))
        self.assertEqual(cm.exception.errno, errno.EIO)
        self.assertEqual(open(os.path.join(mp, "d", "good")).read(), "good" * 100)
        with open(os.path.join(mp, "d", "new"), "w") as f:
            f.write("still writable")
        s.unmount(mp)
        r = s.fsck()
        self.assertEqual(r.returncode, 4, r.stdout)
        self.assertIn(str(bad_ino), r.stdout)
        r = s.fsck(repair=True)
        self.assertIn(r.returncode, (1,), r.stdout)
        self.assertEqual(s.fsck().returncode, 0)


class FullDiskTest(unittest.TestCase):
    def test_enospc_and_accounting(self):
        s = agfs.Scratch(size="96M", nodes=2)
        self.addCleanup(s.cleanup)
        mp = s.mount()
        before = os.statvfs(mp).f_bfree
        path = os.path.join(mp, "fill")
        with self.assertRaises(OSError) as cm:
            with open(path, "wb") as f:
                while True:
                    f.write(b"f" * (1 << 20))
        self.assertEqual(cm.exception.errno, errno.ENOSPC)
        with self.assertRaises(OSError) as cm:
            for i in range(100000):
                with open(os.path.join(mp, f"small{i}"), "w") as f:
                    f.write("x" * 100)
        self.assertEqual(cm.exception.errno, errno.ENOSPC)
        for name in os.listdir(mp):
            os.unlink(os.path.join(mp, name))
        s.unmount(mp)
        self.assertEqual(s.fsck().returncode, 0)
        mp = s.mount()
        self.assertEqual(os.statvfs(mp).f_bfree, before)


if __name__ == "__main__":
    unittest.main()
