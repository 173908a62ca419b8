"""The embedded default: an `opa run --server` child on a free loopback port, supervised.

When no OPA URL is configured, `serve` starts OPA itself, loading `policies/`, waits until
`/health` answers, and stops it on exit. Decision logging goes to a file beside the audit
trail, masked by `policies/system/log`, so the sidecar's audit records and OPA's events
share a decision id. OPA's status plugin is on (`status.prometheus=true`) so that its
status API answers: the sidecar reads the bundle revision there, not on every decision. Its Go
GC runs at GOGC=400 (unless GOGC is set): less of OPA's CPU per decision, for a little memory.

Supervision: when the child dies, it is restarted on the same port with exponential backoff
(`RESTART_BACKOFF_INITIAL` doubling up to `RESTART_BACKOFF_MAX`, reset once a child has stayed up
for `RESTART_STABLE_AFTER` seconds). While it is down every decision fails to reach OPA and is
denied (`opa_unavailable`): the engine fails closed and readiness reports OPA unhealthy; both
recover by themselves once the new child answers `/health`. Each restart is counted in
`mcp_fhir_opa_restarts_total{reason}`. `reload()` restarts the child at once, so that it reads its
policy and data files again (what `serve` does on SIGHUP).

The supervisor is hand-written: it is one asyncio task waiting on the child's pidfd, and no supervision
library fits a child that must share the sidecar's event loop, port and parent-death signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
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

from mcp_fhir import metrics
from mcp_fhir._exceptions import ConfigError, PolicyUnavailable

log = logging.getLogger("mcp_fhir.policy.opa")

DEFAULT_START_TIMEOUT = 20.0  # seconds for OPA to compile the policies and answer /health
DEFAULT_STOP_TIMEOUT = 5.0
# Go's GC target for the managed OPA: a decision allocates much and keeps little, so collecting at
# 5x the live heap instead of 2x saves about 15 % of OPA's CPU per decision (`bench/opa_ab.py`,
# docs/performance.md) for a few tens of MiB. A GOGC already in the environment wins.
DEFAULT_GOGC = "400"
RESTART_BACKOFF_INITIAL = 0.2  # seconds before the first restart of a dead child
RESTART_BACKOFF_MAX = 10.0  # the backoff doubles per failed restart, up to this
RESTART_STABLE_AFTER = 30.0  # a child up this long resets the backoff to its initial value
_HEALTH_POLL_INTERVAL = 0.05
_EXIT_POLL_INTERVAL = 0.1
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


def opa_version(binary: str) -> str | None:
    """The version `opa version` reports (e.g. "1.22.3"), or None when it cannot be read."""
    try:
        out = subprocess.run(
            [binary, "version"], capture_output=True, text=True, timeout=DEFAULT_STOP_TIMEOUT, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.partition(":")[2].strip() or None
    return None


async def opa_provenance(url: str, token: str | None = None) -> tuple[str | None, str | None]:
    """An OPA server's version and bundle revisions from its provenance, or Nones when it does not answer."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with httpx2.AsyncClient(timeout=DEFAULT_STOP_TIMEOUT, headers=headers) as client:
            response = await client.get(
                f"{url.rstrip('/')}/v1/data/mcp_fhir/authz/visible_tools?provenance=true"
            )
        provenance = response.json().get("provenance") or {}
    except (httpx2.HTTPError, ValueError, AttributeError):
        return None, None
    bundles = provenance.get("bundles") or {}
    revisions = sorted(
        str(b["revision"]) for b in bundles.values() if isinstance(b, dict) and b.get("revision")
    )
    version = provenance.get("version")
    return (str(version) if version else None), (",".join(revisions) or None)


POLICY_SUFFIXES = (".rego", ".json", ".yaml", ".yml")


def policy_digest(paths: list[Path]) -> str | None:
    """A revision for file-loaded policy: sha256 over the policy and data files OPA loads (tests excluded)."""
    digest = hashlib.sha256()
    found = False
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(root) if root.is_dir() else Path(path.name)
            if (
                path.suffix not in POLICY_SUFFIXES
                or path.name.endswith("_test.rego")
                or "fixtures" in rel.parts
            ):
                continue
            digest.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
            found = True
    return f"sha256:{digest.hexdigest()[:16]}" if found else None


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
    """An OPA server we own and keep alive. `async with ManagedOpa(...) as opa: opa.url`."""

    def __init__(
        self,
        policy_paths: list[Path],
        *,
        binary: str | None = None,
        decision_log: Path | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        backoff_initial: float = RESTART_BACKOFF_INITIAL,
        backoff_max: float = RESTART_BACKOFF_MAX,
        stable_after: float = RESTART_STABLE_AFTER,
        gogc: str | None = DEFAULT_GOGC,
    ) -> None:
        self.binary = find_opa(binary)
        self.policy_paths = policy_paths
        self.decision_log = decision_log
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.start_timeout = start_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self.stable_after = stable_after
        self.gogc = gogc
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0  # children started after the first one
        self._log_file: IO[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._reload = False
        self._restarted: asyncio.Condition | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """A child process is alive (it may still be compiling the policies)."""
        return self.process is not None and self.process.poll() is None

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
            # Keep the policy data in the store as Rego values: by default every decision converts
            # each data section it reads (roles, tools, the derived tables' sources it compares).
            "--optimize-store-for-read-speed",
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
        """Start the child, wait until it is healthy, then supervise it until `stop()`."""
        self._stopping = asyncio.Event()
        self._restarted = asyncio.Condition()
        if self.decision_log is not None:
            self.decision_log.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.decision_log, "ab")  # noqa: ASYNC230 - once, at start; closed by stop()
        try:
            await self._spawn_healthy()
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="managed-opa-supervisor")

    def _spawn(self) -> subprocess.Popen[bytes]:
        out: int | IO[bytes] = self._log_file if self._log_file is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command(),
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            env=self.environment(),
        )
        return self.process

    async def _spawn_healthy(self) -> None:
        proc = self._spawn()
        try:
            await self.wait_healthy()
        except PolicyUnavailable:
            await _terminate(proc)
            raise

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
        raise PolicyUnavailable("the managed OPA did not become healthy in time")

    async def _supervise(self) -> None:
        """Wait for the child to exit; unless we are stopping, start another with backoff."""
        assert self._stopping is not None and self._restarted is not None
        loop = asyncio.get_running_loop()
        delay = self.backoff_initial
        while not self._stopping.is_set():
            proc = self.process
            if proc is None:
                return
            started = loop.time()
            status = await _exited(proc)
            if self._stopping.is_set():
                return
            reason = "reload" if self._reload else "exited"
            if reason == "reload" or loop.time() - started >= self.stable_after:
                delay = self.backoff_initial
            if reason == "exited":
                log.error("the managed OPA exited with status %s: denying until it is restarted", status)
            while not self._stopping.is_set():
                if reason == "exited" and await self._stopped_within(delay):
                    return
                delay = min(delay * 2, self.backoff_max)
                try:
                    await self._spawn_healthy()
                except PolicyUnavailable as exc:
                    log.error("the managed OPA did not restart (%s); retrying", exc.code)
                    reason = "exited"
                    continue
                break
            if self._stopping.is_set():
                return
            self._reload = False
            self.restarts += 1
            metrics.OPA_RESTARTS.labels(reason).inc()
            log.warning("the managed OPA is running again (restart %d, %s)", self.restarts, reason)
            async with self._restarted:
                self._restarted.notify_all()

    async def _stopped_within(self, seconds: float) -> bool:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

    async def wait_restarted(self, after: int, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a cancel scope
        """Wait until more than `after` restarts have completed (bounded by `timeout`)."""
        assert self._restarted is not None
        async with asyncio.timeout(timeout), self._restarted:
            await self._restarted.wait_for(lambda: self.restarts > after)

    async def reload(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:  # noqa: ASYNC109
        """Restart the child now, so it loads its policy and data files again; return once it is healthy.

        Decisions asked while it restarts are denied (fail closed).
        """
        proc = self.process
        if proc is None or self._supervisor is None:
            raise PolicyUnavailable("the managed OPA is not running")
        before = self.restarts
        self._reload = True
        proc.terminate()
        await self.wait_restarted(before, timeout)

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        proc, self.process = self.process, None
        if proc is not None:
            await _terminate(proc)
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if self.process is not None:  # a child the supervisor started while we were stopping
            proc, self.process = self.process, None
            await _terminate(proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def __aenter__(self) -> ManagedOpa:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _exited(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the child to exit without holding a thread: a pidfd on Linux, else a bounded-cost poll.

    (A thread blocked in `Popen.wait` would hold the interpreter's exit until the child died.)
    """
    fd = None
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(proc.pid)
    if fd is not None:
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        try:
            if proc.poll() is None:
                await readable.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    while proc.poll() is None:  # noqa: ASYNC110 - no pidfd here (or already reaped): a process has no event to await
        await asyncio.sleep(_EXIT_POLL_INTERVAL)
    return int(proc.returncode)


async def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after `DEFAULT_STOP_TIMEOUT`; reaps the child either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, DEFAULT_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
