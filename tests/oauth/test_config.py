"""
The OAuth config file: defaults without one, overrides of the built-in
provider, device-code providers, and one exact line for each way a file can
be wrong (never repeating a value).
"""

from __future__ import annotations

import os
import tempfile

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from credproxy._secret import Secret
from credproxy.oauth import (
    ANTHROPIC,
    MAX_CONFIG_BYTES,
    AnthropicPKCEProvider,
    DeviceCodeProvider,
    DeviceCodeProviderConfig,
    FlowType,
    IDeviceCodeProvider,
    IPKCEProvider,
    OAuthConfigError,
    PKCEProviderConfig,
    build_providers,
    default_oauth_config,
    load_oauth_config,
    parse_oauth_config,
)

DEVICE = """
[oauth.example]
flow = "device_code"
device_authorization_url = "https://idp.example/device/code"
token_url = "https://idp.example/token"
client_id = "credproxy"
scopes = ["openid"]
"""


class DefaultsTests(SynchronousTestCase):
    def test_without_a_file_anthropic_has_the_public_defaults(self) -> None:
        for config in (default_oauth_config(), load_oauth_config(None), parse_oauth_config("")):
            self.assertEqual(dict(config.providers), {"anthropic": ANTHROPIC})
        self.assertEqual(ANTHROPIC.authorize_url, "https://claude.ai/oauth/authorize")
        self.assertEqual(ANTHROPIC.token_url, "https://console.anthropic.com/v1/oauth/token")
        self.assertEqual(ANTHROPIC.client_id, "9d1c250a-e61b-44d9-88ed-5944d1962f5e")
        self.assertEqual(
            ANTHROPIC.redirect_uri, "https://console.anthropic.com/oauth/code/callback"
        )
        self.assertEqual(ANTHROPIC.scopes, ("org:create_api_key", "user:profile", "user:inference"))

    def test_anthropic_overrides_keep_the_other_defaults(self) -> None:
        config = parse_oauth_config(
            '[oauth.anthropic]\ntoken_url = "https://platform.claude.com/v1/oauth/token"\n'
        )
        self.assertEqual(
            config.providers["anthropic"],
            PKCEProviderConfig(
                name="anthropic",
                authorize_url=ANTHROPIC.authorize_url,
                token_url="https://platform.claude.com/v1/oauth/token",
                client_id=ANTHROPIC.client_id,
                redirect_uri=ANTHROPIC.redirect_uri,
                scopes=ANTHROPIC.scopes,
            ),
        )

    def test_the_documented_example(self) -> None:
        text = (
            "[oauth.anthropic]\n"
            'authorize_url = "https://claude.ai/oauth/authorize"\n'
            'token_url = "https://console.anthropic.com/v1/oauth/token"\n'
            'client_id = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"\n'
            'redirect_uri = "https://console.anthropic.com/oauth/code/callback"\n'
            'scopes = ["org:create_api_key", "user:profile", "user:inference"]\n' + DEVICE
        )
        config = parse_oauth_config(text)
        self.assertEqual(config.providers["anthropic"], ANTHROPIC)
        self.assertEqual(
            config.providers["example"],
            DeviceCodeProviderConfig(
                name="example",
                device_authorization_url="https://idp.example/device/code",
                token_url="https://idp.example/token",
                client_id="credproxy",
                scopes=("openid",),
            ),
        )

    def test_another_pkce_provider(self) -> None:
        config = parse_oauth_config(
            "[oauth.other]\n"
            'flow = "pkce"\n'
            'authorize_url = "https://idp.example/authorize"\n'
            'token_url = "https://idp.example/token"\n'
            'client_id = "c"\n'
            'redirect_uri = "http://localhost:8976/callback"\n'
            "scopes = []\n"
        )
        self.assertEqual(
            config.providers["other"],
            PKCEProviderConfig(
                "other",
                "https://idp.example/authorize",
                "https://idp.example/token",
                "c",
                "http://localhost:8976/callback",
                (),
            ),
        )

    def test_device_scopes_are_optional_and_a_client_secret_is_hidden(self) -> None:
        text = DEVICE.replace('scopes = ["openid"]', 'client_secret = "very-secret-value"')
        settings = parse_oauth_config(text).providers["example"]
        assert isinstance(settings, DeviceCodeProviderConfig)
        self.assertEqual(settings.scopes, ())
        self.assertEqual(settings.client_secret, Secret("very-secret-value"))
        self.assertNotIn("very-secret-value", repr(settings))

    def test_loopback_endpoints_may_be_plain_http(self) -> None:
        for host in ("127.0.0.1", "127.8.9.10:8080", "[::1]:99", "localhost", "LOCALHOST:1"):
            url = f"http://{host}/token"
            config = parse_oauth_config(DEVICE.replace("https://idp.example/token", url))
            settings = config.providers["example"]
            assert isinstance(settings, DeviceCodeProviderConfig)
            self.assertEqual(settings.token_url, url)


class ErrorTests(SynchronousTestCase):
    """
    Each bad file fails with exactly one line naming the key.
    """

    def check(self, text: str, message: str, secret: str | None = None) -> None:
        with self.assertRaises(OAuthConfigError) as caught:
            parse_oauth_config(text, "creds.toml")
        self.assertEqual(str(caught.exception), message)
        self.assertNotIn("\n", str(caught.exception))
        if secret is not None:
            self.assertNotIn(secret, str(caught.exception))

    def test_invalid_toml_gives_the_line_not_the_text(self) -> None:
        self.check(
            '[oauth.example]\nflow = "device_code"\nclient_secret = hunter2-secret\n',
            "creds.toml: invalid TOML (at line 3, column 17)",
            secret="hunter2",
        )

    def test_unknown_top_level_key(self) -> None:
        self.check('colour = "blue"\n', "colour: unknown key")

    def test_unknown_provider_key(self) -> None:
        self.check(DEVICE + 'colour = "x"\n', "oauth.example.colour: unknown key")
        self.check('[oauth.anthropic]\ncolour = "x"\n', "oauth.anthropic.colour: unknown key")
        self.check(
            "[oauth.anthropic]\ndevice_authorization_url = 'https://a.example/'\n",
            "oauth.anthropic.device_authorization_url: unknown key",
        )

    def test_missing_required_keys(self) -> None:
        self.check(
            DEVICE.replace('token_url = "https://idp.example/token"\n', ""),
            "oauth.example.token_url: missing (required)",
        )
        self.check(
            DEVICE.replace('client_id = "credproxy"\n', ""),
            "oauth.example.client_id: missing (required)",
        )
        self.check(
            '[oauth.other]\nflow = "pkce"\nauthorize_url = "https://a.example/"\n',
            "oauth.other.token_url: missing (required)",
        )

    def test_flow_is_required_beside_anthropic(self) -> None:
        self.check(
            DEVICE.replace('flow = "device_code"\n', ""),
            'oauth.example.flow: missing (required: "device_code" or "pkce")',
        )

    def test_unknown_flow(self) -> None:
        self.check(
            DEVICE.replace('"device_code"', '"implicit"'),
            'oauth.example.flow: unknown flow (expected "device_code" or "pkce")',
        )
        self.check(
            '[oauth.anthropic]\nflow = "device_code"\n',
            'oauth.anthropic.flow: the built-in provider\'s flow is "pkce"',
        )

    def test_wrong_types(self) -> None:
        self.check(DEVICE.replace('"credproxy"', "7"), "oauth.example.client_id: must be a string")
        self.check(
            DEVICE.replace('"https://idp.example/token"', "[]"),
            "oauth.example.token_url: must be a string",
        )
        self.check(DEVICE.replace('"device_code"', "1"), "oauth.example.flow: must be a string")
        self.check("oauth = 3\n", "oauth: must be a table")
        self.check("[oauth]\nexample = 3\n", "oauth.example: must be a table")
        self.check(
            DEVICE + "client_secret = 5\n",
            "oauth.example.client_secret: must be a non-empty string",
        )

    def test_bad_scopes(self) -> None:
        message = "oauth.example.scopes: must be a list of scope names (strings without spaces)"
        for scopes in ('"openid"', "[1]", '["a b"]', '[""]', '["ok", ["nested"]]'):
            self.check(DEVICE.replace('["openid"]', scopes), message)

    def test_bad_client_id(self) -> None:
        message = "oauth.example.client_id: must be a non-empty string without spaces around it"
        for value in ('""', '" padded"', '"line\\nbreak"'):
            self.check(DEVICE.replace('"credproxy"', value), message)

    def test_endpoints_must_be_https_off_loopback(self) -> None:
        for url in (
            "http://idp.example/token",
            "http://127.0.0.1.idp.example/token",
            "ftp://idp.example/token",
            "idp.example/token",
            "https:///token",
            "https://idp.example/token#frag",
            "https://idp.example:99999/token",
            "https://idp.example/to ken",
        ):
            self.check(
                DEVICE.replace("https://idp.example/token", url),
                "oauth.example.token_url: must be an https URL",
            )
        self.check(
            '[oauth.anthropic]\nauthorize_url = "http://claude.ai/oauth/authorize"\n',
            "oauth.anthropic.authorize_url: must be an https URL",
        )
        self.check(
            '[oauth.anthropic]\nredirect_uri = "http://example.com/cb"\n',
            "oauth.anthropic.redirect_uri: must be an https URL",
        )

    def test_endpoints_must_not_carry_credentials(self) -> None:
        self.check(
            DEVICE.replace("https://idp.example/token", "https://user:pw-secret@idp.example/t"),
            "oauth.example.token_url: must not contain credentials",
            secret="pw-secret",
        )

    def test_provider_names(self) -> None:
        self.check(
            DEVICE.replace("[oauth.example]", '[oauth."bad name\\n"]'),
            'oauth."bad name\\n": invalid provider name'
            " (letters, digits, '.', '_', '-'; at most 64)",
        )
        self.check(
            DEVICE.replace("[oauth.example]", f"[oauth.{'a' * 65}]"),
            f"oauth.{'a' * 65}: invalid provider name (letters, digits, '.', '_', '-'; at most 64)",
        )
        ok = parse_oauth_config(DEVICE.replace("[oauth.example]", f'[oauth."{"a" * 64}"]'))
        self.assertIn("a" * 64, ok.providers)

    def test_provider_configs_check_urls_when_built_directly(self) -> None:
        with self.assertRaises(ValueError) as caught:
            DeviceCodeProviderConfig("x", "http://idp.example/", "https://idp.example/", "c")
        self.assertEqual(str(caught.exception), "device_authorization_url: must be an https URL")
        with self.assertRaises(ValueError):
            PKCEProviderConfig("x", "https://a.example/", "http://a.example/", "c", "r", ())


class FileTests(SynchronousTestCase):
    def write(self, content: bytes) -> str:
        fd, path = tempfile.mkstemp(suffix=".toml")
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        return path

    def test_a_file(self) -> None:
        config = load_oauth_config(self.write(DEVICE.encode()))
        self.assertEqual(sorted(config.providers), ["anthropic", "example"])

    def test_a_missing_file(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "absent.toml")
        with self.assertRaises(OAuthConfigError) as caught:
            load_oauth_config(path)
        self.assertEqual(str(caught.exception), f"{path}: No such file or directory")

    def test_the_size_limit(self) -> None:
        padding = b"# " + b"x" * (MAX_CONFIG_BYTES - len(DEVICE) - 3) + b"\n"
        at_limit = DEVICE.encode() + padding
        self.assertEqual(len(at_limit), MAX_CONFIG_BYTES)
        self.assertIn("example", load_oauth_config(self.write(at_limit)).providers)
        path = self.write(at_limit + b"\n")
        with self.assertRaises(OAuthConfigError) as caught:
            load_oauth_config(path)
        self.assertEqual(str(caught.exception), f"{path}: larger than {MAX_CONFIG_BYTES} bytes")

    def test_not_utf8(self) -> None:
        path = self.write(b'[oauth.example]\nclient_id = "\xff"\n')
        with self.assertRaises(OAuthConfigError) as caught:
            load_oauth_config(path)
        self.assertEqual(str(caught.exception), f"{path}: not UTF-8")

    def test_invalid_toml_names_the_file(self) -> None:
        path = self.write(b"[oauth\n")
        with self.assertRaises(OAuthConfigError) as caught:
            load_oauth_config(path)
        self.assertTrue(str(caught.exception).startswith(f"{path}: invalid TOML (at line 1,"))


class BuildTests(SynchronousTestCase):
    def test_one_provider_per_entry(self) -> None:
        providers = build_providers(
            parse_oauth_config(DEVICE), Clock(), RequestTraversalAgent(Resource())
        )
        self.assertEqual(sorted(providers), ["anthropic", "example"])
        anthropic, example = providers["anthropic"], providers["example"]
        assert isinstance(anthropic, AnthropicPKCEProvider)
        assert isinstance(example, DeviceCodeProvider)
        self.assertTrue(verifyObject(IPKCEProvider, anthropic))
        self.assertTrue(verifyObject(IDeviceCodeProvider, example))
        self.assertEqual((anthropic.name, anthropic.flow), ("anthropic", FlowType.PKCE_REDIRECT))
        self.assertEqual((example.name, example.flow), ("example", FlowType.DEVICE_CODE))
        self.assertEqual(repr(example), "<DeviceCodeProvider 'example'>")
