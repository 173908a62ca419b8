"""`scripts/bootstrap.sh` says when its long step (building OPA) starts and when it has finished.

The scripts run from a copy of the repository's `scripts/` in a temporary folder, with a stand-in `go` on
PATH that "builds" a stub `opa` (printing the pinned version), an empty tool cache, and stand-ins for the
test bed and Node steps, so that the OPA step really takes the build branch and nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60.0

FAKE_GO = """#!/usr/bin/env bash
# `go install github.com/open-policy-agent/opa@vX.Y.Z`: write a stub opa into $GOBIN
version="${2##*@v}"
printf '#!/usr/bin/env bash\\necho "Version: %s"\\necho "Build Commit: stub"\\n' "$version" > "$GOBIN/opa"
chmod +x "$GOBIN/opa"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_bootstrap_announces_the_opa_build_and_its_end(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("bootstrap.sh", "opa.sh"):
        shutil.copy2(REPO / "scripts" / name, repo / "scripts" / name)
    for name in ("testbed.sh", "node-tools.sh"):
        _executable(repo / "scripts" / name, "#!/usr/bin/env bash\nexit 0\n")
    shutil.copy2(REPO / "pyproject.toml", repo / "pyproject.toml")
    digest = subprocess.run(
        ["sha256sum", "pyproject.toml"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout[:16]
    (repo / ".venv").mkdir()
    (repo / ".venv" / f".installed-{digest}").touch()  # the Python step is already done
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "go", FAKE_GO)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "MCP_FHIR_TOOL_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        ["bash", "scripts/bootstrap.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    building = next(i for i, line in enumerate(lines) if line.startswith("building OPA"))
    built = next(i for i, line in enumerate(lines) if line.startswith("built OPA"))
    ready = next(i for i, line in enumerate(lines) if line.startswith("bootstrap: OPA ready: Version:"))
    assert building < built < ready
    assert (repo / ".tools" / "bin" / "opa").is_file()
