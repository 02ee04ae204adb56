"""
The default agent verifies TLS: a token endpoint whose certificate the
platform does not trust gets no request (a transient failure), and the same
endpoint works once its CA is the agent's trust root. The CA is made for
each test, so nothing here is trusted anywhere else.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.ssl import Certificate, PrivateCertificate

from credproxy._secret import Secret
from credproxy.oauth import (
    AnthropicPKCEProvider,
    Detail,
    OAuthError,
    OAuthErrorKind,
    default_oauth_agent,
)
from credproxy.testing import FakeOAuthServer

# Twisted's server-side TLS options go through pyOpenSSL, which warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(minutes=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), False
        )
    return builder.sign(signer, hashes.SHA256())


@pytest_twisted.async_yield_fixture
async def tls_server() -> AsyncIterator[tuple[FakeOAuthServer, bytes]]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "credproxy oauth test CA")])
    ca = _certificate("credproxy oauth test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate("localhost", key, ca_name, ca_key, ca=False)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + leaf.public_bytes(serialization.Encoding.PEM)
    server = FakeOAuthServer(reactor)
    options = PrivateCertificate.loadPEM(pem).options()
    port = reactor.listenSSL(0, server.site(), options, interface="127.0.0.1")  # type: ignore[attr-defined]
    server.base_url = f"https://localhost:{port.getHost().port}"
    try:
        yield server, ca.public_bytes(serialization.Encoding.PEM)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_untrusted_endpoint_gets_no_request(
    tls_server: tuple[FakeOAuthServer, bytes],
) -> None:
    server, _ = tls_server
    provider = AnthropicPKCEProvider(server.pkce_config(), reactor, default_oauth_agent(reactor))
    live = server.issue_token()
    assert live.refresh_token is not None
    with pytest.raises(OAuthError) as caught:
        await provider.refresh(Secret(live.refresh_token))
    assert (caught.value.kind, caught.value.detail) == (
        OAuthErrorKind.TRANSIENT,
        Detail.CONNECTION_FAILED,
    )
    assert server.calls == {}
    assert server.is_live(live.refresh_token)


@pytest_twisted.ensureDeferred
async def test_an_injected_trust_root(tls_server: tuple[FakeOAuthServer, bytes]) -> None:
    server, ca_pem = tls_server
    agent = default_oauth_agent(reactor, trust_root=Certificate.loadPEM(ca_pem))
    provider = AnthropicPKCEProvider(server.pkce_config(), reactor, agent)
    live = server.issue_token()
    assert live.refresh_token is not None
    token = await provider.refresh(Secret(live.refresh_token))
    assert token.access_token == server.access_tokens[-1]
    # The name is checked too: the same server as 127.0.0.1 is not "localhost".
    server.base_url = server.base_url.replace("localhost", "127.0.0.1")
    renamed = AnthropicPKCEProvider(server.pkce_config(), reactor, agent)
    assert token.refresh_token is not None
    with pytest.raises(OAuthError) as caught:
        await renamed.refresh(Secret(token.refresh_token))
    assert caught.value.detail == Detail.CONNECTION_FAILED
    assert server.calls == {FakeOAuthServer.TOKEN_PATH: 1}
