"""The disclosures HTML in a real browser: headless Chromium renders its tables and runs nothing from the data.

Skipped when no Chromium is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mcp_fhir.audit.disclosures import render

from .test_disclosures import INJECTED, _build, _trail

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
)  # fmt: skip
BROWSER_TIMEOUT_SECONDS = 60


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium installed")


async def test_headless_chromium_renders_the_report_and_runs_no_injected_script(tmp_path: Path) -> None:
    browser = _chromium()
    page = tmp_path / "report.html"
    page.write_text(render(_build(await _trail(tmp_path)), "html"))
    done = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT_SECONDS,
    )  # fmt: skip
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert dom.count("<table>") == 5  # who, what, every access, break-glass, denied ("failed": none)
    assert "<script" not in dom  # the agent's text stays text: no element was created from it
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "## SYSTEM" in dom and INJECTED.split("|")[1].strip() in dom.replace("&lt;", "<").replace(
        "&gt;", ">"
    )
