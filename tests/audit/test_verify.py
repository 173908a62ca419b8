"""Tamper tests: every kind of change to a stored chain is caught, with its seq, line and kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcp_fhir.audit.chain import entry_hash
from mcp_fhir.audit.crypto import CheckpointSigner
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail
from mcp_fhir.audit.verify import verify_file

from .conftest import make_record

RECORDS = 50
CHECKPOINT_EVERY = 10  # sequential writes: checkpoints land at seq 11, 22, 33, 44, 55


@pytest.fixture
async def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    trail = build_trail(AuditSettings(path=str(path), writer_id="w1", checkpoint_every=CHECKPOINT_EVERY))
    await trail.start()
    for n in range(RECORDS):
        await trail.record(make_record(n))
    await trail.close()
    return path


def _pub(log: Path) -> bytes:
    return Path(str(log) + ".signing.pem.pub").read_bytes()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def _rechain(entries: list[dict[str, Any]], start: int, signer: CheckpointSigner | None = None) -> None:
    """What a careful forger does: recompute prev and hash from ``start`` on (and re-sign checkpoints)."""
    for i in range(start, len(entries)):
        e = entries[i]
        if i > 0:
            e["prev"] = entries[i - 1]["hash"]
        if "checkpoint" in e:
            e["checkpoint"]["hash"] = e["prev"]
            if signer is not None:
                e["sig"] = signer.sign(e["checkpoint"])
                e["pub"] = signer.key_id
        e["hash"] = entry_hash(e)


def test_an_untouched_log_verifies_with_its_checkpoints(log: Path) -> None:
    report = verify_file(log, public_key=_pub(log))
    assert report.ok
    assert report.records == RECORDS
    assert report.checkpoints == 5
    assert report.last_seq == 55
    assert report.signatures_checked


def test_an_edited_record_is_named_by_seq_and_line(log: Path) -> None:
    entries = _lines(log)
    entries[24]["record"]["patient"] = "someone-else"
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert not report.ok
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("edited", 25, 25)


def test_an_edit_with_a_rewritten_hash_breaks_the_chain_at_the_next_entry(log: Path) -> None:
    entries = _lines(log)
    entries[24]["record"]["result"] = "denied"
    entries[24]["hash"] = entry_hash(entries[24])
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("chain_broken", 26, 26)


def test_a_deleted_record_is_named(log: Path) -> None:
    entries = _lines(log)
    del entries[24]
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("deleted", 25, 25)


def test_reordered_records_are_named(log: Path) -> None:
    entries = _lines(log)
    entries[24], entries[25] = entries[25], entries[24]
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("reordered", 25, 25)


def test_an_inserted_record_reusing_a_seq_is_named(log: Path) -> None:
    entries = _lines(log)
    forged = {"seq": 25, "prev": entries[23]["hash"], "record": make_record(999).to_dict()}
    forged["hash"] = entry_hash(forged)
    entries.insert(24, forged)
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("inserted", 25, 25)


def test_an_inserted_record_with_an_invented_seq_is_named(log: Path) -> None:
    entries = _lines(log)
    forged = {"seq": 900, "prev": entries[23]["hash"], "record": make_record(999).to_dict()}
    forged["hash"] = entry_hash(forged)
    entries.insert(24, forged)
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("inserted", 900, 25)


def test_truncation_is_caught_against_the_expected_seq(log: Path) -> None:
    entries = _lines(log)
    _write(log, entries[:30])
    unanchored = verify_file(log, public_key=_pub(log))
    assert unanchored.ok  # the honest limit: a cut end is invisible to the chain alone...
    assert unanchored.after_last_checkpoint == 8
    report = verify_file(log, public_key=_pub(log), expect_min_seq=55)  # ...but not to a known count
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("truncated", 31, 31)


def test_a_rewritten_tail_with_forged_checkpoints_fails_the_signature_check(log: Path) -> None:
    entries = _lines(log)
    entries[24]["record"]["patient"] = "someone-else"
    _rechain(entries, 24, CheckpointSigner(Ed25519PrivateKey.generate()))
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == (
        "bad_checkpoint_signature",
        33,
        33,
    )


def test_a_checkpoint_that_keeps_its_old_signature_over_a_new_hash_fails(log: Path) -> None:
    entries = _lines(log)
    entries[24]["record"]["patient"] = "someone-else"
    _rechain(entries, 24)
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq) == ("bad_checkpoint_signature", 33)


def test_a_checkpoint_that_covers_the_wrong_entry_is_caught(log: Path) -> None:
    entries = _lines(log)
    entries[32]["checkpoint"]["seq"] = 5
    _rechain(entries, 32)
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq) == ("bad_checkpoint", 33)


def test_a_garbage_line_is_reported_as_malformed(log: Path) -> None:
    entries = log.read_text().splitlines()
    entries[9] = "not json"
    log.write_text("\n".join(entries) + "\n")
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("malformed", 10, 10)


def test_without_the_public_key_signatures_are_reported_unchecked(log: Path) -> None:
    report = verify_file(log)
    assert report.ok
    assert not report.signatures_checked
    assert any("not checked" in w for w in report.warnings)


def test_progress_is_reported(log: Path) -> None:
    seen: list[int] = []
    verify_file(log, progress=seen.append)
    assert seen[-1] == 55
