"""
Credential sources: which environment variable wins, the broker source's
order (environment, stored key, stored OAuth token), its refreshing,
replacing and counting through a real broker, and that no value shows.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from credproxy._secret import Secret
from credproxy.broker.credentials import (
    TOKEN_MIN_VALIDITY,
    BrokerCredentialSource,
    CredentialKind,
    CredentialUnavailable,
    EnvironmentCredentialSource,
    FirstAvailableCredentialSource,
    ICredentialSource,
    UpstreamCredential,
)
from credproxy.oauth._interfaces import OAuthError, OAuthErrorKind
from tests.http.doubles import BrokerWorld
from tests.logcapture import captured_log, log_text

API_KEY = "sk-ant-api03-test-key-value"
OAUTH = "sk-ant-oat01-test-oauth-value"


class EnvironmentSourceTests(SynchronousTestCase):
    def current(self, source: ICredentialSource) -> UpstreamCredential | None:
        result: UpstreamCredential | None = self.successResultOf(source.current_credential())
        return result

    def test_provides_the_interface(self) -> None:
        verifyObject(ICredentialSource, EnvironmentCredentialSource({}))

    def test_api_key(self) -> None:
        credential = self.current(EnvironmentCredentialSource({"ANTHROPIC_API_KEY": API_KEY}))
        assert credential is not None
        self.assertEqual(credential.kind, CredentialKind.API_KEY)
        self.assertEqual(credential.secret.reveal(), API_KEY)

    def test_oauth(self) -> None:
        credential = self.current(EnvironmentCredentialSource({"CLAUDE_CODE_OAUTH_TOKEN": OAUTH}))
        assert credential is not None
        self.assertEqual(credential.kind, CredentialKind.OAUTH)
        self.assertEqual(credential.secret.reveal(), OAUTH)

    def test_api_key_wins_over_oauth(self) -> None:
        credential = self.current(
            EnvironmentCredentialSource(
                {"ANTHROPIC_API_KEY": API_KEY, "CLAUDE_CODE_OAUTH_TOKEN": OAUTH}
            )
        )
        assert credential is not None
        self.assertEqual(credential.kind, CredentialKind.API_KEY)

    def test_blank_values_are_absent(self) -> None:
        self.assertIsNone(
            self.current(
                EnvironmentCredentialSource(
                    {"ANTHROPIC_API_KEY": " ", "CLAUDE_CODE_OAUTH_TOKEN": ""}
                )
            )
        )

    def test_how_to_configure_names_the_variables(self) -> None:
        text = EnvironmentCredentialSource({}).how_to_configure()
        self.assertIn("ANTHROPIC_API_KEY", text)
        self.assertIn("CLAUDE_CODE_OAUTH_TOKEN", text)

    def test_no_value_in_reprs(self) -> None:
        source = EnvironmentCredentialSource({"ANTHROPIC_API_KEY": API_KEY})
        credential = self.current(source)
        for shown in (repr(source), repr(credential), str(credential)):
            self.assertNotIn(API_KEY, shown)

    def test_nothing_to_count_or_replace(self) -> None:
        source = EnvironmentCredentialSource({"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})
        credential = self.current(source)
        assert credential is not None
        self.assertFalse(credential.replaceable)
        source.credential_used(credential)
        self.assertIsNone(self.successResultOf(source.credential_rejected(credential)))

    def test_describe_names_the_variable_never_the_value(self) -> None:
        described = self.successResultOf(
            EnvironmentCredentialSource({"CLAUDE_CODE_OAUTH_TOKEN": OAUTH}).describe()
        )
        self.assertEqual(described, "an OAuth token from CLAUDE_CODE_OAUTH_TOKEN")
        described = self.successResultOf(
            EnvironmentCredentialSource({"ANTHROPIC_API_KEY": API_KEY}).describe()
        )
        self.assertEqual(described, "an API key from ANTHROPIC_API_KEY")
        self.assertIsNone(self.successResultOf(EnvironmentCredentialSource({}).describe()))


@implementer(ICredentialSource)
class Fixed:
    def __init__(
        self,
        credential: UpstreamCredential | None,
        replacement: UpstreamCredential | None = None,
    ) -> None:
        self.credential = credential
        self.replacement = replacement
        self.asked = 0
        self.used: list[UpstreamCredential] = []
        self.rejected: list[UpstreamCredential] = []

    def current_credential(self) -> Deferred[UpstreamCredential | None]:
        self.asked += 1
        return succeed(self.credential)

    def how_to_configure(self) -> str:
        return "fixed"

    def credential_used(self, credential: UpstreamCredential) -> None:
        self.used.append(credential)

    def credential_rejected(
        self, credential: UpstreamCredential
    ) -> Deferred[UpstreamCredential | None]:
        self.rejected.append(credential)
        return succeed(self.replacement)

    def describe(self) -> Deferred[str | None]:
        return succeed(f"fixed {self.credential.source}" if self.credential else None)


class FirstAvailableTests(SynchronousTestCase):
    def test_first_credential_wins_and_later_sources_are_not_asked(self) -> None:
        empty = Fixed(None)
        first = Fixed(UpstreamCredential(CredentialKind.OAUTH, Secret("a"), "one"))
        second = Fixed(UpstreamCredential(CredentialKind.API_KEY, Secret("b"), "two"))
        chain = FirstAvailableCredentialSource([empty, first, second])
        credential = self.successResultOf(chain.current_credential())
        assert credential is not None
        self.assertEqual(credential.source, "one")
        self.assertEqual((empty.asked, first.asked, second.asked), (1, 1, 0))

    def test_none_when_all_empty(self) -> None:
        chain = FirstAvailableCredentialSource([Fixed(None), Fixed(None)])
        self.assertIsNone(self.successResultOf(chain.current_credential()))
        self.assertEqual(chain.how_to_configure(), "fixed; or fixed")

    def test_use_and_rejection_go_to_the_source_that_gave_the_credential(self) -> None:
        replacement = UpstreamCredential(CredentialKind.OAUTH, Secret("c"), "one", "p", "b")
        empty = Fixed(None)
        first = Fixed(
            UpstreamCredential(CredentialKind.OAUTH, Secret("a"), "one", "p", "b"), replacement
        )
        second = Fixed(UpstreamCredential(CredentialKind.API_KEY, Secret("b"), "two"))
        chain = FirstAvailableCredentialSource([empty, first, second])
        credential = self.successResultOf(chain.current_credential())
        assert credential is not None
        chain.credential_used(credential)
        self.assertEqual(self.successResultOf(chain.credential_rejected(credential)), replacement)
        chain.credential_used(replacement)  # the replacement is known to come from `first` too
        self.assertEqual((first.used, first.rejected), ([credential, replacement], [credential]))
        self.assertEqual((empty.used, second.used, empty.rejected, second.rejected), ([],) * 4)

    def test_a_credential_it_did_not_give_has_no_replacement(self) -> None:
        stranger = UpstreamCredential(CredentialKind.OAUTH, Secret("z"), "elsewhere", "p", "b")
        source = Fixed(None, replacement=stranger)
        chain = FirstAvailableCredentialSource([source])
        self.assertIsNone(self.successResultOf(chain.credential_rejected(stranger)))
        chain.credential_used(stranger)
        self.assertEqual((source.used, source.rejected), ([], []))

    def test_describe_is_the_first_sources(self) -> None:
        chain = FirstAvailableCredentialSource(
            [Fixed(None), Fixed(UpstreamCredential(CredentialKind.API_KEY, Secret("b"), "two"))]
        )
        self.assertEqual(self.successResultOf(chain.describe()), "fixed two")
        self.assertIsNone(self.successResultOf(FirstAvailableCredentialSource([]).describe()))


STORED_KEY = "sk-ant-api03-stored-key-value-0123"
STORED_TOKEN = "sk-ant-oat01-stored-access-token-0123"


class BrokerSourceTests(SynchronousTestCase):
    """
    L{BrokerCredentialSource} over a real broker with memory stores, a Clock
    and an in-memory token endpoint.
    """

    def setUp(self) -> None:
        self.world = BrokerWorld()

    def source(
        self, environ: dict[str, str] | None = None, **kwargs: str
    ) -> BrokerCredentialSource:
        return BrokerCredentialSource(self.world.broker, environ=environ or {}, **kwargs)

    def current(self, source: ICredentialSource) -> UpstreamCredential | None:
        result: UpstreamCredential | None = self.successResultOf(source.current_credential())
        return result

    def unavailable(self, d: Deferred[UpstreamCredential | None]) -> CredentialUnavailable:
        error = self.failureResultOf(d, CredentialUnavailable).value
        assert isinstance(error, CredentialUnavailable)
        return error

    def test_provides_the_interface(self) -> None:
        verifyObject(ICredentialSource, self.source())

    # -- the order ------------------------------------------------------------------

    def test_environment_api_key_comes_first(self) -> None:
        self.world.store_key(STORED_KEY)
        self.world.store_token(STORED_TOKEN)
        credential = self.current(
            self.source({"ANTHROPIC_API_KEY": API_KEY, "CLAUDE_CODE_OAUTH_TOKEN": OAUTH})
        )
        assert credential is not None
        self.assertEqual(
            (credential.kind, credential.secret.reveal()), (CredentialKind.API_KEY, API_KEY)
        )
        self.assertEqual((credential.provider, credential.bucket), (None, None))

    def test_then_the_environment_oauth_token(self) -> None:
        self.world.store_key(STORED_KEY)
        self.world.store_token(STORED_TOKEN)
        credential = self.current(self.source({"CLAUDE_CODE_OAUTH_TOKEN": OAUTH}))
        assert credential is not None
        self.assertEqual(
            (credential.kind, credential.secret.reveal()), (CredentialKind.OAUTH, OAUTH)
        )
        self.assertFalse(credential.replaceable)

    def test_the_environment_is_read_once(self) -> None:
        environ = {"ANTHROPIC_API_KEY": API_KEY}
        source = self.source(environ)
        environ["ANTHROPIC_API_KEY"] = "sk-ant-api03-changed-later"
        credential = self.current(source)
        assert credential is not None
        self.assertEqual(credential.secret.reveal(), API_KEY)

    def test_then_the_stored_api_key(self) -> None:
        self.world.store_key(STORED_KEY)
        self.world.store_token(STORED_TOKEN)
        credential = self.current(self.source())
        assert credential is not None
        self.assertEqual(
            (credential.kind, credential.secret.reveal()), (CredentialKind.API_KEY, STORED_KEY)
        )
        self.assertEqual((credential.provider, credential.bucket), (None, None))
        self.assertFalse(credential.replaceable)

    def test_a_key_of_another_name_is_not_used(self) -> None:
        self.world.store_key(STORED_KEY, name="openai")
        self.world.store_token(STORED_TOKEN)
        credential = self.current(self.source())
        assert credential is not None
        self.assertEqual(credential.kind, CredentialKind.OAUTH)
        credential = self.current(self.source(key_name="openai"))
        assert credential is not None
        self.assertEqual(credential.secret.reveal(), STORED_KEY)

    def test_an_empty_stored_key_is_absent(self) -> None:
        self.world.store_key("")
        self.world.store_token(STORED_TOKEN)
        credential = self.current(self.source())
        assert credential is not None
        self.assertEqual(credential.kind, CredentialKind.OAUTH)

    def test_then_the_stored_oauth_token_of_the_bucket(self) -> None:
        self.world.store_token(STORED_TOKEN)
        self.world.store_token("sk-ant-oat01-work-bucket-token-0123", bucket="work")
        credential = self.current(self.source())
        assert credential is not None
        self.assertEqual(
            (credential.kind, credential.secret.reveal()), (CredentialKind.OAUTH, STORED_TOKEN)
        )
        self.assertEqual((credential.provider, credential.bucket), ("anthropic", "default"))
        self.assertTrue(credential.replaceable)
        credential = self.current(self.source(bucket="work"))
        assert credential is not None
        self.assertEqual(credential.secret.reveal(), "sk-ant-oat01-work-bucket-token-0123")
        self.assertEqual(credential.bucket, "work")

    def test_a_login_after_start_is_picked_up(self) -> None:
        source = self.source()
        self.assertIsNone(self.current(source))
        self.world.store_token(STORED_TOKEN)
        credential = self.current(source)
        assert credential is not None
        self.assertEqual(credential.secret.reveal(), STORED_TOKEN)

    def test_none_when_nothing_is_configured(self) -> None:
        source = self.source()
        self.assertIsNone(self.current(source))
        advice = source.how_to_configure()
        for named in (
            "`credproxy login anthropic` on the host",
            "ANTHROPIC_API_KEY",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "'anthropic'",
        ):
            self.assertIn(named, advice)

    # -- refreshing -----------------------------------------------------------------

    def test_a_token_valid_beyond_the_margin_is_used_as_stored(self) -> None:
        self.world.store_token(STORED_TOKEN, expires_in=TOKEN_MIN_VALIDITY + 5)
        credential = self.current(self.source())
        assert credential is not None
        self.assertEqual(credential.secret.reveal(), STORED_TOKEN)
        self.assertEqual(self.world.endpoint.refreshes, 0)

    def test_a_token_expiring_within_the_margin_is_refreshed_first(self) -> None:
        self.assertEqual(TOKEN_MIN_VALIDITY, 60.0)
        self.world.store_token(STORED_TOKEN, expires_in=TOKEN_MIN_VALIDITY - 5)
        credential = self.current(self.source())
        assert credential is not None
        self.assertEqual(self.world.endpoint.refreshes, 1)
        self.assertEqual(credential.secret.reveal(), "sk-ant-oat01-refreshed-01-access")
        stored = self.successResultOf(self.world.tokens.get_token("anthropic"))
        assert stored is not None
        self.assertEqual(stored.access_token, "sk-ant-oat01-refreshed-01-access")

    def test_a_refused_refresh_asks_for_a_login_on_the_host(self) -> None:
        self.world.store_token(STORED_TOKEN, expires_in=-10)
        self.world.endpoint.refuse()
        with captured_log() as events:
            error = self.unavailable(self.source().current_credential())
        self.assertFalse(error.transient)
        self.assertIn("run `credproxy login anthropic` on the host", error.message)
        self.assertNotIn("invalid_grant", error.message)  # the provider's words stay out
        for shown in (error.message, repr(error), str(error), log_text(events)):
            self.assertNotIn(STORED_TOKEN, shown)
            self.assertNotIn("sk-ant-ort01-stored-refresh-token", shown)

    def test_an_expired_token_without_a_refresh_token_asks_for_a_login(self) -> None:
        self.world.store_token(STORED_TOKEN, expires_in=-10, refresh=None)
        error = self.unavailable(self.source().current_credential())
        self.assertFalse(error.transient)
        self.assertIn("`credproxy login anthropic`", error.message)
        self.assertEqual(self.world.endpoint.refreshes, 0)

    def test_an_unreachable_token_endpoint_is_transient(self) -> None:
        self.world.store_token(STORED_TOKEN, expires_in=-10)
        self.world.endpoint.failure = OAuthError(OAuthErrorKind.TRANSIENT, "503")
        d = self.source().current_credential()
        for _ in range(10):  # past the broker's retry delays
            self.world.clock.advance(5)
        error = self.unavailable(d)
        self.assertTrue(error.transient)
        self.assertNotIn("login", error.message)

    # -- replacing ------------------------------------------------------------------

    def test_a_rejected_stored_token_is_replaced_by_a_refresh(self) -> None:
        self.world.store_token(STORED_TOKEN)
        source = self.source()
        credential = self.current(source)
        assert credential is not None
        replacement = self.successResultOf(source.credential_rejected(credential))
        assert replacement is not None
        self.assertEqual(replacement.secret.reveal(), "sk-ant-oat01-refreshed-01-access")
        self.assertEqual((replacement.provider, replacement.bucket), ("anthropic", "default"))
        self.assertTrue(replacement.replaceable)
        self.assertEqual(self.world.endpoint.refreshes, 1)

    def test_a_token_stored_meanwhile_replaces_without_a_refresh(self) -> None:
        self.world.store_token(STORED_TOKEN)
        source = self.source()
        credential = self.current(source)
        assert credential is not None
        self.world.store_token("sk-ant-oat01-stored-by-another-process")
        replacement = self.successResultOf(source.credential_rejected(credential))
        assert replacement is not None
        self.assertEqual(replacement.secret.reveal(), "sk-ant-oat01-stored-by-another-process")
        self.assertEqual(self.world.endpoint.refreshes, 0)

    def test_a_rejected_token_that_cannot_be_refreshed_asks_for_a_login(self) -> None:
        self.world.store_token(STORED_TOKEN)
        self.world.endpoint.refuse()
        source = self.source()
        credential = self.current(source)
        assert credential is not None
        error = self.unavailable(source.credential_rejected(credential))
        self.assertIn("`credproxy login anthropic`", error.message)

    def test_keys_and_environment_tokens_have_no_replacement(self) -> None:
        self.world.store_key(STORED_KEY)
        for source in (self.source(), self.source({"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})):
            credential = self.current(source)
            assert credential is not None
            self.assertIsNone(self.successResultOf(source.credential_rejected(credential)))
        self.assertEqual(self.world.endpoint.refreshes, 0)

    # -- counting -------------------------------------------------------------------

    def test_use_of_a_stored_token_counts_against_its_bucket(self) -> None:
        self.world.store_token(STORED_TOKEN)
        self.world.store_token("sk-ant-oat01-work-bucket-token-0123", bucket="work")
        source = self.source(bucket="work")
        credential = self.current(source)
        assert credential is not None
        source.credential_used(credential)
        source.credential_used(credential)
        self.assertEqual(
            (self.world.requests_counted("work"), self.world.requests_counted("default")), (2, 0)
        )

    def test_environment_credentials_and_keys_are_not_counted(self) -> None:
        self.world.store_token(STORED_TOKEN)
        self.world.store_key(STORED_KEY)
        for source in (self.source({"CLAUDE_CODE_OAUTH_TOKEN": OAUTH}), self.source()):
            credential = self.current(source)
            assert credential is not None
            source.credential_used(credential)
        self.assertEqual(self.world.requests_counted(), 0)

    # -- describing -----------------------------------------------------------------

    def describe(self, source: ICredentialSource) -> str | None:
        described: str | None = self.successResultOf(source.describe())
        return described

    def test_describe_says_which_credential_without_its_value(self) -> None:
        self.assertIsNone(self.describe(self.source()))
        self.world.store_token(STORED_TOKEN, refresh=None)
        self.assertEqual(
            self.describe(self.source()),
            "an OAuth token from the token store (anthropic, bucket default), without a refresh "
            "token (run `credproxy login anthropic` on the host when it expires)",
        )
        self.world.store_token(STORED_TOKEN)
        self.assertEqual(
            self.describe(self.source()),
            "an OAuth token from the token store (anthropic, bucket default), refreshed by "
            "credproxy before it expires",
        )
        self.world.store_key(STORED_KEY)
        self.assertEqual(self.describe(self.source()), "an API key from the key store (anthropic)")
        self.assertEqual(
            self.describe(self.source({"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})),
            "an OAuth token from CLAUDE_CODE_OAUTH_TOKEN",
        )

    def test_describe_does_not_refresh(self) -> None:
        self.world.store_token(STORED_TOKEN, expires_in=-10)
        self.assertIsNotNone(self.describe(self.source()))
        self.assertEqual(self.world.endpoint.refreshes, 0)

    def test_no_value_in_reprs(self) -> None:
        self.world.store_token(STORED_TOKEN)
        source = self.source({"CLAUDE_CODE_OAUTH_TOKEN": OAUTH})
        stored = self.current(self.source())
        for shown in (repr(source), repr(stored), str(stored)):
            self.assertNotIn(STORED_TOKEN, shown)
            self.assertNotIn(OAUTH, shown)
        self.assertIn("provider='anthropic'", repr(stored))
