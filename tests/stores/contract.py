"""
What every token store and key store does, whatever backs it, as mixins (in
the manner of Twisted's IntNTestCaseMixin): a test case mixes one in with
C{SynchronousTestCase} and provides C{make_store()}. Stores whose calls need
a running reactor (the proxy-backed ones over a real socket) override
C{wait}.

Where a store legitimately differs, a class attribute says how, and the
behaviour is still checked (never skipped):

  - C{keeps_refresh_token}: through the credential socket a saved refresh
    token is never taken (the save merge) and none is ever returned.
  - C{save_merges}: through the socket a save starts from the stored token,
    so a field the new token lacks survives.
  - C{read_only} (keys): the sandbox side refuses to save or delete keys;
    the keys are then put in place through C{host_keys()}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from credproxy._secret import Secret
from credproxy.stores import (
    BucketStats,
    IHostProviderKeyStore,
    IHostTokenStore,
    IProviderKeyStore,
    ITokenStore,
    Token,
)

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object

_T = TypeVar("_T")

ACCESS = "contract-access-3f9a0c"
REFRESH = "contract-refresh-77b1e2"
KEY = "sk-contract-key-5d04aa"
# Names that a naive "provider:bucket" or "provider/bucket" joining would
# confuse with one another, and characters a backend might mangle. (No empty
# name: the credential socket refuses one.)
AWKWARD = ["a:b", "a", "a/b", "a%2Fb", "a b", "ünï"]
AWKWARD_BUCKETS: list[str | None] = [None, "b:c", "b/c", "a"]


def token(access: str = ACCESS, **extra: Any) -> Token:
    return Token(
        {
            "access_token": access,
            "refresh_token": REFRESH,
            "expiry": 1900000000,
            "token_type": "Bearer",
            **extra,
        }
    )


class TokenStoreContractMixin(_Base):
    """
    The behaviours of L{ITokenStore}.
    """

    keeps_refresh_token: ClassVar[bool] = True
    save_merges: ClassVar[bool] = False
    host_store: ClassVar[bool] = True

    def make_store(self) -> ITokenStore:
        raise NotImplementedError

    def wait(self, d: Deferred[_T]) -> _T:
        return self.successResultOf(d)

    def record_request(self, provider: str, bucket: str | None, when: float) -> None:
        """
        Count a request on the host's store behind the one under test.
        """
        store: Any = self.store
        store.record_request(provider, bucket, when)

    def setUp(self) -> None:
        super().setUp()
        self.store = self.make_store()

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(ITokenStore, self.store))
        if self.host_store:
            self.assertTrue(verifyObject(IHostTokenStore, self.store))
            description = self.store.description  # type: ignore[attr-defined]
            self.assertIsInstance(description, str)
            self.assertTrue(description)

    def test_absent(self) -> None:
        self.assertIsNone(self.wait(self.store.get_token("nobody")))
        self.assertIsNone(self.wait(self.store.get_token("nobody", "work")))
        self.assertEqual(self.wait(self.store.list_buckets("nobody")), [])

    def test_save_and_get(self) -> None:
        self.wait(self.store.save_token("anthropic", token(scope="user:inference")))
        got = self.wait(self.store.get_token("anthropic"))
        assert got is not None
        self.assertIsInstance(got, Token)
        self.assertEqual(got["access_token"], ACCESS)
        self.assertEqual(got.expiry, 1900000000.0)
        self.assertEqual(got["token_type"], "Bearer")
        self.assertEqual(got["scope"], "user:inference")
        if self.keeps_refresh_token:
            self.assertEqual(got.refresh_token, REFRESH)
        else:
            self.assertNotIn("refresh_token", got)

    def test_repr_hides_values(self) -> None:
        self.wait(self.store.save_token("anthropic", token()))
        got = self.wait(self.store.get_token("anthropic"))
        shown = repr(got) + str(got) + repr(self.store)
        self.assertNotIn(ACCESS, shown)
        self.assertNotIn(REFRESH, shown)

    def test_default_bucket(self) -> None:
        self.wait(self.store.save_token("anthropic", token("one")))
        got = self.wait(self.store.get_token("anthropic", "default"))
        self.assertEqual(got and got["access_token"], "one")
        self.wait(self.store.save_token("anthropic", token("two"), "default"))
        got = self.wait(self.store.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "two")
        self.assertEqual(self.wait(self.store.list_buckets("anthropic")), ["default"])

    def test_buckets_are_separate(self) -> None:
        self.wait(self.store.save_token("anthropic", token("main")))
        self.wait(self.store.save_token("anthropic", token("work"), "work"))
        main = self.wait(self.store.get_token("anthropic"))
        work = self.wait(self.store.get_token("anthropic", "work"))
        self.assertEqual(
            (main and main["access_token"], work and work["access_token"]), ("main", "work")
        )
        self.assertEqual(self.wait(self.store.list_buckets("anthropic")), ["default", "work"])

    def test_save_replaces(self) -> None:
        self.wait(self.store.save_token("anthropic", token("old", extra_field="kept?")))
        self.wait(self.store.save_token("anthropic", Token({"access_token": "new"})))
        got = self.wait(self.store.get_token("anthropic"))
        assert got is not None
        self.assertEqual(got["access_token"], "new")
        if self.save_merges:
            self.assertEqual(got["extra_field"], "kept?")
        else:
            self.assertNotIn("extra_field", got)
            self.assertNotIn("refresh_token", got)

    def test_remove(self) -> None:
        self.wait(self.store.save_token("anthropic", token()))
        self.wait(self.store.save_token("anthropic", token(), "work"))
        self.assertIsNone(self.wait(self.store.remove_token("anthropic")))
        self.assertIsNone(self.wait(self.store.get_token("anthropic")))
        self.assertEqual(self.wait(self.store.list_buckets("anthropic")), ["work"])
        self.wait(self.store.remove_token("anthropic", "work"))
        self.assertEqual(self.wait(self.store.list_providers()), [])

    def test_remove_absent(self) -> None:
        self.assertIsNone(self.wait(self.store.remove_token("nobody")))
        self.assertIsNone(self.wait(self.store.remove_token("nobody", "work")))

    def test_list_providers_sorted(self) -> None:
        for provider in ["zeta", "alpha", "mid"]:
            self.wait(self.store.save_token(provider, token()))
        self.wait(self.store.save_token("alpha", token(), "other"))
        self.assertEqual(self.wait(self.store.list_providers()), ["alpha", "mid", "zeta"])

    def test_awkward_names_stay_distinct(self) -> None:
        for i, provider in enumerate(AWKWARD):
            for j, bucket in enumerate(AWKWARD_BUCKETS):
                self.wait(self.store.save_token(provider, token(f"t{i}-{j}"), bucket))
        self.assertEqual(self.wait(self.store.list_providers()), sorted(AWKWARD))
        for i, provider in enumerate(AWKWARD):
            self.assertEqual(
                self.wait(self.store.list_buckets(provider)), ["a", "b/c", "b:c", "default"]
            )
            for j, bucket in enumerate(AWKWARD_BUCKETS):
                got = self.wait(self.store.get_token(provider, bucket))
                self.assertEqual(got and got["access_token"], f"t{i}-{j}", (provider, bucket))

    def test_bucket_stats_absent(self) -> None:
        self.assertIsNone(self.wait(self.store.get_bucket_stats("nobody")))
        self.wait(self.store.save_token("anthropic", token()))
        self.assertIsNone(self.wait(self.store.get_bucket_stats("anthropic", "work")))

    def test_bucket_stats_unused(self) -> None:
        self.wait(self.store.save_token("anthropic", token(), "work"))
        self.assertEqual(
            self.wait(self.store.get_bucket_stats("anthropic", "work")),
            BucketStats(bucket="work", request_count=0, percentage=0.0, last_used=None),
        )

    def test_bucket_stats_count(self) -> None:
        self.wait(self.store.save_token("anthropic", token()))
        self.wait(self.store.save_token("anthropic", token(), "work"))
        self.record_request("anthropic", None, 1700000000.5)
        for when in (1700000001.0, 1700000002.25, 1700000003.0):
            self.record_request("anthropic", "work", when)
        default = self.wait(self.store.get_bucket_stats("anthropic"))
        work = self.wait(self.store.get_bucket_stats("anthropic", "work"))
        assert default is not None and work is not None
        self.assertEqual((default.bucket, default.request_count), ("default", 1))
        self.assertEqual((work.bucket, work.request_count), ("work", 3))
        self.assertAlmostEqual(default.percentage, 25.0)
        self.assertAlmostEqual(work.percentage, 75.0)
        self.assertAlmostEqual(work.last_used or 0.0, 1700000003.0, places=2)

    def test_bucket_stats_gone_with_the_token(self) -> None:
        self.wait(self.store.save_token("anthropic", token()))
        self.record_request("anthropic", None, 1700000000.0)
        self.wait(self.store.remove_token("anthropic"))
        self.assertIsNone(self.wait(self.store.get_bucket_stats("anthropic")))
        self.wait(self.store.save_token("anthropic", token()))
        stats = self.wait(self.store.get_bucket_stats("anthropic"))
        self.assertEqual(stats and stats.request_count, 0)


class KeyStoreContractMixin(_Base):
    """
    The behaviours of L{IProviderKeyStore}.
    """

    read_only: ClassVar[bool] = False
    host_store: ClassVar[bool] = True

    def make_store(self) -> IProviderKeyStore:
        raise NotImplementedError

    def host_keys(self) -> IProviderKeyStore:
        """
        Where keys are saved and deleted when the store under test is read-only.
        """
        return self.store

    def wait(self, d: Deferred[_T]) -> _T:
        return self.successResultOf(d)

    def wait_failure(self, d: Deferred[Any]) -> BaseException:
        error: BaseException = self.failureResultOf(d).value
        return error

    def setUp(self) -> None:
        super().setUp()
        self.store = self.make_store()

    def put(self, name: str, value: str) -> None:
        self.wait(
            (self.host_keys() if self.read_only else self.store).save_key(name, Secret(value))
        )

    def delete(self, name: str) -> bool:
        return self.wait((self.host_keys() if self.read_only else self.store).delete_key(name))

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IProviderKeyStore, self.store))
        if self.host_store:
            self.assertTrue(verifyObject(IHostProviderKeyStore, self.store))
            description = self.store.description  # type: ignore[attr-defined]
            self.assertIsInstance(description, str)
            self.assertTrue(description)

    def test_writes(self) -> None:
        save = self.store.save_key("anthropic", Secret(KEY))
        if self.read_only:
            self.wait_failure(save)
            self.wait_failure(self.store.delete_key("anthropic"))
            self.assertIsNone(self.wait(self.store.get_key("anthropic")))
        else:
            self.assertIsNone(self.wait(save))
            self.assertTrue(self.wait(self.store.delete_key("anthropic")))

    def test_absent(self) -> None:
        self.assertIsNone(self.wait(self.store.get_key("nobody")))
        self.assertFalse(self.wait(self.store.has_key("nobody")))
        self.assertEqual(self.wait(self.store.list_keys()), [])

    def test_save_and_get(self) -> None:
        self.put("anthropic", KEY)
        got = self.wait(self.store.get_key("anthropic"))
        self.assertIsInstance(got, Secret)
        self.assertEqual(got and got.reveal(), KEY)
        self.assertTrue(self.wait(self.store.has_key("anthropic")))
        self.assertNotIn(KEY, repr(got) + repr(self.store))

    def test_replace(self) -> None:
        self.put("anthropic", "first")
        self.put("anthropic", "second")
        got = self.wait(self.store.get_key("anthropic"))
        self.assertEqual(got and got.reveal(), "second")
        self.assertEqual(self.wait(self.store.list_keys()), ["anthropic"])

    def test_delete(self) -> None:
        self.put("anthropic", KEY)
        self.put("openai", KEY)
        self.assertTrue(self.delete("anthropic"))
        self.assertFalse(self.delete("anthropic"))
        self.assertIsNone(self.wait(self.store.get_key("anthropic")))
        self.assertFalse(self.wait(self.store.has_key("anthropic")))
        self.assertEqual(self.wait(self.store.list_keys()), ["openai"])

    def test_list_sorted(self) -> None:
        for name in ["zeta", "alpha", "mid"]:
            self.put(name, KEY)
        self.assertEqual(self.wait(self.store.list_keys()), ["alpha", "mid", "zeta"])

    def test_awkward_names_stay_distinct(self) -> None:
        names = AWKWARD
        for i, name in enumerate(names):
            self.put(name, f"value-{i}")
        self.assertEqual(self.wait(self.store.list_keys()), sorted(names))
        for i, name in enumerate(names):
            got = self.wait(self.store.get_key(name))
            self.assertEqual(got and got.reveal(), f"value-{i}", name)
