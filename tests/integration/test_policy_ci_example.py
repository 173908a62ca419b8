"""examples/policy-ci proves itself: its gate passes the policies as they are and fails a widening."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "examples" / "policy-ci" / "check.sh"

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_the_policy_ci_gate_passes_unchanged_policies_and_fails_a_widening(tmp_path):
    result = subprocess.run(
        ["bash", str(CHECK), "--self-test"],
        env={**os.environ, "REPORT_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
