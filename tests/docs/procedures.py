"""Every documented procedure runs, exactly as written: the docs are the script.

A procedure is a region of a Markdown file between `<!-- procedure: NAME -->` and `<!-- /procedure -->`.
Inside it, fenced blocks whose info string carries one of these words are executed in order; every other
block is prose to the runner:

    ```yaml file=PATH merge         deep-merge the YAML into PATH (maps merge, lists and scalars replace)
    ```rego file=PATH               write the block to PATH (creates it, or replaces it)
    ```rego file=PATH append        append the block to PATH
    ```sh run                       run the block with `bash -euo pipefail` (exit 0 expected)
    ```sh run exit=N                ... and expect exit code N
    ```sh background ready=URL      start the block in the background (its own process group); go on once
                                    URL answers 2xx or 3xx, within `timeout=N` seconds
                                    (default 60); a block that exits first fails the procedure. It is
                                    stopped (SIGTERM, then SIGKILL) when the procedure ends, pass or fail
    ```text expect                  each non-blank line must appear, in order, in the last run's output
    ```text expect unordered        ... in any order (tests that OPA runs in parallel print in any order)
    ```json expect                  the last run's stdout is JSON that contains this JSON (objects as subsets)

`<!-- procedure: NAME needs=OTHER -->` runs procedure OTHER's steps first (in the same copy), so a doc can
build on the previous example without repeating its snippets.

Each procedure runs in a fresh copy of the repository's tracked files (its `.venv`, `.tools` and the test
bed's `node_modules` linked, not copied), so a procedure can edit `policies/` or write configs freely.
Commands find `mcp-fhir`, `opa` and `python` on PATH. A procedure that needs the FHIR test bed or a server
starts it in a `sh background ready=URL` block; readiness is polled with a bound, never slept on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/*.md", "policies/README.md", "examples/**/README.md")
_START = re.compile(r"<!--\s*procedure:\s*([a-z0-9][a-z0-9-]*)(?:\s+needs=([a-z0-9][a-z0-9-]*))?\s*-->")
_END = re.compile(r"<!--\s*/procedure\s*-->")
_FENCE = re.compile(r"^(```+|~~~+)\s*([^\n]*)\n(.*?)^\1\s*$", re.DOTALL | re.MULTILINE)
STEP_TIMEOUT = 300
READY_TIMEOUT = 60.0  # default bound on a background step's readiness
READY_POLL = 0.2  # seconds between readiness probes (spent waiting on the process, not sleeping)
STOP_TIMEOUT = 10.0  # SIGTERM to SIGKILL


class ProcedureError(AssertionError):
    """A documented procedure did not do what its doc says."""


@dataclass
class Step:
    kind: str  # file | run | background | expect
    body: str
    attrs: dict[str, str] = field(default_factory=dict)
    lang: str = ""


@dataclass
class Procedure:
    name: str
    source: str  # doc path relative to the repo, for the test id
    steps: list[Step]
    needs: str | None = None


def _attrs(info: str) -> tuple[str, dict[str, str]]:
    words = info.split()
    lang = words[0] if words else ""
    attrs: dict[str, str] = {}
    for word in words[1:]:
        key, _, value = word.partition("=")
        attrs[key] = value
    return lang, attrs


def parse(text: str, source: str = "<doc>") -> list[Procedure]:
    """The procedures of one Markdown text, in order. Unclosed or nested regions are errors."""
    procedures: list[Procedure] = []
    pos = 0
    while match := _START.search(text, pos):
        end = _END.search(text, match.end())
        nested = _START.search(text, match.end())
        if end is None or (nested is not None and nested.start() < end.start()):
            raise ProcedureError(f"{source}: procedure {match.group(1)} is not closed before the next one")
        steps: list[Step] = []
        for fence in _FENCE.finditer(text[match.end() : end.start()]):
            lang, attrs = _attrs(fence.group(2))
            body = fence.group(3)
            if "file" in attrs:
                steps.append(Step("file", body, attrs, lang))
            elif "run" in attrs:
                steps.append(Step("run", body, attrs, lang))
            elif "background" in attrs:
                if not attrs.get("ready"):
                    raise ProcedureError(
                        f"{source}: procedure {match.group(1)}: a background step needs ready=URL"
                    )
                steps.append(Step("background", body, attrs, lang))
            elif "expect" in attrs:
                steps.append(Step("expect", body, attrs, lang))
        if not any(s.kind == "run" for s in steps):
            raise ProcedureError(f"{source}: procedure {match.group(1)} runs nothing")
        procedures.append(Procedure(match.group(1), source, steps, match.group(2)))
        pos = end.end()
    return procedures


def discover(root: Path = REPO) -> list[Procedure]:
    """Every procedure in the project's docs."""
    found: list[Procedure] = []
    for pattern in DOCS:
        for path in sorted(root.glob(pattern)):
            found += parse(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
    names = [p.name for p in found]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ProcedureError(f"procedure names used twice: {sorted(dupes)}")
    return resolve(found)


def resolve(procedures: list[Procedure]) -> list[Procedure]:
    """Each procedure with the steps of the procedures it needs put first. Unknown or circular needs are errors."""
    by_name = {p.name: p for p in procedures}

    def steps(proc: Procedure, seen: tuple[str, ...]) -> list[Step]:
        if proc.needs is None:
            return list(proc.steps)
        if proc.needs in seen:
            raise ProcedureError(f"{proc.source}: procedure {proc.name} needs itself through {proc.needs}")
        if proc.needs not in by_name:
            raise ProcedureError(
                f"{proc.source}: procedure {proc.name} needs {proc.needs}, which no doc holds"
            )
        return steps(by_name[proc.needs], (*seen, proc.name)) + list(proc.steps)

    return [Procedure(p.name, p.source, steps(p, ()), p.needs) for p in procedures]


def _merge(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = _merge(base.get(key), value) if key in base else value
        return out
    return extra


def sandbox(dest: Path, root: Path = REPO) -> Path:
    """A fresh copy of the repository's tracked files, with the heavy local installs linked."""
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, tracked):
        src = root / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    for rel in (".venv", ".tools", "tests/testbed/fhir_server/node_modules"):
        if (root / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).symlink_to((root / rel).resolve())
    return dest


def _contains(actual: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and _contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return isinstance(actual, list) and all(any(_contains(a, e) for a in actual) for e in expected)
    return bool(actual == expected)


def _ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Poll `url` until it answers 2xx or 3xx; None when ready, else why not (exited, or the bound passed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=READY_POLL * 5) as reply:
                if reply.status < 400:
                    return None
        except urllib.error.HTTPError as exc:
            if exc.code < 400:
                return None
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return f"not ready at {url} within {timeout:g} s"
        try:
            code = process.wait(READY_POLL)
        except subprocess.TimeoutExpired:
            continue
        return f"exited with {code} before {url} answered"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a background step's whole process group: SIGTERM, SIGKILL after STOP_TIMEOUT, then any leftover."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def run(procedure: Procedure, workdir: Path, *, env: dict[str, str] | None = None) -> list[str]:
    """Run one procedure in `workdir` (a sandbox). Returns each run step's output; raises ProcedureError.

    Background steps are stopped when it ends, whether it passed or not."""
    background: _Background = []
    try:
        return _run(procedure, workdir, env, background)
    finally:
        for process, log in reversed(background):
            _stop(process)
            log.close()


_Background = list[tuple[subprocess.Popen[bytes], Any]]


def _run(
    procedure: Procedure, workdir: Path, env: dict[str, str] | None, background: _Background
) -> list[str]:
    bin_path = os.pathsep.join([str(workdir / ".venv" / "bin"), str(workdir / ".tools" / "bin")])
    environment = {
        **os.environ,
        **(env or {}),
        "PATH": bin_path + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(workdir),
        "MCP_FHIR_OPA": str(workdir / ".tools" / "bin" / "opa"),
    }
    outputs: list[str] = []
    last = ""
    where = f"{procedure.source} procedure {procedure.name}"
    for index, step in enumerate(procedure.steps, 1):
        if step.kind == "file":
            target = workdir / step.attrs["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if "merge" in step.attrs:
                current = yaml.safe_load(target.read_text(encoding="utf-8")) if target.exists() else {}
                merged = _merge(current or {}, yaml.safe_load(step.body))
                target.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
            elif "append" in step.attrs:
                with target.open("a", encoding="utf-8") as fh:
                    fh.write("\n" + step.body)
            else:
                target.write_text(step.body, encoding="utf-8")
        elif step.kind == "run":
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", step.body],
                cwd=workdir,
                env=environment,
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
            want = int(step.attrs.get("exit") or 0)
            last = done.stdout + done.stderr
            outputs.append(last)
            if done.returncode != want:
                raise ProcedureError(
                    f"{where}, step {index}: exit {done.returncode}, the doc says {want}\n{step.body}\n{last[-3000:]}"
                )
            last_stdout = done.stdout
        elif step.kind == "background":
            log = tempfile.TemporaryFile()
            process = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", step.body],
                cwd=workdir,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            background.append((process, log))
            why = _ready(step.attrs["ready"], process, float(step.attrs.get("timeout") or READY_TIMEOUT))
            if why is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                raise ProcedureError(f"{where}, step {index}: the background step {why}\n{step.body}\n{tail}")
        elif step.kind == "expect":
            if step.lang == "json":
                try:
                    actual = json.loads(last_stdout)
                except (ValueError, UnboundLocalError) as exc:
                    raise ProcedureError(
                        f"{where}, step {index}: the output is not JSON\n{last[-2000:]}"
                    ) from exc
                if not _contains(actual, json.loads(step.body)):
                    raise ProcedureError(
                        f"{where}, step {index}: the output lacks\n{step.body}\n{last[-3000:]}"
                    )
            else:
                cursor = 0
                for line in (ln.strip() for ln in step.body.splitlines()):
                    if not line:
                        continue
                    if "unordered" in step.attrs:
                        cursor = 0
                    found = last.find(line, cursor)
                    if found < 0:
                        raise ProcedureError(
                            f"{where}, step {index}: the output lacks {line!r}\n{last[-3000:]}"
                        )
                    cursor = found + len(line)
    return outputs
