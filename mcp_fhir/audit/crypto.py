"""Keys for the audit trail: Ed25519 checkpoint signatures and AES-256-GCM encryption at rest.

Signing: a ``Signer`` (the protocol below) signs checkpoint bytes with Ed25519. The shipped
one, ``FileSigner``, holds a PKCS#8 PEM private key read from a file (created 0600 on first
start) or an environment variable. ``Signer`` is the hook for keeping the key off the host: a
PKCS#11 token, a KMS or a remote signing service implements ``key_id``, ``public_key()`` and
``sign(message) -> signature`` and is named by ``audit.signer_factory`` ("module:callable").
A key id is the first 16 hex digits of sha256 over the raw public key. The public key is
saved beside the private key as ``<private>.pub`` (PEM, SubjectPublicKeyInfo, mode 0600).

Verification never trusts a key found beside the trail: ``KeyRing`` holds the pinned public
keys (the key history, by id) and a checkpoint verifies only under the key its id names.
A checkpoint's signed bytes include that key id, so a signature cannot be moved to another key.

Encryption: a raw 32-byte key, base64-encoded, from a file or an environment variable,
with an operator-chosen key id (``kid``) stored on every entry. Each record gets a fresh
random 96-bit nonce; the associated data binds the ciphertext to its place in the chain
(``f"{seq}:{prev}"``), so a ciphertext moved elsewhere no longer decrypts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mcp_fhir.audit.chain import canonical_json

__all__ = [
    "NONCE_BYTES",
    "CheckpointSigner",
    "CheckpointVerifier",
    "DecryptionFailed",
    "FileSigner",
    "KeyRing",
    "RecordCipher",
    "Signer",
    "key_id",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signer_factory",
]

NONCE_BYTES = 12
AES_KEY_BYTES = 32
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o600
CHECKPOINT_FIELDS = ("seq", "hash", "ts", "writer")


class DecryptionFailed(Exception):
    """A ciphertext did not decrypt with the key given (wrong key, wrong place, or edited)."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable fingerprint of an Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_or_create_signing_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """Load the Ed25519 key at ``path``, or create it (mode 0600) and its ``.pub``; return (key, created)."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("signing key is not an Ed25519 private key")
        pub_path = path.with_name(path.name + ".pub")
        if not pub_path.exists():
            write_private_file(pub_path, _public_pem(key.public_key()), mode=PUBLIC_KEY_MODE)
        return key, False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem, mode=PRIVATE_KEY_MODE)
    write_private_file(
        path.with_name(path.name + ".pub"), _public_pem(key.public_key()), mode=PUBLIC_KEY_MODE
    )
    return key, True


def write_private_file(path: Path, data: bytes, *, mode: int = PRIVATE_KEY_MODE) -> None:
    """Create ``path`` with ``mode`` (never wider, whatever the umask) and write ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def load_signing_key_pem(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM bytes (e.g. from an environment variable)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("signing key is not an Ed25519 private key")
    return key


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (public or private key PEM both work)."""
    if b"PRIVATE KEY" in data:
        return load_signing_key_pem(data).public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("public key is not an Ed25519 key")
    return key


def checkpoint_message(checkpoint: dict[str, Any]) -> bytes:
    """The exact bytes a checkpoint signature covers (with its ``kid`` when it names one)."""
    fields = (*CHECKPOINT_FIELDS, "kid") if "kid" in checkpoint else CHECKPOINT_FIELDS
    return canonical_json({k: checkpoint[k] for k in fields})


@runtime_checkable
class Signer(Protocol):
    """What signs checkpoints. Implement it to keep the key off the host (PKCS#11, KMS, remote).

    ``sign`` is called once per group commit, on the event loop: a signer that waits on the
    network sets ``blocking = True`` and the trail calls it in a worker thread instead.
    """

    key_id: str

    def public_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key verifiers pin."""
        ...

    def sign(self, message: bytes) -> bytes:
        """A raw 64-byte Ed25519 signature over ``message``."""
        ...


class FileSigner:
    """The shipped ``Signer``: an Ed25519 private key held in this process."""

    blocking = False

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    def __repr__(self) -> str:
        return f"FileSigner(key_id={self.key_id!r})"

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def load_signer_factory(spec: str) -> Signer:
    """Call ``module:callable`` (``audit.signer_factory``) and check that it returns a ``Signer``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError("signer_factory must be 'module:callable'")
    factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
    signer = factory()
    if not isinstance(signer, Signer):
        raise TypeError("signer_factory did not return a Signer (key_id, public_key(), sign())")
    return signer


class CheckpointSigner:
    """Signs checkpoints with one ``Signer`` (an Ed25519 private key is wrapped in a ``FileSigner``)."""

    def __init__(self, signer: Signer | Ed25519PrivateKey) -> None:
        self._signer: Signer = FileSigner(signer) if isinstance(signer, Ed25519PrivateKey) else signer
        self.key_id = self._signer.key_id
        self.blocking = bool(getattr(self._signer, "blocking", False))

    def __repr__(self) -> str:
        return f"CheckpointSigner(key_id={self.key_id!r})"

    def public_key(self) -> Ed25519PublicKey:
        return self._signer.public_key()

    def sign(self, checkpoint: dict[str, Any]) -> str:
        """Base64 Ed25519 signature over the checkpoint's canonical bytes."""
        return base64.b64encode(self._signer.sign(checkpoint_message(checkpoint))).decode()


class CheckpointVerifier:
    """Checks checkpoint signatures against one Ed25519 public key."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self._key = public_key
        self.public_key = public_key
        self.key_id = key_id(public_key)

    def verify(self, checkpoint: dict[str, Any], signature_b64: str) -> bool:
        """True only if the signature is valid base64 and valid for this key."""
        try:
            self._key.verify(base64.b64decode(signature_b64, validate=True), checkpoint_message(checkpoint))
        except (InvalidSignature, binascii.Error, ValueError, TypeError):
            return False
        return True


class KeyRing:
    """The pinned public keys (a key history after rotations), by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._by_id = {v.key_id: v for v in (CheckpointVerifier(k) for k in keys)}
        if not self._by_id:
            raise ValueError("a key ring needs at least one public key")

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={sorted(self._by_id)!r})"

    @classmethod
    def from_pems(cls, pems: Iterable[bytes]) -> KeyRing:
        return cls(load_public_key(p) for p in pems)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._by_id)

    def public_keys(self) -> list[Ed25519PublicKey]:
        return [v.public_key for v in self._by_id.values()]

    def knows(self, kid: Any) -> bool:
        return kid is not None and kid in self._by_id

    def verify_entry(self, entry: dict[str, Any]) -> bool:
        """Is this checkpoint entry signed, under the key it names, by a pinned key?"""
        cp = entry.get("checkpoint")
        sig = entry.get("sig")
        if not isinstance(cp, dict) or not isinstance(sig, str):
            return False
        kid = entry.get("pub")
        if "kid" in cp and cp["kid"] != kid:
            return False
        verifier = self._by_id.get(kid) if isinstance(kid, str) else None
        if verifier is None or not all(k in cp for k in CHECKPOINT_FIELDS):
            return False
        return verifier.verify(cp, sig)


def decode_aes_key(text: str | bytes) -> bytes:
    """A base64 AES-256 key; raises ValueError (never showing the key) if it is not 32 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("encryption key is not valid base64") from exc
    if len(raw) != AES_KEY_BYTES:
        raise ValueError("encryption key must be 32 raw bytes (AES-256), base64-encoded")
    return raw


class RecordCipher:
    """AES-256-GCM for audit records, with the chain position as associated data.

    ``kid=None`` is for readers only: it tries the key on any entry whatever its key id.
    """

    def __init__(self, key: bytes, kid: str | None) -> None:
        if len(key) != AES_KEY_BYTES:
            raise ValueError("encryption key must be 32 raw bytes (AES-256)")
        self._aead = AESGCM(key)
        self.kid = kid

    def __repr__(self) -> str:
        return f"RecordCipher(kid={self.kid!r})"

    @staticmethod
    def _aad(seq: int, prev: str) -> bytes:
        return f"{seq}:{prev}".encode()

    def encrypt(self, record: dict[str, Any], *, seq: int, prev: str) -> dict[str, str]:
        """The encrypted body of an entry: ``{"kid", "nonce", "ct"}`` (base64)."""
        nonce = os.urandom(NONCE_BYTES)
        ct = self._aead.encrypt(nonce, canonical_json(record), self._aad(seq, prev))
        return {
            "kid": self.kid or "default",
            "nonce": base64.b64encode(nonce).decode(),
            "ct": base64.b64encode(ct).decode(),
        }

    def decrypt(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The plaintext record of an encrypted entry; raises DecryptionFailed."""
        if self.kid is not None and entry.get("kid") != self.kid:
            raise DecryptionFailed("entry was encrypted under a different key id")
        try:
            nonce = base64.b64decode(entry["nonce"], validate=True)
            ct = base64.b64decode(entry["ct"], validate=True)
            plain = self._aead.decrypt(nonce, ct, self._aad(int(entry["seq"]), str(entry["prev"])))
        except (InvalidTag, KeyError, ValueError, TypeError, binascii.Error) as exc:
            raise DecryptionFailed("entry did not decrypt") from exc
        result = json.loads(plain)
        if not isinstance(result, dict):
            raise DecryptionFailed("decrypted entry is not an object")
        return result
