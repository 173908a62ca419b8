"""Signing-key rotation: checkpoints name their key id, and a pinned key history verifies the whole trail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail
from mcp_fhir.audit.verify import verify_file
from mcp_fhir.cli.audit import main

from .conftest import make_record, witness_of

PER_KEY = 4


async def _write(settings: AuditSettings, start: int) -> str:
    trail = build_trail(settings)
    await trail.start()
    for n in range(start, start + PER_KEY):
        await trail.record(make_record(n))
    await trail.close()
    return trail.key_id


@pytest.fixture
async def rotated(tmp_path: Path) -> dict:
    """The documented procedure: sign with A; make B; pin A and B; restart on B."""
    path = tmp_path / "audit" / "audit.jsonl"
    keys = tmp_path / "keys"
    keys.mkdir()
    assert main(["audit", "keygen", "--out", str(keys / "a.pem")]) == 0
    a = AuditSettings(path=str(path), signing_key_file=str(keys / "a.pem"),
                      public_key_files=(str(keys / "a.pem.pub"),))  # fmt: skip
    kid_a = await _write(a, 0)
    assert main(["audit", "keygen", "--out", str(keys / "b.pem")]) == 0
    b = AuditSettings(path=str(path), signing_key_file=str(keys / "b.pem"),
                      public_key_files=(str(keys / "a.pem.pub"), str(keys / "b.pem.pub")))  # fmt: skip
    kid_b = await _write(b, PER_KEY)
    return {"path": path, "a": keys / "a.pem.pub", "b": keys / "b.pem.pub", "kid_a": kid_a, "kid_b": kid_b,
            "settings": b}  # fmt: skip


def _checkpoint_kids(path: Path) -> list[str]:
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    return [e["checkpoint"]["kid"] for e in entries if "checkpoint" in e]


async def test_checkpoints_name_the_key_that_signed_them(rotated: dict) -> None:
    kids = _checkpoint_kids(rotated["path"])
    assert kids == [rotated["kid_a"]] * PER_KEY + [rotated["kid_b"]] * PER_KEY
    assert rotated["kid_a"] != rotated["kid_b"]


async def test_the_whole_rotated_trail_verifies_with_the_key_history(rotated: dict) -> None:
    report = verify_file(rotated["path"], public_key=[rotated["a"], rotated["b"]],
                         witness=witness_of(rotated["settings"]))  # fmt: skip
    assert report.ok, report.problem
    assert report.key_ids == [rotated["kid_a"], rotated["kid_b"]]
    assert report.records == 2 * PER_KEY


async def test_the_rotated_trail_fails_with_only_one_of_its_keys(rotated: dict) -> None:
    only_b = verify_file(rotated["path"], public_key=rotated["b"])
    assert (only_b.problem.kind, only_b.problem.seq) == ("bad_checkpoint_signature", 2)  # A's first
    only_a = verify_file(rotated["path"], public_key=rotated["a"])
    first_b_checkpoint = 2 * PER_KEY + 2  # A wrote (record, checkpoint) PER_KEY times, then B's first pair
    assert (only_a.problem.kind, only_a.problem.seq) == ("bad_checkpoint_signature", first_b_checkpoint)


async def test_the_cli_takes_the_key_history_as_repeated_public_keys(rotated: dict) -> None:
    path = str(rotated["path"])
    assert main(["audit", "verify", "--path", path, "--public-key", str(rotated["a"]),
                 "--public-key", str(rotated["b"])]) == 0  # fmt: skip
    assert main(["audit", "verify", "--path", path, "--public-key", str(rotated["b"])]) == 1


async def test_a_writer_refuses_to_continue_a_trail_signed_by_a_key_it_was_not_given(rotated: dict) -> None:
    keys = rotated["a"].parent
    assert main(["audit", "keygen", "--out", str(keys / "c.pem")]) == 0
    unpinned = AuditSettings(path=str(rotated["path"]), signing_key_file=str(keys / "c.pem"))
    trail = build_trail(unpinned)
    with pytest.raises(ConfigError) as caught:
        await trail.start()
    assert caught.value.key == "audit.public_key_files"
    await trail.close()


def test_keygen_refuses_to_overwrite_a_key(tmp_path: Path, capsys) -> None:
    assert main(["audit", "keygen", "--out", str(tmp_path / "k.pem")]) == 0
    assert main(["audit", "keygen", "--out", str(tmp_path / "k.pem")]) == 2
    assert "config_invalid" in capsys.readouterr().err
