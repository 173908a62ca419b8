"""Outbound TLS context (mcp_fhir/ehr/tls.py), against a real TLS server on loopback."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.ehr.tls import build_ssl_context

HANDSHAKE_TIMEOUT = 10.0


@dataclass
class Pki:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, subject: str, *, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA384()), key


@pytest.fixture(scope="module")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("mcp-fhir test CA")
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
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
        .sign(ca_key, hashes.SHA384())
    )
    (base / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = _issue(ca_key, ca_name, "localhost", server=True)
    client_cert, client_key = _issue(ca_key, ca_name, "mcp-fhir sidecar", server=False)
    (base / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    (base / "client.pem").write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca_file=base / "ca.pem",
        server_cert=base / "server.pem",
        server_key=_write_key(base / "server.key", server_key),
        client_cert=base / "client.pem",
        client_key=_write_key(base / "client.key", client_key),
    )


async def _serve(pki: Pki, *, require_client_cert: bool) -> AsyncIterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=pki.ca_file)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"hello\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def tls_server_port(tls_pki: Pki) -> AsyncIterator[int]:
    async for port in _serve(tls_pki, require_client_cert=False):
        yield port


@pytest.fixture
async def mtls_server_port(tls_pki: Pki) -> AsyncIterator[int]:
    async for port in _serve(tls_pki, require_client_cert=True):
        yield port


async def _greeting(port: int, context: ssl.SSLContext, server_hostname: str = "localhost") -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname),
        HANDSHAKE_TIMEOUT,
    )
    try:
        return await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT)
    finally:
        writer.close()


def test_the_context_verifies_certificates_and_hostnames_from_tls_1_2_up() -> None:
    context = build_ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_a_server_signed_by_an_unknown_ca_is_rejected(tls_server_port: int) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await _greeting(tls_server_port, build_ssl_context())


async def test_a_server_signed_by_the_configured_ca_is_accepted(tls_pki: Pki, tls_server_port: int) -> None:
    assert await _greeting(tls_server_port, build_ssl_context(ca_bundle=tls_pki.ca_file)) == b"hello\n"


async def test_a_hostname_that_the_certificate_does_not_name_is_rejected(
    tls_pki: Pki, tls_server_port: int
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await _greeting(tls_server_port, build_ssl_context(ca_bundle=tls_pki.ca_file), "ehr.example.org")


async def test_a_server_demanding_a_client_certificate_accepts_ours(
    tls_pki: Pki, mtls_server_port: int
) -> None:
    context = build_ssl_context(tls_pki.ca_file, tls_pki.client_cert, tls_pki.client_key)
    assert await _greeting(mtls_server_port, context) == b"hello\n"


async def test_a_server_demanding_a_client_certificate_refuses_us_without_one(
    tls_pki: Pki, mtls_server_port: int
) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        line = await _greeting(mtls_server_port, build_ssl_context(ca_bundle=tls_pki.ca_file))
        if not line:
            raise ConnectionError("closed without greeting")


def test_an_unreadable_ca_bundle_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_ssl_context(ca_bundle=tmp_path / "missing.pem", prefix="backends.epic.smart")
    assert info.value.key == "backends.epic.smart.ca_bundle"


def test_a_client_key_without_a_certificate_is_a_config_error(tls_pki: Pki) -> None:
    with pytest.raises(ConfigError) as info:
        build_ssl_context(client_key=tls_pki.client_key)
    assert info.value.key == "tls.client_key"


def test_a_client_certificate_that_does_not_match_its_key_is_a_config_error(tls_pki: Pki) -> None:
    with pytest.raises(ConfigError) as info:
        build_ssl_context(client_cert=tls_pki.client_cert, client_key=tls_pki.server_key)
    assert info.value.key == "tls.client_cert"
