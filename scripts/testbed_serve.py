"""Start the FHIR test bed, loaded with the synthetic patients, where a sidecar config expects its backend.

    scripts/testbed.sh && .venv/bin/python scripts/testbed_serve.py --config examples/configs/testbed-stdio.yaml

It reads the backend's ``base_url`` (the only backend, or ``--backend NAME``), starts the test bed (Medplum's
FHIR router on Node 22, ``tests/testbed/``) on that loopback port, loads the data set, prints one line with
the base URL, and serves until interrupted (Ctrl-C or SIGTERM). The test bed's base is always
``http://127.0.0.1:<port>/fhir/R4``: a config whose ``base_url`` says otherwise is refused with the URL it
should have, since the sidecar would find nothing there. Exit codes: 0 stopped, 1 could not start, 2 usage.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcp_fhir import config  # noqa: E402
from mcp_fhir._exceptions import MCPFhirError  # noqa: E402
from tests.testbed.fhir import TestbedError, start_fhir_server  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost")


def configured_port(config_file: Path, backend: str | None) -> int:
    """The port of the backend's base_url, which must be the test bed's loopback base."""
    settings = config.load(config_file, files=False)  # only the backend URL matters here
    names = sorted(settings.backends)
    name = backend or (names[0] if len(names) == 1 else None)
    if name is None or name not in settings.backends:
        raise SystemExit(f"testbed_serve: name one of the backends with --backend: {', '.join(names)}")
    url = urlsplit(str(settings.backends[name].base_url))
    if url.scheme != "http" or url.hostname not in LOOPBACK or url.port is None:
        raise SystemExit(f"testbed_serve: backend {name!r} is not on a loopback http port")
    expected = f"http://{url.hostname}:{url.port}/fhir/R4"
    if str(settings.backends[name].base_url).rstrip("/") != expected:
        raise SystemExit(f"testbed_serve: the test bed serves {expected}; set backends.{name}.base_url to it")
    return url.port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, required=True, help="the sidecar config whose backend to serve"
    )
    parser.add_argument("--backend", help="the backend's name, when the config has more than one")
    args = parser.parse_args(argv)
    try:
        port = configured_port(args.config, args.backend)
    except MCPFhirError as exc:
        print(f"testbed_serve: the config does not load ({exc.code})", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with start_fhir_server(port=port) as server:
            print(f"testbed_serve: ready at {server.base_url} (Ctrl-C stops it)", flush=True)
            stop.wait()
    except TestbedError as exc:
        print(f"testbed_serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
