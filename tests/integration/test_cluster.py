"""Cluster core with real node processes (tests/cluster/agfs-locknode): mutual
exclusion, simultaneous joins, crashes of a holder and of the master, a node frozen
past its lease, write errors on one node. Every case runs twice: nodes sharing the
image file directly, and each node reaching the disk through its own nbdkit server
from its own network namespace (no network between nodes)."""
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import time
import unittest

import cluster
import nbdnet

LOCK = 7


def read_counter(image):
    size = os.path.getsize(image)
    blk = size // 4096 - 64
    with open(image, "rb") as f:
        f.seek(blk * 4096)
        magic, count, inside, slot, gen, recoveries = struct.unpack("<QQIIQQ", f.read(40))
    return {"count": count, "inside": inside, "slot": slot, "recoveries": recoveries}


class ClusterCases:
    via_nbd = False

    def rig(self, count, **kw):
        r = cluster.Rig(count, via_nbd=self.via_nbd, **kw)
        self.addCleanup(r.close)
        return r

    def logs(self, nodes):
        return "\n".join(f"--- node {i} rc={n.proc.poll()}\n{n.log()}" for i, n in enumerate(nodes))

    def counter_case(self, count, iterations, **opts):
        r = self.rig(count)
        nodes = [r.spawn(i, "counter", lock=LOCK, iterations=iterations, min_hold_ms=20, **opts)
                 for i in range(count)]
        rcs = [n.wait_exit(timeout=800) for n in nodes]
        self.assertEqual(rcs, [0] * count, self.logs(nodes))
        done = sum(n.wait_event("done")["increments"] for n in nodes)
        self.assertEqual(done, count * iterations)
        c = read_counter(r.scratch.image)
        self.assertEqual(c["count"], count * iterations)
        self.assertEqual(c["inside"], 0)
        stats = [n.wait_event("stats") for n in nodes]
        # Nodes finish at different times; when the master leaves, the rest elect a new
        # one. At most one master per epoch.
        epochs = [s["epoch"] for s in stats if s["is_master"]]
        self.assertEqual(len(epochs), len(set(epochs)), stats)
        return stats

    def test_mutual_exclusion_2_nodes(self):
        self.counter_case(2, 10000)

    def test_mutual_exclusion_4_nodes(self):
        self.counter_case(4, 10000)

    def test_mutual_exclusion_8_nodes(self):
        self.counter_case(8, 10000)

    def test_eight_nodes_start_at_once_get_distinct_slots(self):
        r = self.rig(8)
        for round_ in range(3):
            at = int(time.time() * 1000) + 1500
            nodes = [r.spawn(i, "idle", start_at_ms=at) for i in range(8)]
            joined = [n.wait_event("joined", timeout=120) for n in nodes]
            slots = [j["slot"] for j in joined]
            self.assertEqual(len(set(slots)), 8, f"round {round_}: slots {slots}")
            self.assertEqual(cluster.stop_all(nodes), [0] * 8, self.logs(nodes))

    def wait_master(self, node):
        deadline = time.time() + 60
        while time.time() < deadline:
            st = node.proc.poll()
            self.assertIsNone(st, node.log())
            log = node.log()
            if "is slot" in log:
                return
            time.sleep(0.05)
        self.fail("no master elected: " + node.log())

    def master_holder_waiter(self, r, **opts):
        """An idle master, a node holding LOCK and one waiting for it; returns them and
        the holder's and waiter's join events."""
        m = r.spawn(0, "idle", **opts)
        self.wait_master(m)
        h = r.spawn(1, "hold", lock=LOCK, **opts)
        h.wait_event("acquired")
        w = r.spawn(2, "acquire", lock=LOCK, **opts)
        return m, h, w, h.wait_event("joined"), w.wait_event("joined")

    def test_kill9_holder_locks_freed_after_recovery(self):
        r = self.rig(3)
        m, h, w, hj, _ = self.master_holder_waiter(r)
        hslot = hj["slot"]
        time.sleep(1)
        self.assertEqual(w.all("acquired"), [], "granted while the holder lives")
        h.signal(signal.SIGKILL)
        got = w.wait_event("acquired", timeout=60)
        rec = m.wait_event("recovered", pred=lambda e: e["slot"] == hslot)
        self.assertTrue(rec["repaired"], rec)
        self.assertGreaterEqual(got["t"], rec["t"], "granted before recovery finished")
        self.assertFalse(got["inside_before"])
        self.assertEqual(cluster.stop_all([m, w]), [0, 0], self.logs([m, w]))

    def test_kill9_master_others_continue(self):
        r = self.rig(3)
        m = r.spawn(0, "hold", lock=LOCK)  # the first node is the master and holds the lock
        m.wait_event("acquired")
        mslot = m.wait_event("joined")["slot"]
        b = r.spawn(1, "idle")
        w = r.spawn(2, "acquire", lock=LOCK)
        b.wait_event("joined")
        w.wait_event("joined")
        time.sleep(1)
        self.assertEqual(w.all("acquired"), [])
        m.signal(signal.SIGKILL)
        got = w.wait_event("acquired", timeout=60)
        recs = [e for n in (b, w) for e in n.all("recovered") if e["slot"] == mslot]
        self.assertEqual(len(recs), 1, f"{b.events} {w.events}")
        self.assertTrue(recs[0]["repaired"])
        self.assertGreaterEqual(got["t"], recs[0]["t"])
        self.assertEqual(cluster.stop_all([b, w]), [0, 0], self.logs([b, w]))
        stats = [n.wait_event("stats") for n in (b, w)]
        epochs = [s["epoch"] for s in stats if s["is_master"]]
        self.assertEqual(len(epochs), len(set(epochs)), stats)
        self.assertGreaterEqual(min(s["epoch"] for s in stats), 2)

    def test_sigstop_holder_fences_itself(self):
        r = self.rig(3)
        m, h, w, hj, _ = self.master_holder_waiter(r)
        hslot = hj["slot"]
        time.sleep(0.5)
        h.signal(signal.SIGSTOP)
        t_stop = time.time()
        got = w.wait_event("acquired", timeout=60)
        rec = m.wait_event("recovered", pred=lambda e: e["slot"] == hslot)
        self.assertGreaterEqual(got["t"], rec["t"])
        before = read_counter(r.scratch.image)
        self.assertEqual(before["inside"], 0)
        h.signal(signal.SIGCONT)
        rc = h.wait_exit(timeout=60)
        self.assertEqual(rc, 4, "the frozen holder did not fence itself:\n" + h.log())
        after = read_counter(r.scratch.image)
        self.assertEqual(after, before, "a write of the fenced node landed after takeover")
        if self.via_nbd:
            late = [rec for conn in r.servers[1].writes().values() for rec in conn
                    if rec.time > t_stop + 0.5]
            self.assertEqual(late, [], "writes of the fenced node reached the disk")
        self.assertEqual(cluster.stop_all([m, w]), [0, 0], self.logs([m, w]))


class FileClusterTest(ClusterCases, unittest.TestCase):
    via_nbd = False

    def test_status_shows_the_live_cluster(self):
        r = self.rig(3)
        m, h, w, _, _ = self.master_holder_waiter(r)
        joined = [n.wait_event("joined") for n in (m, h, w)]
        time.sleep(2)  # the master publishes its view and lock table every heartbeat
        st = json.loads(r.status("--json").stdout)
        by_slot = {n["slot"]: n for n in st["nodes"]}
        self.assertEqual(sorted(by_slot), sorted(j["slot"] for j in joined), st)
        for j, host in zip(joined, ("node0", "node1", "node2")):
            n = by_slot[j["slot"]]
            self.assertEqual((n["host"], n["generation"], n["state"]), (host, j["generation"], "alive"))
            self.assertLess(n["heartbeat_age_ms"], 3000)
        self.assertEqual(st["master"]["slot"], joined[0]["slot"])
        held = by_slot[joined[1]["slot"]]["locks"]
        waiting = by_slot[joined[2]["slot"]]["locks"]
        self.assertEqual([(l["name"], l["mode"]) for l in held], [(f"inode {LOCK}", "exclusive")])
        self.assertEqual([(l["name"], l["state"]) for l in waiting], [(f"inode {LOCK}", "waiting")])
        text = r.status().stdout
        self.assertIn(f"slot {joined[2]['slot']} waits", text)
        self.assertIn(f"held by slot {joined[1]['slot']} exclusive", text)
        self.assertEqual(cluster.stop_all([w, h, m]), [0, 0, 0])

    def test_mkfs_timings_profile_and_overrides(self):
        import agfs
        s = agfs.Scratch(mkfs=False)
        self.addCleanup(s.cleanup)
        agfs.run("mkfs", "--size", "64M", "--profile", "fast", "--heartbeat-ms", "250",
                 "--dead-after-ms", "5000", s.image)
        info = json.loads(agfs.run("info", "--json", s.image).stdout)
        self.assertEqual((info["profile"], info["heartbeat_interval_ms"], info["dead_after_ms"]),
                         ("fast", 250, 5000))
        # Values that would let nodes fence each other are refused with the reason.
        p = agfs.run("mkfs", "--size", "64M", "--force", "--heartbeat-ms", "2000",
                     "--dead-after-ms", "3000", s.image, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("timings refused", p.stderr + p.stdout)

    def test_forged_and_replayed_datagrams_change_nothing(self):
        """Issue "security": a live node's channel gets forged, replayed, truncated,
        oversized and stale-generation datagrams; none grants or blocks anything."""
        r = self.rig(3)
        m, h, w, hj, wj = self.master_holder_waiter(r, net="127.0.0.1:0")
        time.sleep(1.5)
        st = json.loads(r.status("--json").stdout)
        addr = {n["slot"]: n["address"] for n in st["nodes"]}
        with open(r.scratch.image, "rb") as f:
            sb = f.read(4096)
        uuid, secret = sb[24:40], sb[240:272]
        key = hashlib.blake2b(b"agorafs net v1", key=secret, digest_size=32).digest()

        def datagram(slot, gen, seq, key=key):
            body = struct.pack("<IHH16sIIQQQQ", 0x574E4741, 1, 1, uuid, slot, 0, gen, seq, 1 << 40, 1)
            return body + hmac.new(key, body, hashlib.sha512).digest()[:32]

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        targets = [addr[hj["slot"]], addr[wj["slot"]]]
        sent = 0
        for t in targets:
            host, port = t.rsplit(":", 1)
            dst = (host, int(port))
            good = datagram(wj["slot"], wj["generation"], 1 << 62)
            bad = [
                datagram(wj["slot"], wj["generation"], 5, key=bytes(32)),   # forged MAC
                good[:-1],                                                  # truncated
                good + b"x",                                                # oversized
                good * 10,                                                  # oversized
                datagram(wj["slot"], wj["generation"] + 7, 9),              # stale generation
                datagram(200, 1, 9),                                        # not a live slot
                os.urandom(96),                                             # garbage
            ]
            sock.sendto(good, dst)  # valid: costs one ring read at most
            sock.sendto(good, dst)  # replayed
            for b in bad:
                sock.sendto(b, dst)
            sent += 1 + len(bad)
        time.sleep(1)
        self.assertEqual(w.all("acquired"), [], "a datagram granted a lock")
        self.assertIsNone(h.proc.poll())
        h.signal(signal.SIGTERM)  # the holder leaves: the waiter gets the lock normally
        w.wait_event("acquired", timeout=60)
        self.assertEqual(cluster.stop_all([w, m]), [0, 0])
        self.assertEqual(h.wait_exit(), 0)
        dropped = h.wait_event("stats")["net_dropped"] + w.wait_event("stats")["net_dropped"]
        self.assertGreaterEqual(dropped, sent, "every bad datagram is counted")

    def test_mutual_exclusion_with_network_channel(self):
        stats = self.counter_case(4, 5000, net="127.0.0.1:0")
        self.assertGreater(sum(s["net_accepted"] for s in stats), 0, stats)
        self.assertEqual(sum(s["net_dropped"] for s in stats), 0, stats)


_NETNS_OK = None


def netns_ok():
    global _NETNS_OK
    if _NETNS_OK is None:
        _NETNS_OK = nbdnet.have_nbdkit() and nbdnet.netns_available()[0]
    return _NETNS_OK


@unittest.skipUnless(netns_ok(), "nbdkit or network namespaces unavailable")
class NbdClusterTest(ClusterCases, unittest.TestCase):
    via_nbd = True

    def test_write_errors_fence_that_node_only(self):
        r = self.rig(3)
        m = r.spawn(0, "idle")
        self.wait_master(m)
        a = r.spawn(1, "counter", lock=LOCK, iterations=1000000, min_hold_ms=20)
        b = r.spawn(2, "counter", lock=LOCK, iterations=3000, min_hold_ms=20)
        aslot = a.wait_event("joined")["slot"]
        b.wait_event("joined")
        time.sleep(2)
        r.fail_writes(1)
        self.assertEqual(a.wait_exit(timeout=120), 4,
                         "a node whose writes fail must fence itself:\n" + a.log())
        rec = m.wait_event("recovered", timeout=60, pred=lambda e: e["slot"] == aslot)
        self.assertEqual(b.wait_exit(300), 0, b.log())
        self.assertEqual(cluster.stop_all([m]), [0], m.log())
        done = sum(n.wait_event("done")["increments"] for n in (a, b))
        self.assertEqual(done, 3000 + a.wait_event("done")["increments"])
        c = read_counter(r.scratch.image)
        self.assertEqual(c["count"], done)
        self.assertEqual(c["inside"], 0, rec)


if __name__ == "__main__":
    unittest.main()
