"""A storage-wide stall (every node's nbdkit server paused for 20 s, default timing
profile) must not make anyone declare anyone dead or fence itself: afterwards every
node finishes its work and the count is exact. Slow: its own CTest label."""
import time
import unittest

import cluster
import nbdnet
from test_cluster import LOCK, read_counter

ITERS = 30000


@unittest.skipUnless(nbdnet.have_nbdkit() and nbdnet.netns_available()[0],
                     "nbdkit or network namespaces unavailable")
class StallTest(unittest.TestCase):
    def test_storage_wide_stall_of_20s_fences_nobody(self):
        r = cluster.Rig(3, profile="default", via_nbd=True)
        self.addCleanup(r.close)
        nodes = [r.spawn(i, "counter", lock=LOCK, iterations=ITERS, min_hold_ms=20)
                 for i in range(3)]
        for n in nodes:
            n.wait_event("joined", timeout=120)
        time.sleep(2)
        for s in r.servers:
            s.pause()
        t0 = time.time()
        at_pause = read_counter(r.scratch.image)["count"]
        time.sleep(20)
        for s in r.servers:
            s.resume()
        stall = time.time() - t0
        rcs = [n.wait_exit(timeout=600) for n in nodes]
        logs = "\n".join(n.log() for n in nodes)
        self.assertEqual(rcs, [0, 0, 0], logs)
        for n in nodes:
            self.assertEqual(n.all("fenced"), [])
            self.assertEqual(n.all("recovered"), [])
        self.assertGreaterEqual(stall, 20)
        # The nodes were in the middle of their work when the storage stopped.
        self.assertGreater(at_pause, 0)
        self.assertLess(at_pause, 3 * ITERS)
        self.assertEqual(read_counter(r.scratch.image)["count"], 3 * ITERS)


if __name__ == "__main__":
    unittest.main()
