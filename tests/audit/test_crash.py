"""A writer SIGKILLed under load loses nothing it acknowledged, and a new writer resumes the chain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail
from mcp_fhir.audit.verify import verify_file

from .conftest import make_record

ACKS_BEFORE_KILL = 300
MORE_AFTER_RESTART = 40
REPO = Path(__file__).resolve().parents[2]


def _record_seqs(path: Path) -> set[int]:
    seqs = set()
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "record" in entry:
            seqs.add(entry["seq"])
    return seqs


async def test_a_sigkilled_writer_keeps_every_acknowledged_record_and_the_chain_resumes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("crash_writer.py")), str(path), "16"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path,
    )  # fmt: skip
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks on real output; the pytest timeout bounds it
            acked.append(int(line))
            if len(acked) >= ACKS_BEFORE_KILL:
                break
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        acked.extend(int(x) for x in rest.split())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= ACKS_BEFORE_KILL

    trail = build_trail(AuditSettings(path=str(path), writer_id="crash", checkpoint_every=25))
    await trail.start()
    resumed_from = trail.head.seq
    for n in range(MORE_AFTER_RESTART):
        await trail.record(make_record(n))
    await trail.close()

    report = verify_file(path, public_key=Path(str(path) + ".signing.pem.pub").read_bytes())
    assert report.ok, report.problem
    assert report.last_seq > resumed_from + MORE_AFTER_RESTART
    stored = _record_seqs(path)
    assert set(acked) <= stored


async def test_a_torn_last_line_is_cut_with_a_recovery_entry_and_verify_passes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(path), writer_id="torn", checkpoint_every=5)
    trail = build_trail(settings)
    await trail.start()
    for n in range(12):
        await trail.record(make_record(n))
    await trail.close()
    good_bytes = path.read_bytes()
    with path.open("ab") as fh:  # what a crash mid-write leaves: an unacknowledged partial line
        fh.write(b'{"hash":"ab12","prev":"')
    before = verify_file(path)
    assert before.ok and any("torn" in w for w in before.warnings)

    trail = build_trail(settings)
    await trail.start()
    await trail.record(make_record(99))
    await trail.close()

    assert path.read_bytes().startswith(good_bytes)
    report = verify_file(path, public_key=Path(str(path) + ".signing.pem.pub").read_bytes())
    assert report.ok, report.problem
    assert report.recoveries == 1
    recovery = next(json.loads(x) for x in path.read_text().splitlines() if '"recovery"' in x)["recovery"]
    assert recovery["kind"] == "torn_tail"
    assert recovery["truncated_bytes"] == len(b'{"hash":"ab12","prev":"')
