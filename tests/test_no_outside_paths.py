"""The project runs from any clone: no file names a path of the machine it was built on, or one outside the repo.

What counts (issue 18 §3):
- an absolute path under a build machine's own folders: ``/work/``, ``/root/``, ``/home/``, ``/Users/``,
  ``/mnt/``, or a Windows user folder; these exist on one machine only;
- a literal ``/tmp/`` path: scratch space belongs to the environment, so ``${TMPDIR:-/tmp}`` (the variable,
  with ``/tmp`` as its default) is allowed and a hard-coded ``/tmp/...`` is not;
- a relative path that climbs out of the repository from the file's own folder (``../../..``), and any
  ``../shared`` (the sibling folder a build machine keeps its notes and fixtures in);
- ``Path(__file__)...parents[k]`` or a ``.parent`` chain that climbs above the repository root.

Deployment paths inside an image or a host that runs the sidecar (``/etc/mcp-fhir/``, ``/var/log/...``,
``/opt/...``, ``/usr/...``) are where an operator installs things, not paths of the build machine: allowed.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("mcp_fhir", "tests", "scripts", "bench", "examples")
SKIPPED_DIRS = {"node_modules", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

# Built from pieces so that this file does not flag itself.
_MACHINE_ROOTS = ("work", "root", "home", "Users", "mnt")
_MACHINE = re.compile(r"(?<![\w.~$}/-])/(?:" + "|".join(_MACHINE_ROOTS) + r")/[\w.-]")
_WINDOWS_USER = re.compile(r"[A-Za-z]:\\" + r"Users\\", re.IGNORECASE)
_TMP = re.compile(r"(?<![\w.~$}/-])/" + "tmp" + r"/")
_TMP_DEFAULT = re.compile(r"\$\{TMPDIR:-/" + "tmp" + r"\}")
_CLIMB = re.compile(r"(?<![\w./$})-])((?:\.\./)+[\w./-]*)")
_SHARED = re.compile(r"\.\./+" + "shared" + r"\b")
_PARENTS = re.compile(r"__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
_PARENT_CHAIN = re.compile(r"__file__\)(?:\.resolve\(\))?((?:\.parent\b)+)")


def outside_paths(text: str, rel: PurePosixPath) -> list[str]:
    """What in ``text`` (the content of the repo file at ``rel``) names a machine path or leaves the repo."""
    found: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{rel}:{lineno}"
        if _MACHINE.search(line) or _WINDOWS_USER.search(line):
            found.append(f"{where}: absolute path of a build machine")
        if _TMP.search(_TMP_DEFAULT.sub("", line)):
            found.append(f"{where}: hard-coded /tmp path (use ${{TMPDIR:-/tmp}} or a tmp_path)")
        if _SHARED.search(line):
            found.append(f"{where}: path to ../shared, outside the repository")
        for match in _CLIMB.finditer(line):
            depth = len(rel.parts) - 1  # folders between the repo root and the file
            ups = match.group(1).count("../")
            if ups > depth:
                found.append(f"{where}: relative path {match.group(1)!r} climbs out of the repository")
        for match in _PARENTS.finditer(line):
            if int(match.group(1)) >= len(rel.parts):
                found.append(f"{where}: parents[{match.group(1)}] is above the repository root")
        for match in _PARENT_CHAIN.finditer(line):
            if match.group(1).count(".parent") > len(rel.parts):
                found.append(f"{where}: a .parent chain climbs above the repository root")
    return found


def _scanned_files() -> list[Path]:
    files = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            parts = path.relative_to(REPO).parts
            # This file spells out what it looks for; the unit cases below show that each pattern is found.
            if path.is_file() and not SKIPPED_DIRS.intersection(parts) and path != Path(__file__).resolve():
                files.append(path)
    return files


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:4096]:
        return None
    return data.decode("utf-8", errors="replace")


def test_no_file_names_a_build_machine_path_or_a_path_outside_the_repository() -> None:
    problems: list[str] = []
    files = _scanned_files()
    assert len(files) > 100  # the scan saw the project, not an empty folder
    for path in files:
        text = _text(path)
        if text is not None:
            problems += outside_paths(text, PurePosixPath(path.relative_to(REPO).as_posix()))
    assert problems == []


@pytest.mark.parametrize(
    ("line", "rel"),
    [
        ('SAMPLES = Path("/' + 'work/shared/fixtures/vendor-samples")', "tests/ehr/test_x.py"),
        ('cfg = "/' + 'home/dev/mcp-fhir/config.yaml"', "scripts/x.py"),
        ('"command": "/' + 'Users/dev/mcp-fhir/.venv/bin/mcp-fhir"', "examples/clients/x.json"),
        ("C:\\" + "Users\\dev\\mcp-fhir", "examples/x.md"),
        ("out=/" + "tmp/mcp-fhir-cov.json", "scripts/test.sh"),
        ("notes = Path('.." + "/shared/notes')", "tests/x.py"),
        ('SHARED = Path(__file__).resolve().parents[3] / "shared"', "tests/integration/test_x.py"),
        ("ROOT = Path(__file__).parent.parent.parent", "scripts/x.py"),
        ('open("../../../etc/passwd")', "tests/ehr/test_x.py"),
    ],
)
def test_a_machine_path_or_a_path_out_of_the_repository_is_found(line: str, rel: str) -> None:
    assert outside_paths(line, PurePosixPath(rel)) != []


@pytest.mark.parametrize(
    ("line", "rel"),
    [
        ('out="${TMPDIR:-/' + 'tmp}/mcp-fhir-cov.json"', "scripts/test.sh"),
        ("--config /etc/mcp-fhir/config.yaml", "examples/x.md"),
        ("#!/usr/bin/env bash", "scripts/x.sh"),
        ('REPO = Path(__file__).resolve().parents[2] / "policies"', "tests/integration/test_x.py"),
        ('{"patient_id": "../Patient/x"}', "tests/tools/test_x.py"),
        ('"http://ehr.test/fhir/../admin/users"', "tests/ehr/test_x.py"),
        ("see tests/data/vendor-samples/SOURCES.md", "mcp_fhir/ehr/x.py"),
    ],
)
def test_a_path_inside_the_repository_or_a_deployment_path_is_allowed(line: str, rel: str) -> None:
    assert outside_paths(line, PurePosixPath(rel)) == []
