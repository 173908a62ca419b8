"""Make the demo's bundle-signing key pair (RSA 3072) in DIR, once. Run inside the sidecar image.

Usage: python deploy/bundle_keys.py /keys   ->  /keys/bundle-signing.pem (0600), /keys/bundle-verify.pem
A real deployment signs bundles in CI with a key kept in a KMS; only the public key reaches OPA.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

RSA_BITS = 3072


def main(directory: str) -> int:
    out = Path(directory)
    private, public = out / "bundle-signing.pem", out / "bundle-verify.pem"
    if private.exists() and public.exists():
        print(f"keys already present in {out}")
        return 0
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    print(f"wrote {private.name} and {public.name} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/keys"))
