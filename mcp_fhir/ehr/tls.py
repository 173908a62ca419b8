"""The outbound TLS context for calls to an EHR (token endpoint and FHIR API).

Always verified: certificate chain and hostname are checked, TLS 1.2 is the floor. An optional
client certificate and key turn on mutual TLS. A custom CA bundle *replaces* the system trust store
(a private EHR PKI should not also trust every public CA). Bad files are configuration errors
that name the key.
"""

from __future__ import annotations

import os
import ssl

from mcp_fhir._exceptions import ConfigError

__all__ = ["MINIMUM_TLS_VERSION", "build_ssl_context"]

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2

PathLike = str | os.PathLike[str]


def build_ssl_context(
    ca_bundle: PathLike | None = None,
    client_cert: PathLike | None = None,
    client_key: PathLike | None = None,
    *,
    prefix: str = "tls",
) -> ssl.SSLContext:
    """A client-side SSLContext: verification on, hostname check on, TLS >= 1.2, optional CA and mTLS."""
    if client_key is not None and client_cert is None:
        raise ConfigError(f"{prefix}.client_key", "needs client_cert as well")
    if ca_bundle is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=os.fspath(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{prefix}.ca_bundle", "cannot be read as a PEM CA bundle") from exc
    context.minimum_version = MINIMUM_TLS_VERSION
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if client_cert is not None:
        try:
            context.load_cert_chain(
                certfile=os.fspath(client_cert),
                keyfile=os.fspath(client_key) if client_key is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{prefix}.client_cert", "cannot be loaded with its key") from exc
    return context
