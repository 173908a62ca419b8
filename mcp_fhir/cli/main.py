"""`mcp-fhir`: serve, check configuration, report status, mint API keys, and read the audit trail."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import signal
import ssl
import sys
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mcp_fhir._exceptions import MCPFhirError
from mcp_fhir._version import __version__

if TYPE_CHECKING:
    from mcp_fhir.config import Settings

log = logging.getLogger("mcp_fhir.cli")

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EXIT_ERROR = 2  # a usage, configuration or startup error, reported in one line
EXIT_STARTUP_FAILED = 3  # uvicorn's status when the app did not start (its reason is in the log)
DRAIN_TIMEOUT = 10.0  # seconds in-flight calls get to finish after SIGTERM/SIGINT before they are cut


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)} (any case)")
    return level


def _serve(args: argparse.Namespace) -> int:
    from mcp_fhir import config
    from mcp_fhir.logs import configure_logging
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
        _start_metrics(settings.server.host, settings.server.metrics_port)
    if settings.server.transport == "stdio":
        from mcp_fhir.cli.stdio import serve_stdio
        from mcp_fhir.http_app import ServeState, reload_on_signal

        on_hup = reload_on_signal(server, ServeState(settings, config_path=args.config))
        asyncio.run(serve_stdio(server, drain_timeout=DRAIN_TIMEOUT, on_hup=on_hup))
        return 0
    return _serve_http(settings, server, args.config)


def _start_metrics(host: str, port: int) -> None:
    """The Prometheus endpoint; a port that cannot be bound is a one-line configuration error."""
    from prometheus_client import start_http_server

    from mcp_fhir._exceptions import ConfigError
    from mcp_fhir.metrics import REGISTRY

    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise ConfigError("server.metrics_port", f"{host}:{port} {reason}") from None


def _serve_http(settings: Settings, server: Any, config_path: str | None) -> int:
    """uvicorn, with our signals: SIGTERM/SIGINT drain and exit 0, SIGHUP reloads keys and policy data."""
    import uvicorn

    from mcp_fhir.http_app import ServeState, build_http_app, reload_on_signal

    state = ServeState(settings, config_path=config_path)
    app = build_http_app(settings, server, state)
    userver = _Server(uvicorn.Config(app, **uvicorn_options(settings)), reload_on_signal(server, state))
    try:
        userver.run()
    except SystemExit as exc:  # uvicorn's own exit when it cannot bind or the app does not start
        print("error: the server did not start (its reason is in the log above)", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) and exc.code else EXIT_STARTUP_FAILED
    if not userver.started:
        print("error: the server did not start (see the log above)", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    return 0


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a handled SIGTERM/SIGINT is a clean exit (uvicorn re-raises it: status -15),
        and SIGHUP runs `on_hup` on the event loop."""

        def __init__(self, config: Any, on_hup: Any) -> None:
            super().__init__(config)
            self._on_hup = on_hup

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            loop = asyncio.get_running_loop()
            handled: dict[int, Any] = {sig: self.handle_exit for sig in (signal.SIGINT, signal.SIGTERM)}

            def hup(signum: int, frame: Any) -> None:
                loop.call_soon_threadsafe(self._on_hup)

            handled[signal.SIGHUP] = hup
            original = {sig: signal.signal(sig, handler) for sig, handler in handled.items()}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config: Any, on_hup: Any) -> Any:
    return _server_class()(config, on_hup)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What `serve` hands uvicorn: address, event loop, the header-limited HTTP parser, drain bound, TLS."""
    from mcp_fhir.http_app import header_limited_protocol

    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "loop": settings.server.event_loop,
        "http": header_limited_protocol(settings.server.http_parser),
        "log_level": "warning",
        "log_config": None,  # uvicorn logs through our JSON handler: one line per event, no traceback
        "access_log": False,
        "timeout_graceful_shutdown": DRAIN_TIMEOUT,
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
    failed = False
    for file in args.file:
        try:
            settings = config.load(file, files=not args.skip_files)
        except config.ConfigErrors as exc:
            failed = True
            where = f"{file}: " if len(args.file) > 1 else ""
            for line in exc.lines():
                print(f"error: {where}{line}", file=sys.stderr)
            continue
        loaded.append(settings)
        print(
            f"ok: {file}: {len(settings.backends)} backend(s), transport {settings.server.transport}, "
            f"{len(settings.tools)} tool(s)"
        )
    for warning in config_warnings([s.audit_settings() for s in loaded]):
        print(f"warning: {warning}", file=sys.stderr)
    if failed:
        return 2
    return 0


def _status(args: argparse.Namespace) -> int:
    import httpx2

    url = args.url.rstrip("/") + "/readyz"
    try:
        response = httpx2.get(url, timeout=args.timeout)
        report = response.json()
        if not isinstance(report, dict) or "ready" not in report:
            raise ValueError("not a readiness report")
    except httpx2.HTTPError as exc:
        print(f"not reachable: {url} ({type(exc).__name__})", file=sys.stderr)
        return EXIT_ERROR
    except ValueError:
        print(
            f"not a readiness report: {url} answered HTTP {response.status_code}; "
            "--url is the server's base URL (e.g. http://127.0.0.1:8765), without the MCP path",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("READY" if report.get("ready") else "NOT READY")
        for name, value in (report.get("checks") or {}).items():
            if name == "backends" and isinstance(value, dict):
                for backend, check in value.items():
                    print(f"  backend {backend:8} {_backend_line(check)}")
            else:
                print(f"  {name:16} {value}")
    return 0 if report.get("ready") else 1


def _backend_line(check: Any) -> str:
    if not isinstance(check, dict):
        return str(check)
    verdict = "ready" if check.get("ready") else "NOT READY"
    return (
        f"{verdict} (metadata {'ok' if check.get('metadata') else 'failed'}, breaker {check.get('breaker')})"
    )


def _keys_new(args: argparse.Namespace) -> int:
    from mcp_fhir.agent_auth.api_keys import generate_api_key

    key, digest = generate_api_key()
    print(
        f"key (give it to the agent once; it is not stored):\n  {key}\n"
        f'config entry:\n  - id: {args.id}\n    hash: "{digest}"\n'
        "    claims: {}  # fill in: the claims the policy reads, at least the roles, e.g. {roles: [nurse]}\n"
        "    scopes: []  # fill in: the SMART scopes granted, e.g. [user/Patient.rs]; empty denies every call"
    )
    return 0


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError("must be an http(s) URL with a host")
    return value


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not 0 < seconds <= 300:
        raise argparse.ArgumentTypeError("must be between 0 and 300 seconds")
    return seconds


def _key_id(value: str) -> str:
    from mcp_fhir._exceptions import ConfigError
    from mcp_fhir.agent_auth.settings import _check_id

    try:
        return _check_id("--id", value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.rule) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcp-fhir", description=__doc__)
    p.add_argument("--version", action="version", version=f"mcp-fhir {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MCP server (stdio or streamable HTTP)")
    serve.add_argument("--config", help="YAML configuration (default: $MCP_FHIR_CONFIG)")
    serve.add_argument("--transport", choices=["stdio", "http"], help="override server.transport")
    serve.add_argument(
        "--log-level",
        type=_log_level,
        default="INFO",
        metavar="LEVEL",
        help=f"log level, one of {', '.join(LOG_LEVELS)} (default INFO)",
    )
    serve.set_defaults(func=_serve)

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    check = cfg.add_parser("check", help="validate configuration files without starting anything")
    check.add_argument(
        "file",
        nargs="+",
        help="one config, or every replica's config (to find audit writer collisions); relative paths in a "
        "file are read from its own folder",
    )
    check.add_argument(
        "--skip-files",
        action="store_true",
        help="check the schema and environment variables only, not the files and folders serve opens "
        "(for a file written for another machine)",
    )
    check.set_defaults(func=_config_check)

    status = sub.add_parser("status", help="print a running server's readiness")
    status.add_argument(
        "--url",
        type=_base_url,
        default="http://127.0.0.1:8765",
        help="the server's base URL, without the MCP path (default http://127.0.0.1:8765)",
    )
    status.add_argument("--json", action="store_true", help="print the full readiness report as JSON")
    status.add_argument(
        "--timeout", type=_positive_seconds, default=5.0, help="seconds to wait for an answer (default 5)"
    )
    status.set_defaults(func=_status)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="mint an API key and print its config entry (hash only)")
    new.add_argument("--id", required=True, type=_key_id, help="the key's id, as audit records will name it")
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
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a file or socket the command needed: named by its reason, never a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or type(exc).__name__}{where}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # the last guard: a bug is reported by type, with no traceback, values or PHI
        log.debug("unexpected %s", type(exc).__name__)
        print(f"error: internal error ({type(exc).__name__})", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
