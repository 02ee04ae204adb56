"""
The request counters every host store shares: counts, shares of a
provider's requests, last use, forgetting, and the bound on entries.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from credproxy.stores import BucketStats, RequestCounters
from credproxy.stores._counters import MAX_COUNTED_ENTRIES


class RequestCountersTests(SynchronousTestCase):
    def test_unused(self) -> None:
        self.assertEqual(
            RequestCounters().stats("p", None),
            BucketStats(bucket="default", request_count=0, percentage=0.0, last_used=None),
        )

    def test_counts_and_shares(self) -> None:
        counters = RequestCounters()
        counters.record("p", None, 10.0)
        counters.record("p", "default", 11.0)
        counters.record("p", "work", 12.5)
        counters.record("p", "work", 13.0)
        counters.record("other", None, 14.0)  # another provider's share is its own
        self.assertEqual(
            counters.stats("p", "work"),
            BucketStats(bucket="work", request_count=2, percentage=50.0, last_used=13.0),
        )
        self.assertEqual(counters.stats("p", None).request_count, 2)
        self.assertEqual(counters.stats("other", None).percentage, 100.0)

    def test_forget(self) -> None:
        counters = RequestCounters()
        counters.record("p", "work", 1.0)
        counters.record("p", None, 2.0)
        counters.forget("p", "work")
        self.assertEqual(counters.stats("p", "work").request_count, 0)
        self.assertEqual(counters.stats("p", None).percentage, 100.0)
        counters.forget("p", "never")  # no error

    def test_bounded_least_recently_used_goes(self) -> None:
        counters = RequestCounters(max_entries=2)
        counters.record("p", "a", 1.0)
        counters.record("p", "b", 2.0)
        counters.record("p", "a", 3.0)  # a is now the most recent
        counters.record("p", "c", 4.0)  # b goes
        self.assertEqual(len(counters), 2)
        self.assertEqual(counters.stats("p", "b").request_count, 0)
        self.assertEqual(counters.stats("p", "a").request_count, 2)
        self.assertEqual(counters.stats("p", "c").request_count, 1)

    def test_default_bound(self) -> None:
        counters = RequestCounters()
        for i in range(MAX_COUNTED_ENTRIES + 10):
            counters.record("p", f"b{i}", float(i))
        self.assertEqual(len(counters), MAX_COUNTED_ENTRIES)
        self.assertEqual(counters.stats("p", "b0").request_count, 0)
        self.assertEqual(counters.stats("p", f"b{MAX_COUNTED_ENTRIES + 9}").request_count, 1)

    def test_refuses_no_room(self) -> None:
        self.assertRaises(ValueError, RequestCounters, 0)
