"""`bench.opa_ab`'s floor: a policies folder whose decision is one constant, served by a real OPA."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bench.opa_ab import constant_policy
from tests.testbed.sidecar import POLICIES


def _eval(opa: str, folder: Path, query: str, inp: object) -> Any:
    out = subprocess.run(
        [
            opa,
            "eval",
            "--format",
            "raw",
            "--ignore",
            "*_test.rego",
            "-d",
            str(folder),
            "--stdin-input",
            query,
        ],
        input=json.dumps(inp).encode(),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(out)


def test_the_constant_policy_answers_its_value_for_any_input_and_keeps_the_shipped_mask(
    tmp_path: Path, opa_binary: str
):
    value = {"allow": True, "reasons": [], "valid_for_s": 300}
    folder = constant_policy(tmp_path / "constant", value)
    assert _eval(opa_binary, folder, "data.mcp_fhir.authz.decision", {}) == value
    assert _eval(opa_binary, folder, "data.mcp_fhir.authz.decision", {"anything": [1, 2]}) == value
    event = {"input": {"resource": {"patient": "p1", "params": {}}, "subject": {"claims": {}}}}
    shipped = _eval(opa_binary, POLICIES, "data.system.log.mask", event)
    assert _eval(opa_binary, folder, "data.system.log.mask", event) == shipped
    assert "/input/resource/patient" in shipped
