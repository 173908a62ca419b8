"""Child processes the harness owns: sidecar replicas and the WSO2 peer, plus their memory readings.

Each child is started directly (no shell), so its pid is the server's pid: `py-spy` and
`/proc/<pid>/status` read the process that serves requests. Readiness is polled against a real
condition (`/healthz`, `/readyz`, or an MCP port answering) under a deadline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx2
import yaml

from bench.stats import BenchError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_READY_TIMEOUT = 60.0  # seconds for a child to answer its readiness probe
DEFAULT_STOP_TIMEOUT = 5.0
READY_POLL_INTERVAL = 0.1
PEER_VENV = REPO / ".tools" / "peer-venv"
PEER_BINARY = PEER_VENV / "bin" / "fhir-mcp-server"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used, in seconds, from `/proc/<pid>/stat`."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError as exc:
        raise BenchError(f"cannot read the CPU time of pid {pid}") from exc
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of the machine has spent busy (steal included), from `/proc/stat`."""
    try:
        fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()
    except (OSError, IndexError) as exc:
        raise BenchError("cannot read /proc/stat") from exc
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in KiB, from `/proc/<pid>/status`."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError as exc:
        raise BenchError(f"cannot read memory of pid {pid}") from exc
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


@dataclass
class Child:
    """A child server process and where to reach it."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)
    metrics_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


async def _wait_until(child: Child, probe_url: str, ok: Any, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx2.AsyncClient(timeout=2.0) as client:
        while loop.time() < deadline:
            if not child.alive():
                raise BenchError(
                    f"{child.name} exited with status {child.process.returncode}; see {child.log_path}"
                )
            try:
                if ok(await client.get(probe_url)):
                    return
            except httpx2.TransportError:
                pass
            await asyncio.sleep(READY_POLL_INTERVAL)
    await child.stop()
    raise BenchError(f"{child.name} was not ready within {timeout:g} s; see {child.log_path}")


def _spawn(
    name: str, argv: list[str], log_path: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    process = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    return process, log


async def start_sidecar(
    name: str,
    cfg: dict[str, Any],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = DEFAULT_READY_TIMEOUT,
) -> Child:
    """`mcp-fhir serve --config <workdir>/<name>.yaml` (HTTP); ready when `/readyz` answers 200."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    server = cfg["server"]
    base = f"http://{server['host']}:{server['port']}"
    argv = [
        sys.executable,
        "-m",
        "mcp_fhir.cli.main",
        "serve",
        "--config",
        str(path),
        "--log-level",
        "WARNING",
    ]
    process, log = _spawn(name, argv, workdir / f"{name}.log", {**os.environ, **(env or {})})
    child = Child(name, process, base + server.get("path", "/mcp"), workdir / f"{name}.log", log)
    await _wait_until(child, base + "/readyz", lambda r: r.status_code == 200, timeout)
    return child


def peer_available() -> bool:
    return PEER_BINARY.is_file() and os.access(PEER_BINARY, os.X_OK)


async def start_peer(
    fhir_base_url: str, port: int, workdir: Path, *, timeout: float = DEFAULT_READY_TIMEOUT
) -> Child:
    """WSO2's `fhir-mcp-server` 0.10.0 (its own venv), no authorization, streamable HTTP at `/mcp/`."""
    if not peer_available():
        raise BenchError(f"the peer is not installed at {PEER_VENV} (see docs/performance.md)")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))},
        "FHIR_SERVER_BASE_URL": fhir_base_url,
        "FHIR_SERVER_DISABLE_AUTHORIZATION": "true",
        "FHIR_MCP_HOST": "127.0.0.1",
        "FHIR_MCP_PORT": str(port),
    }
    argv = [str(PEER_BINARY), "--transport", "streamable-http", "--log-level", "error"]
    try:
        process, log = _spawn("peer", argv, workdir / "peer.log", env)
    except OSError as exc:  # e.g. a venv copied from elsewhere: its scripts name an interpreter that is gone
        raise BenchError(f"the peer at {PEER_VENV} cannot start ({exc.strerror}); reinstall it") from exc
    url = f"http://127.0.0.1:{port}/mcp/"
    child = Child("peer", process, url, workdir / "peer.log", log)
    # Any HTTP answer on the MCP path (405/406/400 to a bare GET) means it is listening.
    await _wait_until(child, url, lambda r: r.status_code < 500, timeout)
    return child
