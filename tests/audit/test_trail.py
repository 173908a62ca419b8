"""AuditTrail: durable group commit, failure and recovery, encryption, alerts and queries."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest

from mcp_fhir import metrics
from mcp_fhir._exceptions import AuditUnavailable, InvalidArgument
from mcp_fhir.audit.query import AuditQuery
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import AuditTrail, build_trail
from mcp_fhir.audit.verify import verify_file

from .conftest import make_record, public_key_of, witness_of

CONCURRENT_CALLS = 2000
GATHER_BATCH = 250


def _failures() -> float:
    return metrics.REGISTRY.get_sample_value("mcp_fhir_audit_failures_total") or 0.0


def _alerts(name: str) -> float:
    return metrics.REGISTRY.get_sample_value("mcp_fhir_alerts_total", {"alert": name}) or 0.0


def _entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_two_thousand_concurrent_records_are_all_stored_and_the_chain_verifies(
    file_settings: AuditSettings,
) -> None:
    trail = build_trail(file_settings)
    await trail.start()
    ids: list[str] = []
    for start in range(0, CONCURRENT_CALLS, GATHER_BATCH):
        ids += await asyncio.gather(
            *(trail.record(make_record(n)) for n in range(start, start + GATHER_BATCH))
        )
    await trail.close()
    path = Path(str(file_settings.path))
    records = [e for e in _entries(path) if "record" in e]
    assert len(records) == CONCURRENT_CALLS
    assert len(set(ids)) == CONCURRENT_CALLS
    report = verify_file(path, public_key=public_key_of(file_settings), witness=witness_of(file_settings))
    assert report.ok, report.problem
    assert report.records == CONCURRENT_CALLS
    assert 1 <= report.checkpoints == trail.sink.commit_count


async def test_concurrent_records_share_fewer_fsyncs_than_records(file_trail: AuditTrail) -> None:
    await asyncio.gather(*(file_trail.record(make_record(n)) for n in range(200)))
    assert 1 <= file_trail.sink.commit_count < 200


async def test_record_returns_only_after_its_entry_is_on_disk(file_trail: AuditTrail, file_settings) -> None:
    rid = await file_trail.record(make_record(7))
    seq = int(rid.split(":")[0])
    stored = {e["seq"]: e for e in _entries(Path(file_settings.path))}
    assert stored[seq]["record"]["request_id"] == "req-7"
    assert file_trail.sink.commit_count >= 1


async def test_a_vanished_log_directory_makes_record_fail_and_check_recovers_after_repair(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "audit"
    settings = AuditSettings(path=str(folder / "audit.jsonl"), writer_id="w")
    trail = build_trail(settings)
    await trail.start()
    await trail.record(make_record(1))
    assert await trail.check()
    failures = _failures()

    folder.rename(tmp_path / "moved")
    with pytest.raises(AuditUnavailable) as caught:
        await trail.record(make_record(2))
    assert caught.value.code == "audit_unavailable"
    assert caught.value.__cause__ is not None
    assert _failures() == failures + 1
    assert not await trail.check()
    with pytest.raises(AuditUnavailable):
        await trail.record(make_record(3))

    (tmp_path / "moved").rename(folder)
    assert await trail.check()
    await trail.record(make_record(4))
    await trail.close()
    report = verify_file(
        folder / "audit.jsonl", public_key=public_key_of(settings), witness=witness_of(settings)
    )
    assert report.ok, report.problem
    assert [e["record"]["request_id"] for e in _entries(folder / "audit.jsonl") if "record" in e] == [
        "req-1",
        "req-4",
    ]


async def test_a_replaced_log_file_is_not_written_into(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = build_trail(AuditSettings(path=str(path), writer_id="w"))
    await trail.start()
    await trail.record(make_record(1))
    path.rename(tmp_path / "rotated.jsonl")
    path.write_text("")
    with pytest.raises(AuditUnavailable):
        await trail.record(make_record(2))
    assert not await trail.check()  # a log shorter than what was acknowledged is refused
    await trail.close()


async def test_a_second_writer_on_the_same_file_is_refused(file_trail: AuditTrail, file_settings) -> None:
    other = build_trail(file_settings)
    with pytest.raises(AuditUnavailable):
        await other.start()


async def test_record_after_close_raises_audit_unavailable(file_settings: AuditSettings) -> None:
    trail = build_trail(file_settings)
    await trail.start()
    await trail.close()
    with pytest.raises(AuditUnavailable):
        await trail.record(make_record(1))
    assert not await trail.check()


async def test_a_restarted_trail_resumes_the_chain(file_settings: AuditSettings) -> None:
    for batch in range(3):
        trail = build_trail(file_settings)
        await trail.start()
        await asyncio.gather(*(trail.record(make_record(batch * 10 + n)) for n in range(10)))
        await trail.close()
    report = verify_file(
        Path(str(file_settings.path)),
        public_key=public_key_of(file_settings),
        witness=witness_of(file_settings),
    )
    assert report.ok, report.problem
    assert report.records == 30
    assert report.recoveries == 0


async def test_close_leaves_the_trail_sealed_by_a_signed_checkpoint(file_settings: AuditSettings) -> None:
    trail = build_trail(file_settings)
    await trail.start()
    await trail.record(make_record(1))
    await trail.close()
    last = _entries(Path(str(file_settings.path)))[-1]
    assert "checkpoint" in last and last["checkpoint"]["kid"] == last["pub"] == trail.key_id


async def test_every_group_commit_ends_with_a_signed_checkpoint_before_any_record_is_released(
    file_trail: AuditTrail, file_settings: AuditSettings
) -> None:
    path = Path(str(file_settings.path))
    for n in range(3):
        rid = await file_trail.record(make_record(n))
        entries = _entries(path)  # read at the moment record() returned
        seq = int(rid.split(":")[0])
        assert entries[-1]["checkpoint"]["seq"] == seq  # the signature over this record is already durable
        assert witness_of(file_settings)["seq"] == entries[-1]["seq"]  # and the witness holds it
    await asyncio.gather(*(file_trail.record(make_record(n)) for n in range(100)))
    entries = _entries(path)
    kinds = ["checkpoint" if "checkpoint" in e else "record" for e in entries]
    assert kinds[-1] == "checkpoint"
    assert kinds.count("checkpoint") == file_trail.sink.commit_count


async def test_an_encrypted_trail_hides_the_patient_and_still_verifies(tmp_path: Path, monkeypatch) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("TEST_AUDIT_KEY", key)
    path = tmp_path / "enc.jsonl"
    settings = AuditSettings(path=str(path), encryption_key_env="TEST_AUDIT_KEY", encryption_key_id="k1")
    trail = build_trail(settings)
    await trail.start()
    for n in range(12):
        await trail.record(make_record(n, patient=f"secret-patient-{n}"))
    rows, _ = await trail.query(AuditQuery(patient="secret-patient-3"), limit=10, cursor=None)
    assert [r["request_id"] for r in rows] == ["req-3"]
    await trail.close()

    raw = path.read_bytes()
    assert b"secret-patient" not in raw and b"req-3" not in raw
    assert all(e.get("kid") == "k1" for e in _entries(path) if "ct" in e)
    pub = public_key_of(settings)
    blind = verify_file(path, public_key=pub)
    assert blind.ok and not blind.contents_checked
    assert any("encrypted, contents not checked" in w for w in blind.warnings)
    keyed = verify_file(path, public_key=pub, encryption_key=base64.b64decode(key))
    assert keyed.ok and keyed.contents_checked and keyed.encrypted == 12
    wrong = verify_file(path, public_key=pub, encryption_key=os.urandom(32))
    assert not wrong.ok and wrong.problem.kind == "decrypt_failed"


async def test_an_encrypted_entry_moved_to_another_place_does_not_decrypt(
    tmp_path: Path, monkeypatch
) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("TEST_AUDIT_KEY", base64.b64encode(key).decode())
    path = tmp_path / "enc.jsonl"
    settings = AuditSettings(path=str(path), encryption_key_env="TEST_AUDIT_KEY", encryption_key_id="k1")
    trail = build_trail(settings)
    await trail.start()
    for n in range(3):
        await trail.record(make_record(n))
    await trail.close()
    entries = _entries(path)
    entries[0]["ct"], entries[0]["nonce"] = entries[2]["ct"], entries[2]["nonce"]  # [1] is a checkpoint
    from mcp_fhir.audit.chain import entry_hash

    for i, e in enumerate(entries):
        if i:
            e["prev"] = entries[i - 1]["hash"]
        e["hash"] = entry_hash(e)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    report = verify_file(path, public_key=public_key_of(settings), encryption_key=key)
    assert (report.problem.kind, report.problem.seq) == ("decrypt_failed", 1)


async def test_a_call_with_policy_alerts_writes_exactly_one_record_found_by_its_alert(
    file_trail: AuditTrail, file_settings
) -> None:
    before = _alerts("after_hours_access")
    await file_trail.record(make_record(1, alerts=("after_hours_access",)))
    records = [e["record"] for e in _entries(Path(file_settings.path)) if "record" in e]
    assert [(r["kind"], r["alerts"]) for r in records] == [("access", ["after_hours_access"])]
    rows, _ = await file_trail.query(AuditQuery(alert="after_hours_access"), limit=10, cursor=None)
    assert [r["request_id"] for r in rows] == ["req-1"]
    assert _alerts("after_hours_access") == before + 1


async def test_a_burst_of_denials_marks_the_one_denial_that_completes_it(tmp_path: Path) -> None:
    now = [100.0]
    settings = AuditSettings(
        path=str(tmp_path / "a.jsonl"), denial_burst_threshold=3, denial_burst_window_seconds=60
    )
    trail = build_trail(settings, clock=lambda: now[0])
    await trail.start()
    for n in range(5):
        await trail.record(make_record(n, result="denied", reason_codes=("PURPOSE_NOT_ALLOWED",)))
    rows, _ = await trail.query(AuditQuery(alert="denial_burst"), limit=10, cursor=None)
    assert [(r["kind"], r["request_id"]) for r in rows] == [("access", "req-2")]
    everything, _ = await trail.query(AuditQuery(), limit=100, cursor=None)
    assert len(everything) == 5
    await trail.close()


async def test_query_pages_with_a_cursor_and_filters(file_trail: AuditTrail) -> None:
    for n in range(30):
        await file_trail.record(make_record(n, result="denied" if n % 3 == 0 else "allowed"))
    first, cursor = await file_trail.query(AuditQuery(result="denied", kind="access"), limit=4, cursor=None)
    second, last = await file_trail.query(AuditQuery(result="denied", kind="access"), limit=10, cursor=cursor)
    ids = [r["request_id"] for r in first + second]
    assert ids == [f"req-{n}" for n in range(0, 30, 3)]
    assert cursor is not None and last is None
    window, _ = await file_trail.query(
        AuditQuery(since="2026-11-25T03:04:05Z", until="2026-11-25T03:04:07Z"), limit=50, cursor=None
    )
    assert {r["request_id"] for r in window} == {"req-5", "req-6"}


async def test_query_rejects_bad_limits_and_cursors(file_trail: AuditTrail) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await file_trail.query(AuditQuery(), limit=0, cursor=None)
    assert caught.value.code == "invalid_argument"
    with pytest.raises(InvalidArgument):
        await file_trail.query(AuditQuery(), limit=5, cursor="abc")


async def test_the_write_latency_histogram_observes_each_record(file_trail: AuditTrail) -> None:
    before = metrics.REGISTRY.get_sample_value("mcp_fhir_audit_write_seconds_count") or 0.0
    await file_trail.record(make_record(1))
    assert metrics.REGISTRY.get_sample_value("mcp_fhir_audit_write_seconds_count") == before + 1


async def test_a_generated_signing_key_is_private(
    file_trail: AuditTrail, file_settings: AuditSettings
) -> None:
    key = file_settings.signing_key_path
    assert key.stat().st_mode & 0o777 == 0o600
    assert Path(str(key) + ".pub").exists()
