"""The Node tools (MCP Inspector, conformance suite) install from a committed lock, never from `@latest`."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCKED = REPO / "scripts" / "node-tools"


def test_the_node_tools_are_pinned_to_exact_versions_and_locked():
    package = json.loads((LOCKED / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((LOCKED / "package-lock.json").read_text(encoding="utf-8"))
    wanted = package["dependencies"]
    assert set(wanted) == {"@modelcontextprotocol/inspector", "@modelcontextprotocol/conformance"}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in wanted.values()), wanted
    assert lock["packages"][""]["dependencies"] == wanted
    for name, version in wanted.items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert all(
        meta.get("integrity") for where, meta in lock["packages"].items() if where and not meta.get("link")
    )


def test_the_install_script_uses_the_lock_and_no_floating_tag():
    script = (REPO / "scripts" / "node-tools.sh").read_text(encoding="utf-8")
    assert "npm ci" in script and "package-lock.json" in script
    assert "npm install" not in script.replace("npm install --package-lock-only", "")
    assert "@latest" not in script
    assert not re.search(r"@modelcontextprotocol/[a-z-]+@", script)  # no version given on the command line
