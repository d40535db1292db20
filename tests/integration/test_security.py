"""The device and the image (issue "Security", item 4): mkfs, mount and fsck --repair
refuse a device the kernel is using and a world-writable image unless forced, and a
node refuses to join a device where another filesystem's node has written its
heartbeat. Real binary, real loop devices, real ext4 mounts."""
import os
import shutil
import struct
import subprocess
import tempfile
import unittest

import agfs

SLOT_TYPE = 2  # BlockType::kSlot (docs/FORMAT.md)


def heartbeat_blocks(path):
    """Block numbers of intact-looking slot heartbeat blocks (type 2, a UUID) in `path`."""
    found = []
    with open(path, "rb") as f:
        blk = 0
        while True:
            b = f.read(4096)
            if len(b) < 4096:
                break
            _, typ = struct.unpack_from("<IH", b, 0)
            if typ == SLOT_TYPE and b[24:40] != bytes(16):
                found.append(blk)
            blk += 1
            if blk > 8192:  # the slot region sits at the start
                break
    return found


class DeviceGuardTest(unittest.TestCase):
    def setUp(self):
        os.makedirs(agfs.SCRATCH, exist_ok=True)
        self.dir = tempfile.mkdtemp(dir=agfs.SCRATCH)
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def test_world_writable_image_is_refused_unless_forced(self):
        img = self.path("ww.img")
        with open(img, "wb") as f:
            f.truncate(256 << 20)
        os.chmod(img, 0o666)
        p = agfs.run("mkfs", "--nodes", "4", img, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("writable by every user", p.stderr)
        self.assertEqual(p.stderr.count("\n"), 1, p.stderr)  # one clear line
        agfs.run("mkfs", "--force", "--nodes", "4", "--profile", "fast", img)
        mp = self.path("mnt")
        os.mkdir(mp)
        p = agfs.run("mount", img, mp, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("writable by every user", p.stderr)
        self.assertFalse(agfs.is_mounted(mp))
        agfs.run("mount", "-o", "allow_world_writable", img, mp)
        self.addCleanup(agfs.umount, mp)
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("ok")
        agfs.umount(mp)
        os.chmod(img, 0o600)
        agfs.run("mount", img, mp)
        with open(os.path.join(mp, "f")) as f:
            self.assertEqual(f.read(), "ok")
        agfs.umount(mp)

    def test_device_the_kernel_has_mounted_is_refused(self):
        img = self.path("ext4.img")
        with open(img, "wb") as f:
            f.truncate(128 << 20)
        loop = subprocess.run(["losetup", "--find", "--show", img], capture_output=True,
                              text=True, check=True).stdout.strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", loop], capture_output=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
        ext = self.path("ext")
        os.mkdir(ext)
        subprocess.run(["mount", loop, ext], check=True)
        self.addCleanup(agfs.umount, ext)
        with open(os.path.join(ext, "precious"), "w") as f:
            f.write("ext4 data")
        for args in (["mkfs", "--force", loop], ["mkfs", "--force", img],
                     ["fsck", "--repair", loop]):
            p = agfs.run(*args, check=False)
            self.assertNotEqual(p.returncode, 0, args)
            self.assertIn("unmount it first", p.stderr, args)
            self.assertIn(loop if args[-1] == img else ext, p.stderr, args)
        mp = self.path("mnt")
        os.mkdir(mp)
        p = agfs.run("mount", img, mp, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("backs " + loop, p.stderr)
        with open(os.path.join(ext, "precious")) as f:
            self.assertEqual(f.read(), "ext4 data")
        agfs.umount(ext)
        subprocess.run(["fsck.ext4", "-n", "-f", loop], check=True, capture_output=True)
        # Once the kernel lets go, the device is agorafs's to take.
        agfs.run("mkfs", "--force", "--nodes", "4", "--profile", "fast", loop)
        agfs.run("mount", loop, mp)
        self.addCleanup(agfs.umount, mp)
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("on the loop device")
        agfs.umount(mp)

    def test_heartbeat_of_another_filesystem_refuses_the_join(self):
        a, b = self.path("a.img"), self.path("b.img")
        for img in (a, b):
            agfs.run("mkfs", "--size", "256M", "--nodes", "4", "--profile", "fast", img)
        mp = self.path("mnt")
        os.mkdir(mp)
        agfs.run("mount", b, mp)  # b's node writes its heartbeat
        agfs.umount(mp)
        blocks = heartbeat_blocks(b)
        self.assertTrue(blocks)
        with open(b, "rb") as src, open(a, "r+b") as dst:
            for blk in blocks:  # same geometry: the same block numbers
                src.seek(blk * 4096)
                dst.seek(blk * 4096)
                dst.write(src.read(4096))
        p = agfs.run("mount", a, mp, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("another filesystem", p.stderr)
        self.assertFalse(agfs.is_mounted(mp))
        p = agfs.run("fsck", a, check=False)
        self.assertEqual(p.returncode, 4, p.stdout)
        self.assertIn("bad-slot", p.stdout)
        p = agfs.run("fsck", "--repair", a, check=False)
        self.assertEqual(p.returncode, 1, p.stdout)
        agfs.run("fsck", a)
        agfs.run("mount", a, mp)
        self.addCleanup(agfs.umount, mp)
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("joined")
        agfs.umount(mp)


if __name__ == "__main__":
    unittest.main()
