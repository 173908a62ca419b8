"""The HTTP transport serves TLS itself: a self-signed certificate, TLS 1.2 as the floor.

The certificate is generated here with `cryptography`. A client that trusts it connects and runs MCP; a
client that offers at most TLS 1.1 (with its own security level lowered, so only the server can refuse)
is refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import warnings
from pathlib import Path

import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mcp_fhir.cli.main import MIN_TLS_VERSION, _tls_context
from tests.integration._ops_harness import ApiKeyIdentity, ServedSidecar, http_config
from tests.testbed import data
from tests.testbed.sidecar import NURSE

pytestmark = pytest.mark.integration


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture
def nurse() -> ApiKeyIdentity:
    return ApiKeyIdentity(NURSE)


@pytest.fixture
def tls_sidecar(tmp_path: Path, fhir_server, nurse):
    cert, key = self_signed(tmp_path)
    cfg = http_config(tmp_path, fhir_server.base_url, [nurse])
    cfg["server"].update(tls_cert_file=str(cert), tls_key_file=str(key))
    served = ServedSidecar(tmp_path, cfg)
    served.verify = ssl.create_default_context(cafile=str(cert))
    with served:
        yield served


async def test_a_client_that_trusts_the_certificate_runs_mcp_over_tls(tls_sidecar, nurse):
    assert tls_sidecar.base_url.startswith("https://")
    async with tls_sidecar.client(nurse.key) as client:
        result = await client.call_tool(
            "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    assert not result.is_error


def test_plain_http_to_the_tls_port_gets_no_mcp_answer(tls_sidecar):
    with pytest.raises(httpx2.HTTPError):
        httpx2.get(tls_sidecar.base_url.replace("https://", "http://") + "/healthz", timeout=5.0)


def test_a_client_limited_to_tls_1_1_is_refused(tls_sidecar):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(tls_sidecar.base_url + "/healthz", timeout=5.0, verify=old)
    modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    modern.check_hostname = False
    modern.verify_mode = ssl.CERT_NONE
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    assert httpx2.get(tls_sidecar.base_url + "/healthz", timeout=5.0, verify=modern).status_code == 200


def test_the_served_tls_context_raises_a_lower_platform_floor_to_tls_1_2():
    def permissive() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
        return context

    assert MIN_TLS_VERSION == ssl.TLSVersion.TLSv1_2
    assert _tls_context(None, permissive).minimum_version == ssl.TLSVersion.TLSv1_2


def test_the_served_tls_context_keeps_a_higher_floor():
    def strict() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context

    assert _tls_context(None, strict).minimum_version == ssl.TLSVersion.TLSv1_3
