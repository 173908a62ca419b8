"""Tamper tests: every kind of change to a stored chain is caught, with its seq, line and kind.

Sequential writes: every record is its own group commit, and every group commit ends with a signed
checkpoint, so record n sits at seq 2n+1 and its checkpoint at seq 2n+2 (line = seq).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.audit.chain import entry_hash
from mcp_fhir.audit.crypto import CheckpointSigner
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail
from mcp_fhir.audit.verify import verify_file

from .conftest import make_record, public_key_of, witness_of

RECORDS = 50
LAST_SEQ = 2 * RECORDS


def _settings(path: Path) -> AuditSettings:
    return AuditSettings(path=str(path), writer_id="w1")


@pytest.fixture
async def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    trail = build_trail(_settings(path))
    await trail.start()
    for n in range(RECORDS):
        await trail.record(make_record(n))
    await trail.close()
    return path


def _pub(log: Path) -> bytes:
    return public_key_of(_settings(log))


def _witness(log: Path) -> dict[str, Any] | None:
    return witness_of(_settings(log))


def _verify(log: Path, **kw: Any) -> Any:
    return verify_file(log, public_key=_pub(log), witness=_witness(log), **kw)


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
                e["checkpoint"]["kid"] = signer.key_id
                e["sig"] = signer.sign(e["checkpoint"])
                e["pub"] = signer.key_id
        e["hash"] = entry_hash(e)


def test_an_untouched_log_verifies_with_a_signature_on_every_group_commit(log: Path) -> None:
    report = _verify(log)
    assert report.ok, report.problem
    assert report.records == RECORDS
    assert report.checkpoints == RECORDS
    assert report.last_seq == LAST_SEQ
    assert report.signatures_checked and report.witness_checked and report.witness_seq == LAST_SEQ
    assert report.after_last_checkpoint == 0


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


def test_cutting_the_last_record_is_caught_against_the_witness_without_operator_input(log: Path) -> None:
    _write(log, _lines(log)[:-1])
    report = _verify(log)
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("truncated", LAST_SEQ, LAST_SEQ)


def test_cutting_several_records_is_caught_against_the_witness(log: Path) -> None:
    _write(log, _lines(log)[:30])
    report = _verify(log)
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("truncated", 31, 31)


def test_a_torn_last_line_is_caught_when_the_witness_saw_it_signed(log: Path) -> None:
    log.write_bytes(log.read_bytes()[:-20])
    report = _verify(log)
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("truncated", LAST_SEQ, LAST_SEQ)


def test_a_cut_that_also_rewrites_the_last_entry_disagrees_with_the_witness(log: Path) -> None:
    entries = _lines(log)
    entries[-2]["record"]["result"] = "denied"
    _rechain(entries, len(entries) - 2)
    _write(log, entries)
    report = _verify(log)
    assert report.problem.kind in ("bad_checkpoint_signature", "witness_mismatch")
    assert report.problem.seq == LAST_SEQ


def test_the_expected_seq_still_catches_a_cut_without_a_witness(log: Path) -> None:
    _write(log, _lines(log)[:30])
    report = verify_file(log, public_key=_pub(log), expect_min_seq=LAST_SEQ)
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("truncated", 31, 31)


def test_records_forged_after_the_last_signature_with_the_chain_recomputed_are_an_unsigned_tail(
    log: Path,
) -> None:
    entries = _lines(log)
    for n in range(3):
        forged = {
            "seq": entries[-1]["seq"] + 1,
            "prev": entries[-1]["hash"],
            "record": make_record(900 + n).to_dict(),
        }
        forged["hash"] = entry_hash(forged)
        entries.append(forged)
    _write(log, entries)
    report = _verify(log)
    assert (report.problem.kind, report.problem.seq, report.problem.line) == (
        "unsigned_tail", LAST_SEQ + 1, LAST_SEQ + 1,
    )  # fmt: skip


def test_an_edited_record_before_the_last_signature_with_the_chain_recomputed_fails_the_signature(
    log: Path,
) -> None:
    entries = _lines(log)
    entries[-2]["record"]["patient"] = "someone-else"  # the last record, just before the last checkpoint
    _rechain(entries, len(entries) - 2)
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq) == ("bad_checkpoint_signature", LAST_SEQ)


def test_a_rewritten_tail_with_forged_checkpoints_fails_the_signature_check(log: Path) -> None:
    entries = _lines(log)
    entries[24]["record"]["patient"] = "someone-else"
    _rechain(entries, 24, CheckpointSigner(Ed25519PrivateKey.generate()))
    _write(log, entries)
    report = _verify(log)
    assert (report.problem.kind, report.problem.seq, report.problem.line) == (
        "bad_checkpoint_signature",
        26,
        26,
    )


def test_a_trail_re_signed_whole_with_another_key_fails_against_the_pinned_key(log: Path) -> None:
    entries = _lines(log)
    entries[0]["record"]["patient"] = "someone-else"
    attacker = CheckpointSigner(Ed25519PrivateKey.generate())
    _rechain(entries, 0, attacker)
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == (
        "bad_checkpoint_signature",
        2,
        2,
    )
    assert verify_file(log, public_key=attacker.public_key()).ok  # only the pinned key tells them apart


def test_a_checkpoint_that_keeps_its_old_signature_over_a_new_hash_fails(log: Path) -> None:
    entries = _lines(log)
    entries[24]["record"]["patient"] = "someone-else"
    _rechain(entries, 24)
    _write(log, entries)
    report = _verify(log)
    assert (report.problem.kind, report.problem.seq) == ("bad_checkpoint_signature", 26)


def test_a_signature_moved_to_a_checkpoint_naming_another_key_fails(log: Path) -> None:
    entries = _lines(log)
    entries[33]["checkpoint"]["kid"] = "0" * 16
    entries[33]["hash"] = entry_hash(entries[33])
    _rechain(entries, 34)
    _write(log, entries)
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq) == ("bad_checkpoint_signature", 34)


def test_a_checkpoint_that_covers_the_wrong_entry_is_caught(log: Path) -> None:
    entries = _lines(log)
    entries[33]["checkpoint"]["seq"] = 5
    _rechain(entries, 33)
    _write(log, entries)
    report = _verify(log)
    assert (report.problem.kind, report.problem.seq) == ("bad_checkpoint", 34)


def test_a_garbage_line_is_reported_as_malformed(log: Path) -> None:
    entries = log.read_text().splitlines()
    entries[9] = "not json"
    log.write_text("\n".join(entries) + "\n")
    report = verify_file(log, public_key=_pub(log))
    assert (report.problem.kind, report.problem.seq, report.problem.line) == ("malformed", 10, 10)


def test_verification_without_a_pinned_public_key_is_refused(log: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        verify_file(log)
    assert caught.value.code == "config_invalid"


def test_a_wrong_witness_is_a_mismatch(log: Path) -> None:
    entries = _lines(log)
    report = verify_file(log, public_key=_pub(log), witness={**entries[-1], "hash": "f" * 64})
    assert (report.problem.kind, report.problem.seq) == ("witness_mismatch", LAST_SEQ)


def test_a_missing_witness_fails_when_one_was_expected(log: Path) -> None:
    report = verify_file(log, public_key=_pub(log), witness=None, require_witness=True)
    assert (report.problem.kind, report.problem.seq) == ("witness_missing", LAST_SEQ)


def test_progress_is_reported(log: Path) -> None:
    seen: list[int] = []
    _verify(log, progress=seen.append)
    assert seen[-1] == LAST_SEQ
