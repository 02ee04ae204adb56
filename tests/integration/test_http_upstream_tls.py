"""
The upstream is reached over verified TLS: an upstream whose certificate the
platform does not trust gets no request (the agent sees 502), and the same
upstream is served once the agent's trust is an injected CA.

The CA and the server certificate are made for each test run, so nothing
here is trusted anywhere else.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from tests.integration.agents import exchange, messages_request
from tests.integration.conftest import REAL_API_KEY, MakeProxy
from tests.integration.upstream import Upstream
from tests.logcapture import captured_log, log_text

# The throwaway upstream's certificate goes through Twisted's pyOpenSSL-based
# server options, which pyOpenSSL now warns about; the proxy side is not involved.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class ThrowawayPKI:
    ca_pem: bytes
    server_pem: bytes  # key and certificate


def make_pki() -> ThrowawayPKI:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("credproxy test CA"))
        .issuer_name(_name("credproxy test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    return ThrowawayPKI(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        server_pem=_pem_key(server_key) + server.public_bytes(serialization.Encoding.PEM),
    )


@dataclass
class TLSUpstream:
    fake: Upstream
    port: IListeningPort
    pki: ThrowawayPKI

    @property
    def url(self) -> str:
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        return f"https://localhost:{address.port}"


@pytest_twisted.async_yield_fixture
async def tls_upstream() -> AsyncIterator[TLSUpstream]:
    pki = make_pki()
    fake = Upstream()
    options = PrivateCertificate.loadPEM(pki.server_pem).options()
    port = reactor.listenSSL(0, fake.site(), options, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        yield TLSUpstream(fake, port, pki)
    finally:
        await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_untrusted_upstream_gets_nothing_and_the_agent_a_502(
    tls_upstream: TLSUpstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(upstream=tls_upstream.url)  # the platform's trust only
    with captured_log() as events:
        response = await exchange(reactor, proxy.path, messages_request())
    assert "ResponseNeverReceived[OpenSSL.SSL.Error]" in log_text(events)
    assert response.status == 502
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "api_error"
    assert tls_upstream.fake.received == []  # the handshake failed: no byte of the request left
    assert REAL_API_KEY.encode() not in response.body


@pytest_twisted.ensureDeferred
async def test_upstream_trusted_through_an_injected_agent(
    tls_upstream: TLSUpstream, make_proxy: MakeProxy
) -> None:
    trust = Certificate.loadPEM(tls_upstream.pki.ca_pem)
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
    proxy = await make_proxy(upstream=tls_upstream.url, agent=agent)
    response = await exchange(reactor, proxy.path, messages_request())
    assert response.status == 200
    (received,) = tls_upstream.fake.received
    assert received.header("x-api-key") == REAL_API_KEY


@pytest_twisted.ensureDeferred
async def test_trust_is_for_the_name_too(tls_upstream: TLSUpstream, make_proxy: MakeProxy) -> None:
    # The certificate names only localhost; the same server reached as
    # 127.0.0.1 fails verification even with the CA trusted.
    trust = Certificate.loadPEM(tls_upstream.pki.ca_pem)
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
    wrong_name = tls_upstream.url.replace("localhost", "127.0.0.1")
    proxy = await make_proxy(upstream=wrong_name, agent=agent)
    with captured_log() as events:
        response = await exchange(reactor, proxy.path, messages_request())
    assert response.status == 502
    assert "ResponseNeverReceived[service_identity.exceptions.VerificationError]" in log_text(
        events
    )
    assert tls_upstream.fake.received == []
