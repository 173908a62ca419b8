"""The embedded default: an `opa run --server` child on a free loopback port.

When no OPA URL is configured, `serve` starts OPA itself, loading `policies/`, waits until
`/health` answers, and stops it on exit. Decision logging goes to a file beside the audit
trail, masked by `policies/system/log`, so the sidecar's audit records and OPA's events
share a decision id. OPA's status plugin is on (`status.prometheus=true`) so that its
status API answers: the sidecar reads the bundle revision there, not on every decision. Its Go
GC runs at GOGC=400 (unless GOGC is set): less of OPA's CPU per decision, for a little memory.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx2

from mcp_fhir._exceptions import ConfigError, PolicyUnavailable

DEFAULT_START_TIMEOUT = 20.0  # seconds for OPA to compile the policies and answer /health
DEFAULT_STOP_TIMEOUT = 5.0
# Go's GC target for the managed OPA: a decision allocates much and keeps little, so collecting at
# 5x the live heap instead of 2x saves about 15 % of OPA's CPU per decision (`bench/opa_ab.py`,
# docs/performance.md) for a few tens of MiB. A GOGC already in the environment wins.
DEFAULT_GOGC = "400"
_HEALTH_POLL_INTERVAL = 0.05
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PROJECT_OPA = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "opa"


def find_opa(configured: str | None = None) -> str:
    """The OPA binary: the configured path, $MCP_FHIR_OPA, the project's .tools/bin/opa, then $PATH."""
    for candidate in (configured, os.environ.get("MCP_FHIR_OPA"), str(_PROJECT_OPA), shutil.which("opa")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        "opa.binary", "no OPA binary found: run scripts/opa.sh, set MCP_FHIR_OPA, or configure opa.url"
    )


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, ask the kernel to SIGTERM OPA when the sidecar dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ManagedOpa:
    """An OPA server we own. `async with ManagedOpa(...) as opa: opa.url`."""

    def __init__(
        self,
        policy_paths: list[Path],
        *,
        binary: str | None = None,
        decision_log: Path | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        gogc: str | None = DEFAULT_GOGC,
    ) -> None:
        self.binary = find_opa(binary)
        self.policy_paths = policy_paths
        self.decision_log = decision_log
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.start_timeout = start_timeout
        self.gogc = gogc
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "run",
            "--server",
            "--skip-version-check",
            "--log-level",
            "error",
            "--addr",
            f"127.0.0.1:{self.port}",
            # Serve the policy and its data only: the Rego tests and the fixture corpus stay out.
            "--ignore",
            "*_test.rego",
            "--ignore",
            "fixtures",
            # The status plugin, so that /v1/status answers and the sidecar learns the bundle
            # revision there instead of asking ?provenance=true on every decision (`policy/opa.py`).
            "--set",
            "status.prometheus=true",
        ]
        if self.decision_log is not None:
            cmd += ["--set", "decision_logs.console=true"]
        return cmd + self.extra_args + [str(p) for p in self.policy_paths]

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, with GOGC set to `gogc` unless it is already set."""
        env = dict(os.environ)
        if self.gogc is not None:
            env.setdefault("GOGC", self.gogc)
        return env

    async def start(self) -> None:
        out: int | IO[bytes] = subprocess.DEVNULL
        if self.decision_log is not None:
            self.decision_log.parent.mkdir(parents=True, exist_ok=True)
            out = self._log_file = open(self.decision_log, "ab")  # noqa: ASYNC230 - once, at start
        self.process = subprocess.Popen(  # noqa: ASYNC220 - a child we own; Popen returns at once
            self.command(),
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            env=self.environment(),
        )
        await self.wait_healthy()

    async def wait_healthy(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        async with httpx2.AsyncClient(timeout=1.0) as client:
            while loop.time() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise PolicyUnavailable(f"the managed OPA exited with status {self.process.returncode}")
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                await asyncio.sleep(_HEALTH_POLL_INTERVAL)
        await self.stop()
        raise PolicyUnavailable("the managed OPA did not become healthy in time")

    async def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, DEFAULT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    async def __aenter__(self) -> ManagedOpa:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
