"""Every documented procedure runs, exactly as written: the docs are the script.

A procedure is a region of a Markdown file between `<!-- procedure: NAME -->` and `<!-- /procedure -->`.
Inside it, fenced blocks whose info string carries one of these words are executed in order; every other
block is prose to the runner:

    ```yaml file=PATH merge         deep-merge the YAML into PATH (maps merge, lists and scalars replace)
    ```rego file=PATH               write the block to PATH (creates it, or replaces it)
    ```rego file=PATH append        append the block to PATH
    ```sh run                       run the block with `bash -euo pipefail` (exit 0 expected)
    ```sh run exit=N                ... and expect exit code N
    ```text expect                  each non-blank line must appear, in order, in the last run's output
    ```json expect                  the last run's stdout is JSON that contains this JSON (objects as subsets)

Each procedure runs in a fresh copy of the repository's tracked files (its `.venv`, `.tools` and the test
bed's `node_modules` linked, not copied), so a procedure can edit `policies/` or write configs freely.
Commands find `mcp-fhir`, `opa` and `python` on PATH. A procedure that needs the FHIR test bed or a server
starts it in its own `sh run` block (`scripts/testbed-serve.sh` or `mcp-fhir serve &`) and stops it in a
later block.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/*.md", "policies/README.md", "examples/**/README.md")
_START = re.compile(r"<!--\s*procedure:\s*([a-z0-9][a-z0-9-]*)\s*-->")
_END = re.compile(r"<!--\s*/procedure\s*-->")
_FENCE = re.compile(r"^(```+|~~~+)\s*([^\n]*)\n(.*?)^\1\s*$", re.DOTALL | re.MULTILINE)
STEP_TIMEOUT = 300


class ProcedureError(AssertionError):
    """A documented procedure did not do what its doc says."""


@dataclass
class Step:
    kind: str  # file | run | expect
    body: str
    attrs: dict[str, str] = field(default_factory=dict)
    lang: str = ""


@dataclass
class Procedure:
    name: str
    source: str  # doc path relative to the repo, for the test id
    steps: list[Step]


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
            elif "expect" in attrs:
                steps.append(Step("expect", body, attrs, lang))
        if not any(s.kind == "run" for s in steps):
            raise ProcedureError(f"{source}: procedure {match.group(1)} runs nothing")
        procedures.append(Procedure(match.group(1), source, steps))
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
    return found


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


def run(procedure: Procedure, workdir: Path, *, env: dict[str, str] | None = None) -> list[str]:
    """Run one procedure in `workdir` (a sandbox). Returns each run step's output; raises ProcedureError."""
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
                    found = last.find(line, cursor)
                    if found < 0:
                        raise ProcedureError(
                            f"{where}, step {index}: the output lacks {line!r}\n{last[-3000:]}"
                        )
                    cursor = found + len(line)
    return outputs
