"""A py-spy profile of the sidecar under load, summarised by call-path layer.

`py-spy record --gil --format raw` writes collapsed stacks (`frame;frame;... count`, root first) of
the thread holding the GIL only, so the shares are of the sidecar's Python CPU time, not of time
spent waiting for OPA, the EHR or the disk. Each sample is charged to the innermost step of our
call path in its stack (`PRIMARY`), so time in `json` or `asyncio` called from the audit sink is
audit time; a sample with no such frame goes to the innermost library layer (`SECONDARY`), so
pydantic called by the MCP SDK is validation/serialisation.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.procs import Child

PROFILE_CONCURRENCY = (1, 32)
DEFAULT_PROFILE_SECONDS = 8.0
PY_SPY_RATE = 200  # samples per second
RESULTS = Path(__file__).resolve().parent / "results"

# (layer, substrings of a frame's file path). A sample goes to the innermost frame of the call path
# (PRIMARY: our own steps), so json, pydantic or aiohttp called from the audit sink is audit time;
# only a sample with no call-path frame goes to the innermost library layer (SECONDARY).
PRIMARY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("audit", ("mcp_fhir/audit/",)),
    ("obligations", ("mcp_fhir/policy/obligations.py", "mcp_fhir/tools/results.py")),
    ("decision", ("mcp_fhir/policy/", "opa_client/")),
    ("FHIR", ("mcp_fhir/ehr/", "mcp_fhir/resilience/", "fhirpy/")),
    # Verification only: the auth middlewares (ours in agent_auth/http.py, the SDK's RequireAuth) wrap
    # the whole request, so matching them would charge everything beneath to auth.
    (
        "auth",
        ("mcp_fhir/agent_auth/api_keys.py", "mcp_fhir/agent_auth/jwt.py", "mcp_fhir/agent_auth/verifier.py"),
    ),
    ("call path (other)", ("mcp_fhir/tools/", "mcp_fhir/context.py")),
)
SECONDARY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("validation/serialisation", ("pydantic", "jsonschema")),
    # aiohttp carries both the OPA and the EHR exchanges; its socket callbacks have no caller of ours.
    ("HTTP client I/O (aiohttp)", ("aiohttp/", "yarl/", "multidict/")),
    ("MCP framing", ("mcp/", "starlette/", "uvicorn/", "sse_starlette/", "anyio/", "h11/", "httptools")),
    ("idmap", ("sqlite3", "aiosqlite")),
    ("event loop", ("asyncio/", "selectors.py", "uvloop")),
)
LAYERS = PRIMARY + SECONDARY


def _innermost(frames: list[str], layers: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for frame in reversed(frames):
        for layer, needles in layers:
            if any(n in frame for n in needles):
                return layer
    return None


def layer_of(stack: str) -> str:
    frames = stack.split(";")
    return _innermost(frames, PRIMARY) or _innermost(frames, SECONDARY) or "other"


def summarise(raw_lines: Iterable[str]) -> dict[str, float]:
    """Fraction of samples per layer, from py-spy raw output."""
    counts: Counter[str] = Counter()
    for line in raw_lines:
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[layer_of(stack)] += int(n)
    total = sum(counts.values()) or 1
    return {layer: round(count / total, 4) for layer, count in counts.most_common()}


async def profile_sidecar(bench: Any, child: Child, stream: Callable[[], Any]) -> dict[str, Any]:
    """Record the sidecar while `stream`s load it, at each of `PROFILE_CONCURRENCY`."""
    from bench.load import run_cell

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).is_file():
        return {"tool": None, "note": "py-spy is not installed (pip install py-spy)"}
    out: dict[str, Any] = {"tool": "py-spy", "rate": PY_SPY_RATE, "layers": {}}
    seconds = DEFAULT_PROFILE_SECONDS
    RESULTS.mkdir(parents=True, exist_ok=True)
    for conc in PROFILE_CONCURRENCY:
        raw = RESULTS / f"profile-c{conc}.txt"
        proc = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(child.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                str(PY_SPY_RATE),
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
                "--gil",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        cell = await run_cell(stream, conc, seconds=seconds + 1.0)
        _, err = await asyncio.to_thread(proc.communicate, None, seconds + 30)
        if proc.returncode != 0 or not raw.is_file():
            out["layers"][str(conc)] = {"error": err.decode(errors="replace")[-300:]}
            continue
        layers = summarise(raw.read_text(encoding="utf-8").splitlines())
        out["layers"][str(conc)] = {
            "throughput": round(cell.throughput, 1),
            "p50_ms": round(cell.p50_ms, 3),
            "share": layers,
        }
        bench.log(f"profile c={conc}: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in layers.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.profile FILE...`: the layer shares of saved py-spy raw stacks."""
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m bench.profile bench/results/profile-c1.txt ...", file=sys.stderr)
        return 2
    for path in paths:
        shares = summarise(path.read_text(encoding="utf-8").splitlines())
        print(f"{path.name}: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in shares.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
