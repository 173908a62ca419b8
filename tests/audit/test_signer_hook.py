"""The key-off-host hook: ``audit.signer_factory`` names any ``Signer``; the trail signs through it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.audit.crypto import Signer, key_id
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail
from mcp_fhir.audit.verify import verify_file

from .conftest import make_record, witness_of

_REMOTE_KEY = Ed25519PrivateKey.generate()  # stands in for a key held by an HSM or a signing service


class RemoteSigner:
    """What a PKCS#11 or remote signer looks like to the trail: it never hands over the private key."""

    blocking = True  # it would wait on the network: the trail calls it in a worker thread

    def __init__(self) -> None:
        self.key_id = key_id(_REMOTE_KEY.public_key())
        self.calls = 0

    def public_key(self) -> Ed25519PublicKey:
        return _REMOTE_KEY.public_key()

    def sign(self, message: bytes) -> bytes:
        self.calls += 1
        return _REMOTE_KEY.sign(message)


SIGNERS: list[RemoteSigner] = []


def make_signer() -> RemoteSigner:
    signer = RemoteSigner()
    SIGNERS.append(signer)
    return signer


def not_a_signer() -> object:
    return object()


async def test_a_trail_signs_every_batch_through_a_configured_signer_and_writes_no_key_file(
    tmp_path: Path,
) -> None:
    settings = AuditSettings(path=str(tmp_path / "audit" / "audit.jsonl"),
                             signer_factory=f"{__name__}:make_signer")  # fmt: skip
    trail = build_trail(settings)
    await trail.start()
    for n in range(3):
        await trail.record(make_record(n))
    await trail.close()
    assert isinstance(SIGNERS[-1], Signer) and SIGNERS[-1].calls == 3
    assert not settings.signing_key_path.exists()
    report = verify_file(settings.path, public_key=_REMOTE_KEY.public_key(), witness=witness_of(settings))
    assert report.ok, report.problem
    assert report.key_ids == [SIGNERS[-1].key_id]


def test_a_factory_that_returns_no_signer_is_a_config_error(tmp_path: Path) -> None:
    settings = AuditSettings(path=str(tmp_path / "a.jsonl"), signer_factory=f"{__name__}:not_a_signer")
    with pytest.raises(ConfigError) as caught:
        build_trail(settings)
    assert caught.value.key == "audit.signer_factory"
