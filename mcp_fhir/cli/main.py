"""`mcp-fhir`: serve, check configuration, report status, mint API keys, and read the audit trail."""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from typing import TYPE_CHECKING, Any

from mcp_fhir._exceptions import MCPFhirError
from mcp_fhir._version import __version__

if TYPE_CHECKING:
    from mcp_fhir.config import Settings

log = logging.getLogger("mcp_fhir.cli")

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from prometheus_client import start_http_server

    from mcp_fhir import config
    from mcp_fhir.http_app import build_http_app
    from mcp_fhir.logs import configure_logging
    from mcp_fhir.metrics import REGISTRY
    from mcp_fhir.server import build_server

    configure_logging(args.log_level)
    settings = config.load(args.config)
    if args.transport:
        settings = settings.model_copy(
            update={"server": settings.server.model_copy(update={"transport": args.transport})}
        )
        settings.check_sections()
    server = build_server(settings)
    if settings.server.metrics_port:
        start_http_server(settings.server.metrics_port, addr=settings.server.host, registry=REGISTRY)
    if settings.server.transport == "stdio":
        server.run("stdio")
        return 0
    app = build_http_app(settings, server)
    uvicorn.run(app, **uvicorn_options(settings))
    return 0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What `serve` hands uvicorn: address, event loop, HTTP parser, and TLS when configured."""
    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "loop": settings.server.event_loop,
        "http": settings.server.http_parser,
        "log_level": "warning",
        "access_log": False,
    }
    if settings.server.tls_cert_file:
        options |= {
            "ssl_certfile": str(settings.server.tls_cert_file),
            "ssl_keyfile": str(settings.server.tls_key_file),
            "ssl_version": ssl.PROTOCOL_TLS_SERVER,
            "ssl_context_factory": _tls_context,
        }
    return options


def _tls_context(config: Any, default_factory: Any) -> Any:
    """uvicorn's context with an explicit floor: TLS 1.2 or newer, whatever the platform default."""
    context = default_factory()
    if context.minimum_version < MIN_TLS_VERSION:
        context.minimum_version = MIN_TLS_VERSION
    return context


def _config_check(args: argparse.Namespace) -> int:
    from mcp_fhir import config
    from mcp_fhir.audit.settings import config_warnings

    loaded = []
    for file in args.file:
        try:
            settings = config.load(file, files=not args.skip_files)
        except config.ConfigErrors as exc:
            for line in exc.lines():
                print(f"error: {line}", file=sys.stderr)
            return 2
        loaded.append(settings)
        print(
            f"ok: {file}: {len(settings.backends)} backend(s), transport {settings.server.transport}, "
            f"{len(settings.tools)} tool(s)"
        )
    for warning in config_warnings([s.audit_settings() for s in loaded]):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    import httpx2

    url = args.url.rstrip("/") + "/readyz"
    try:
        response = httpx2.get(url, timeout=5.0)
    except httpx2.HTTPError as exc:
        print(f"not reachable: {url} ({type(exc).__name__})")
        return 2
    report = response.json()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("READY" if report.get("ready") else "NOT READY")
        for name, value in (report.get("checks") or {}).items():
            print(f"  {name:16} {value}")
    return 0 if report.get("ready") else 1


def _keys_new(args: argparse.Namespace) -> int:
    from mcp_fhir.agent_auth.api_keys import generate_api_key

    key, digest = generate_api_key()
    print(
        f"key (give it to the agent once; it is not stored):\n  {key}\n"
        f'config entry:\n  - id: {args.id}\n    hash: "{digest}"\n    claims: {{}}\n    scopes: []'
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcp-fhir", description=__doc__)
    p.add_argument("--version", action="version", version=f"mcp-fhir {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MCP server (stdio or streamable HTTP)")
    serve.add_argument("--config", help="YAML configuration (default: $MCP_FHIR_CONFIG)")
    serve.add_argument("--transport", choices=["stdio", "http"], help="override server.transport")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_serve)

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    check = cfg.add_parser("check", help="validate configuration files without starting anything")
    check.add_argument(
        "file",
        nargs="+",
        help="one config, or every replica's config (to find collisions); relative paths in each are read "
        "from its own folder",
    )
    check.add_argument(
        "--skip-files",
        action="store_true",
        help="check the schema and environment variables only, not the files and folders serve opens "
        "(for a file written for another machine)",
    )
    check.set_defaults(func=_config_check)

    status = sub.add_parser("status", help="print a running server's readiness")
    status.add_argument("--url", default="http://127.0.0.1:8765")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="mint an API key and print its config entry (hash only)")
    new.add_argument("--id", required=True)
    new.set_defaults(func=_keys_new)

    from mcp_fhir.cli import audit

    audit.add_parser(sub)
    from mcp_fhir.cli import policy

    policy.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MCPFhirError as exc:
        lines = exc.lines() if hasattr(exc, "lines") else [str(exc)]  # ConfigErrors: one line per error
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
