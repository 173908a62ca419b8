"""Keys for the audit trail: Ed25519 checkpoint signatures and AES-256-GCM encryption at rest.

Signing: an Ed25519 private key in PEM (PKCS#8). Its key id is the first 16 hex digits of
sha256 over the raw public key. The public key is saved beside the private key as
``<private>.pub`` (PEM, SubjectPublicKeyInfo) so that ``verify`` can find it.

Encryption: a raw 32-byte key, base64-encoded, from a file or an environment variable,
with an operator-chosen key id (``kid``) stored on every entry. Each record gets a fresh
random 96-bit nonce; the associated data binds the ciphertext to its place in the chain
(``f"{seq}:{prev}"``), so a ciphertext moved elsewhere no longer decrypts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

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
    "RecordCipher",
    "key_id",
    "load_or_create_signing_key",
    "load_public_key",
]

NONCE_BYTES = 12
AES_KEY_BYTES = 32
PRIVATE_KEY_MODE = 0o600


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
            pub_path.write_bytes(_public_pem(key.public_key()))
        return key, False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_KEY_MODE)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.with_name(path.name + ".pub").write_bytes(_public_pem(key.public_key()))
    return key, True


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
    """The exact bytes a checkpoint signature covers."""
    return canonical_json({k: checkpoint[k] for k in ("seq", "hash", "ts", "writer")})


class CheckpointSigner:
    """Signs checkpoints with one Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    def __repr__(self) -> str:
        return f"CheckpointSigner(key_id={self.key_id!r})"

    def sign(self, checkpoint: dict[str, Any]) -> str:
        """Base64 Ed25519 signature over the checkpoint's canonical bytes."""
        return base64.b64encode(self._key.sign(checkpoint_message(checkpoint))).decode()


class CheckpointVerifier:
    """Checks checkpoint signatures against one Ed25519 public key."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self._key = public_key
        self.key_id = key_id(public_key)

    def verify(self, checkpoint: dict[str, Any], signature_b64: str) -> bool:
        """True only if the signature is valid base64 and valid for this key."""
        try:
            self._key.verify(base64.b64decode(signature_b64, validate=True), checkpoint_message(checkpoint))
        except (InvalidSignature, binascii.Error, ValueError, TypeError):
            return False
        return True


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
