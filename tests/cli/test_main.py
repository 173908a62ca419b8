"""`mcp-fhir serve`'s hand-over to uvicorn: the configured event loop, HTTP parser and TLS."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from mcp_fhir import config
from mcp_fhir._exceptions import ConfigError
from mcp_fhir.cli.main import DRAIN_TIMEOUT, _tls_context, uvicorn_options
from mcp_fhir.config import ServerSettings, Settings
from mcp_fhir.http_app import H11HeaderLimited, HttptoolsHeaderLimited


def _settings(**server: Any) -> Settings:
    return config.from_mapping(
        {
            "server": {"transport": "http", **server},
            "auth": {"issuer": "https://login.example.org", "audience": "https://mcp.example.org/mcp"},
            "backends": {"testbed": {"base_url": "http://127.0.0.1:8103/fhir"}},
        }
    )


def test_serve_lets_uvicorn_pick_the_fastest_installed_loop_and_the_header_limited_httptools_by_default():
    options = uvicorn_options(_settings())
    assert (options["loop"], options["http"]) == ("auto", HttptoolsHeaderLimited)
    assert "ssl_certfile" not in options


def test_serve_hands_uvicorn_the_configured_loop_and_the_header_limited_parser():
    options = uvicorn_options(_settings(event_loop="asyncio", http_parser="h11", port=9001))
    assert (options["loop"], options["http"], options["port"]) == ("asyncio", H11HeaderLimited, 9001)


def test_serve_bounds_the_drain_and_logs_uvicorn_through_the_json_handler():
    options = uvicorn_options(_settings())
    assert options["timeout_graceful_shutdown"] == DRAIN_TIMEOUT
    assert options["log_config"] is None


def test_serve_hands_uvicorn_the_tls_files_and_the_context_floor(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    options = uvicorn_options(_settings(tls_cert_file=str(cert), tls_key_file=str(key)))
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (str(cert), str(key))
    assert options["ssl_context_factory"] is _tls_context


@pytest.mark.parametrize(("key", "module"), [("event_loop", "uvloop"), ("http_parser", "httptools")])
def test_naming_an_extra_that_is_not_installed_is_a_config_error_naming_the_key(monkeypatch, key, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    with pytest.raises(ConfigError) as caught:
        ServerSettings.model_validate({"transport": "http", key: module})
    assert (caught.value.code, caught.value.key) == ("config_invalid", f"server.{key}")
