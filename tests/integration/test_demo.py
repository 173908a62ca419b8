"""The README's first command, `make demo`, runs its scripted session to the end: every call allowed or
denied as the script expects, the audit chain verified, the consent scene and the accounting of
disclosures. `scripts/demo.py` exits non-zero when anything is not as it should be, so CI runs it as it is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.testbed.sidecar import REPO

pytestmark = pytest.mark.integration

DEMO_TIMEOUT_S = 600


def test_the_readme_demo_runs_its_whole_session_and_exits_zero():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Traceback" not in done.stderr
