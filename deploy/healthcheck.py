"""The image's HEALTHCHECK: GET /healthz where the sidecar's own config says it listens. Exit 0 on a 200.

The config is $MCP_FHIR_CONFIG (the Dockerfile sets it to the path its CMD serves). Its `server.port`,
`server.host` (0.0.0.0 or :: are probed on loopback) and TLS (https when `server.tls_cert_file` is set; the
certificate names the public host, not loopback, so it is not verified by this local probe) decide the URL.
A config over stdio has no port to probe: healthy while the process runs.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

from mcp_fhir import config
from mcp_fhir._exceptions import MCPFhirError

DEFAULT_CONFIG = "/etc/mcp-fhir/config.yaml"
TIMEOUT_SECONDS = 2.0


def probe_url(server: config.ServerSettings) -> str | None:
    """The /healthz URL of `server`, or None over stdio."""
    if server.transport != "http":
        return None
    wildcard = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104 - probed on loopback
    host = wildcard.get(server.host, server.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if server.tls_cert_file is not None else "http"
    return f"{scheme}://{host}:{server.port}/healthz"


def main() -> int:
    try:
        server = config.load(os.environ.get("MCP_FHIR_CONFIG", DEFAULT_CONFIG)).server
    except MCPFhirError:
        return 1
    url = probe_url(server)
    if url is None:
        return 0
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323 - loopback
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=context) as response:  # noqa: S310
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
