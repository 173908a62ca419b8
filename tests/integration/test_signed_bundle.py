"""Signed bundles end to end with the real OPA: verified, refused when tampered, and readiness follows.

OPA downloads the bundle from a loopback HTTP server with the configuration `bundle_config` writes
(the same shape as `examples/opa/opa-config.yaml`), verifies its RS256 signature, and reports each
bundle's state on `/v1/status`. The sidecar (real `build_server`, run by the official MCP client)
is ready only when the active revision equals `opa.expected_revision`.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import io
import tarfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx2
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client

from mcp_fhir import config
from mcp_fhir.governance.bundle import (
    BundleSettings,
    BundleStatus,
    build_bundle,
    bundle_config,
    bundle_status,
)
from mcp_fhir.health import readiness
from mcp_fhir.policy.managed_opa import ManagedOpa
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import NURSE, POLICIES, sidecar_config

pytestmark = pytest.mark.integration

STATUS_DEADLINE = 30.0
POLL = 0.1
TAMPERED_FILE = "mcp_fhir/authz/rbac.rego"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def bundle_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server for the bundle folder: (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv, pub = folder / "priv.pem", folder / "pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return priv, pub


def signed_bundle(out: Path, keys: tuple[Path, Path], revision: str) -> Path:
    build_bundle(BundleSettings(policies=POLICIES, output=out, signing_key=keys[0], verification_key=keys[1],
                                revision=revision))  # fmt: skip
    return out


def tamper(bundle: Path, out: Path) -> Path:
    """Rewrite one policy file inside the tarball, keeping the original signature."""
    buf = io.BytesIO()
    with tarfile.open(bundle, "r:gz") as src, tarfile.open(fileobj=buf, mode="w:gz") as dst:
        for member in src.getmembers():
            content = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name.lstrip("/") == TAMPERED_FILE and content is not None:
                content = content.replace(b"ROLE_NOT_PERMITTED", b"ROLE_NOT_PERMITTEX")
                member.size = len(content)
            dst.addfile(member, io.BytesIO(content) if content is not None else None)
    out.write_bytes(buf.getvalue())
    return out


def opa_config(path: Path, service_url: str, pub: Path) -> Path:
    pem = pub.read_text(encoding="utf-8")
    cfg = bundle_config(
        service_url=service_url, resource="bundle.tar.gz", public_key_pem=pem, min_delay_seconds=1,
        max_delay_seconds=1,
    )  # fmt: skip
    cfg["decision_logs"] = {"console": False}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


async def until(check: Callable[[], Awaitable[BundleStatus | None]], what: str) -> BundleStatus:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STATUS_DEADLINE
    while loop.time() < deadline:
        found = await check()
        if found is not None:
            return found
        await asyncio.sleep(POLL)
    pytest.fail(f"OPA never reported: {what}")


async def authz_status(opa_url: str) -> BundleStatus | None:
    async with httpx2.AsyncClient() as client:
        return (await bundle_status(client, opa_url)).get("authz")


async def sidecar_readiness(tmp_path: Path, fhir_url: str, opa_url: str, expected: str) -> dict:
    settings = config.from_mapping(
        sidecar_config(
            tmp_path / "sidecar",
            fhir_url,
            opa_url=opa_url,
            identity=NURSE,
            opa={"expected_revision": expected},
        )
    )
    server = build_server(settings)
    async with Client(server) as client:
        result = await client.call_tool(
            "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
        report = await readiness(
            server.app_holder.get("app"), expected_revision=settings.opa.expected_revision
        )  # type: ignore[attr-defined]
    return {"report": report, "call_ok": not result.is_error}


async def test_a_signed_bundle_is_verified_and_activated_and_the_sidecar_is_ready(
    tmp_path, keys, bundle_server, fhir_server
):
    url, served = bundle_server
    signed_bundle(served / "bundle.tar.gz", keys, "rev-good")
    async with ManagedOpa([], extra_args=["-c", str(opa_config(tmp_path / "opa.yaml", url, keys[1]))]) as opa:

        async def activated() -> BundleStatus | None:
            s = await authz_status(opa.url)
            return s if s is not None and s.active_revision == "rev-good" else None

        await until(activated, "the signed bundle activated")
        outcome = await sidecar_readiness(tmp_path, fhir_server.base_url, opa.url, "rev-good")
    assert outcome["report"]["ready"] is True, outcome["report"]
    assert outcome["report"]["checks"]["policy_revision"] == {"expected": "rev-good", "active": "rev-good"}
    assert outcome["call_ok"]


async def test_a_tampered_update_is_refused_the_old_bundle_stays_and_the_sidecar_is_not_ready(
    tmp_path, keys, bundle_server, fhir_server
):
    url, served = bundle_server
    signed_bundle(served / "bundle.tar.gz", keys, "rev-1")
    async with ManagedOpa([], extra_args=["-c", str(opa_config(tmp_path / "opa.yaml", url, keys[1]))]) as opa:

        async def first() -> BundleStatus | None:
            s = await authz_status(opa.url)
            return s if s is not None and s.active_revision == "rev-1" else None

        await until(first, "rev-1 activated")
        # the next release is signed, then one policy file is edited inside the tarball
        good_next = signed_bundle(tmp_path / "rev-2.tar.gz", keys, "rev-2")
        tamper(good_next, served / "bundle.tar.gz")

        async def refused() -> BundleStatus | None:
            s = await authz_status(opa.url)
            return s if s is not None and s.code == "bundle_error" else None

        status = await until(refused, "the tampered bundle refused")
        assert "digest mismatch" in (status.message or "")
        assert status.active_revision == "rev-1"  # the old bundle is kept
        outcome = await sidecar_readiness(tmp_path, fhir_server.base_url, opa.url, "rev-2")
    assert outcome["report"]["ready"] is False
    assert outcome["report"]["checks"]["policy_revision"] == {"expected": "rev-2", "active": "rev-1"}


async def test_an_opa_that_only_ever_saw_a_tampered_bundle_has_no_policy_and_the_sidecar_is_not_ready(
    tmp_path, keys, bundle_server, fhir_server
):
    url, served = bundle_server
    tamper(signed_bundle(tmp_path / "rev-x.tar.gz", keys, "rev-x"), served / "bundle.tar.gz")
    async with ManagedOpa([], extra_args=["-c", str(opa_config(tmp_path / "opa.yaml", url, keys[1]))]) as opa:

        async def refused() -> BundleStatus | None:
            s = await authz_status(opa.url)
            return s if s is not None and s.code == "bundle_error" else None

        status = await until(refused, "the tampered bundle refused")
        assert status.active_revision is None
        async with httpx2.AsyncClient() as client:
            assert (await client.get(f"{opa.url}/health?bundles")).status_code == 500
        outcome = await sidecar_readiness(tmp_path, fhir_server.base_url, opa.url, "rev-x")
    assert outcome["report"]["ready"] is False
    assert outcome["report"]["checks"]["policy_revision"]["active"] is None
    assert not outcome["call_ok"]  # no policy: every call is denied (fail closed)
