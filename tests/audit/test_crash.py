"""Crashes: a SIGKILLed writer loses nothing it acknowledged; a restarted writer verifies from the last
signature and never vouches for what it finds after it (crash, then forge, then restart)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_fhir import metrics
from mcp_fhir._exceptions import AuditUnavailable
from mcp_fhir.audit.chain import entry_hash
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import AUDIT_RECOVERY_ALERT, build_trail
from mcp_fhir.audit.verify import VerifyReport, verify_file

from .conftest import make_record, public_key_of, witness_of

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

    settings = AuditSettings(path=str(path), writer_id="crash")
    trail = build_trail(settings)
    await trail.start()
    resumed_from = trail.head.seq
    for n in range(MORE_AFTER_RESTART):
        await trail.record(make_record(n))
    await trail.close()

    report = _verify(settings)
    # A kill inside a batch's write can leave complete, never-acknowledged records without their
    # signature: the restarted writer declares them unvouched instead of signing them.
    unvouched = {s for gap in report.unvouched for s in range(gap["from"], gap["to"] + 1)}
    assert report.ok or report.problem.kind == "unvouched", report.problem
    assert not set(acked) & unvouched
    accepted = _verify(settings, accept_recoveries=[g["recovery_seq"] for g in report.unvouched])
    assert accepted.ok, accepted.problem
    assert accepted.last_seq > resumed_from + MORE_AFTER_RESTART
    stored = _record_seqs(path)
    assert set(acked) <= stored


def _verify(settings: AuditSettings, **kw) -> VerifyReport:  # type: ignore[no-untyped-def]
    return verify_file(
        Path(str(settings.path)), public_key=public_key_of(settings), witness=witness_of(settings), **kw
    )


async def test_records_forged_after_a_crash_are_declared_unvouched_on_restart_never_signed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(path), writer_id="w")
    trail = build_trail(settings)
    await trail.start()
    for n in range(5):
        await trail.record(make_record(n))
    # The crash: the process dies without closing (its lock goes with it); then the forger appends
    # records that chain correctly from the last genuine checkpoint.
    await trail.sink.close()
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    forged = []
    for n in range(3):
        body = {"seq": entries[-1]["seq"] + 1, "prev": entries[-1]["hash"],
                "record": make_record(700 + n, patient="pat-forged").to_dict()}  # fmt: skip
        body["hash"] = entry_hash(body)
        entries.append(body)
        forged.append(body["seq"])
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    alerts_before = (
        metrics.REGISTRY.get_sample_value("mcp_fhir_alerts_total", {"alert": AUDIT_RECOVERY_ALERT}) or 0.0
    )

    restarted = build_trail(settings)
    await restarted.start()
    await restarted.record(make_record(99))
    await restarted.close()

    stored = [json.loads(x) for x in path.read_text().splitlines()]
    recovery = next(e for e in stored if "recovery" in e)
    assert recovery["recovery"]["kind"] == "unvouched_tail"
    assert recovery["recovery"]["unvouched"]["from"] == forged[0]
    assert recovery["recovery"]["unvouched"]["to"] == forged[-1]
    assert recovery["recovery"]["last_signed_seq"] == forged[0] - 1
    alert = stored[stored.index(recovery) + 1]["record"]
    assert alert["kind"] == "alert" and alert["alerts"] == [AUDIT_RECOVERY_ALERT]
    assert metrics.REGISTRY.get_sample_value("mcp_fhir_alerts_total", {"alert": AUDIT_RECOVERY_ALERT}) == (
        alerts_before + 1
    )
    report = _verify(settings)
    assert (report.problem.kind, report.problem.seq) == ("unvouched", forged[0])
    assert report.unvouched == [{"recovery_seq": recovery["seq"], "from": forged[0], "to": forged[-1],
                                 "accepted": False}]  # fmt: skip
    reviewed = _verify(settings, accept_recoveries=[recovery["seq"]])
    assert reviewed.ok, reviewed.problem


async def test_a_writer_refuses_to_continue_a_trail_cut_behind_its_witness(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(path), writer_id="w")
    trail = build_trail(settings)
    await trail.start()
    for n in range(5):
        await trail.record(make_record(n))
    await trail.close()
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-4]))  # the last two batches, records and signatures alike

    restarted = build_trail(settings)
    with pytest.raises(AuditUnavailable) as caught:
        await restarted.start()
    assert caught.value.code == "audit_unavailable"
    assert len(path.read_text().splitlines()) == len(lines) - 4  # nothing was signed over the cut
    await restarted.close()


async def test_a_torn_last_line_is_cut_with_a_recovery_entry_and_verify_passes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    settings = AuditSettings(path=str(path), writer_id="torn")
    trail = build_trail(settings)
    await trail.start()
    for n in range(12):
        await trail.record(make_record(n))
    await trail.close()
    good_bytes = path.read_bytes()
    with path.open("ab") as fh:  # what a crash mid-write leaves: an unacknowledged partial line
        fh.write(b'{"hash":"ab12","prev":"')
    before = _verify(settings)
    assert before.ok and any("torn" in w for w in before.warnings)

    trail = build_trail(settings)
    await trail.start()
    await trail.record(make_record(99))
    await trail.close()

    assert path.read_bytes().startswith(good_bytes)
    report = _verify(settings)
    assert report.ok, report.problem
    assert report.recoveries == 1 and report.unvouched == []
    recovery = next(json.loads(x) for x in path.read_text().splitlines() if '"recovery"' in x)["recovery"]
    assert recovery["kind"] == "torn_tail"
    assert recovery["torn"]["truncated_bytes"] == len(b'{"hash":"ab12","prev":"')
