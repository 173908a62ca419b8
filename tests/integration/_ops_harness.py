"""Run `mcp-fhir serve` as a real subprocess (HTTP transport) and talk to it like an operator and an agent.

Shared by the operations integration tests (metrics, readiness, logs, TLS, examples). The sidecar's
stderr (its JSON log) goes to `<workdir>/sidecar.stderr`, so tests can read every line it wrote.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_fhir.agent_auth.api_keys import generate_api_key
from mcp_fhir.policy.managed_opa import free_port
from tests.testbed.sidecar import sidecar_config

REPO = Path(__file__).resolve().parents[2]
DEFAULT_START_TIMEOUT = 60.0  # seconds for the sidecar (and its managed OPA) to answer /healthz
DEFAULT_STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
DEFAULT_POLL_INTERVAL = 0.1  # seconds between checks of a real condition
DEFAULT_CLIENT_TIMEOUT = 30.0


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll a real condition until it holds or the deadline passes (no sleeping as synchronisation)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        pause.wait(DEFAULT_POLL_INTERVAL)


class ApiKeyIdentity:
    """An API key for one test-bed identity: the plain key for the client, the config entry for the server."""

    def __init__(self, identity: Mapping[str, Any]) -> None:
        self.id = str(identity["id"])
        self.key, self.digest = generate_api_key()
        self.entry = {
            "id": self.id,
            "hash": self.digest,
            "claims": dict(identity.get("claims") or {}),
            "scopes": list(identity.get("scopes") or []),
        }


def http_config(
    workdir: Path, fhir_base_url: str, keys: list[ApiKeyIdentity], **overrides: Any
) -> dict[str, Any]:
    """A `serve` config over the test bed: HTTP on a free loopback port, API keys, a metrics port."""
    cfg = sidecar_config(workdir, fhir_base_url, transport="http")
    cfg["server"] = {
        "transport": "http",
        "host": "127.0.0.1",
        "port": free_port(),
        "metrics_port": free_port(),
    }
    cfg["auth"] = {"api_keys": [k.entry for k in keys]}
    cfg["audit"] = {"sink": "file", "path": str(workdir / "audit" / "audit.jsonl")}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


class ServedSidecar:
    """`mcp-fhir serve --config FILE` in a child process we own; stopped by pid, never by name."""

    def __init__(
        self,
        workdir: Path,
        cfg: Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.workdir = workdir
        self.log_level = log_level
        self.cfg = dict(cfg)
        self.env = dict(env or {})
        self.config_path = workdir / "mcp-fhir.yaml"
        self.stderr_path = workdir / "sidecar.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        server = self.cfg["server"]
        self.scheme = "https" if server.get("tls_cert_file") else "http"
        self.base_url = f"{self.scheme}://127.0.0.1:{server['port']}"
        self.mcp_url = self.base_url + server.get("path", "/mcp")
        self.metrics_url = (
            f"http://127.0.0.1:{server['metrics_port']}/metrics" if server.get("metrics_port") else None
        )
        self.verify: ssl.SSLContext | bool = True

    def start(self, *, timeout: float = DEFAULT_START_TIMEOUT) -> ServedSidecar:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.cfg), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_FHIR_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO)
        with open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mcp_fhir.cli.main",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--log-level",
                    self.log_level,
                    "--log-level",
                    self.log_level,
                ],
                stdout=err,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(self.workdir),
            )
        wait_for(self._live, timeout=timeout, what="the sidecar's /healthz")
        return self

    def _live(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"mcp-fhir serve exited with {self.process.returncode}: {self.stderr()[-2000:]}"
            )
        try:
            return httpx2.get(self.base_url + "/healthz", timeout=2.0, verify=self.verify).status_code == 200
        except httpx2.HTTPError:
            return False

    def readyz(self) -> tuple[int, dict[str, Any]]:
        response = httpx2.get(self.base_url + "/readyz", timeout=10.0, verify=self.verify)
        return response.status_code, response.json()

    def scrape(self) -> str:
        if self.metrics_url is None:
            raise RuntimeError("no metrics port configured")
        return httpx2.get(self.metrics_url, timeout=5.0).text

    def stderr(self) -> str:
        return (
            self.stderr_path.read_text(encoding="utf-8", errors="replace")
            if self.stderr_path.exists()
            else ""
        )

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(DEFAULT_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(DEFAULT_STOP_TIMEOUT)

    def __enter__(self) -> ServedSidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @asynccontextmanager
    async def client(self, credential: str) -> AsyncIterator[Client]:
        """The official MCP client over streamable HTTP, presenting `credential` as a bearer token."""
        http = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {credential}"},
            timeout=DEFAULT_CLIENT_TIMEOUT,
            verify=self.verify,
        )
        async with http, Client(streamable_http_client(self.mcp_url, http_client=http)) as client:
            yield client


def replace_dir_with_file(directory: Path) -> Path:
    """Make `directory` unusable even for root: move it aside and put a plain file at its path."""
    aside = directory.with_name(directory.name + ".aside")
    directory.rename(aside)
    directory.write_text("not a directory\n", encoding="utf-8")
    return aside


def restore_dir(directory: Path, aside: Path) -> None:
    directory.unlink()
    aside.rename(directory)
