"""
Credential sources: which environment variable wins, and that no value shows.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from credproxy._secret import Secret
from credproxy.broker.credentials import (
    CredentialKind,
    EnvironmentCredentialSource,
    FirstAvailableCredentialSource,
    ICredentialSource,
    UpstreamCredential,
)

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


@implementer(ICredentialSource)
class Fixed:
    def __init__(self, credential: UpstreamCredential | None) -> None:
        self.credential = credential
        self.asked = 0

    def current_credential(self) -> Deferred[UpstreamCredential | None]:
        self.asked += 1
        return succeed(self.credential)

    def how_to_configure(self) -> str:
        return "fixed"


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
