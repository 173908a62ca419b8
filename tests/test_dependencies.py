"""What the package imports is declared in pyproject.toml, and what it declares it uses (deptry)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPTRY = Path(sys.executable).parent / "deptry"


def _deptry(root: Path, package: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(
        [str(DEPTRY), package], cwd=root, capture_output=True, text=True, timeout=300, env=env, check=False
    )


def test_every_import_of_the_package_is_a_declared_dependency():
    result = _deptry(REPO, "mcp_fhir")
    assert result.returncode == 0, result.stdout + result.stderr


def test_deptry_fails_on_an_import_that_is_not_declared(tmp_path):
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(text.replace('  "pydantic>=2.7,<3",\n', ""), encoding="utf-8")
    package = tmp_path / "mcp_fhir"
    package.mkdir()
    (package / "__init__.py").write_text("import pydantic\nimport yaml\n", encoding="utf-8")
    result = _deptry(tmp_path, "mcp_fhir")
    assert result.returncode != 0
    said = [line for line in (result.stdout + result.stderr).splitlines() if "DEP003" in line]
    assert any("'pydantic'" in line for line in said)
