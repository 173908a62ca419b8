"""The ``mcp-fhir audit`` command group, driven through ``main(argv)``."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail
from mcp_fhir.cli.audit import main

from .conftest import make_record


async def _write_log(path: Path, n: int = 20, **settings) -> None:
    trail = build_trail(AuditSettings(path=str(path), writer_id="cli", **settings))
    await trail.start()
    for i in range(n):
        await trail.record(make_record(i, result="denied" if i % 4 == 0 else "allowed"))
    await trail.close()


def _pub(path: Path) -> str:
    key = AuditSettings(path=str(path)).signing_key_path
    return str(key.with_name(key.name + ".pub"))


async def test_verify_passes_on_a_good_log_with_the_pinned_public_key(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.jsonl"
    await _write_log(path)
    assert main(["audit", "verify", "--path", str(path), "--public-key", _pub(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["signatures_checked"] and report["witness_checked"]


async def test_verify_without_a_pinned_public_key_exits_non_zero(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.jsonl"
    await _write_log(path)
    assert not list(path.parent.glob("*.pub"))  # nothing beside the trail to be tempted by
    assert main(["audit", "verify", "--path", str(path)]) == 2
    assert "config_invalid" in capsys.readouterr().err


async def test_verify_fails_and_prints_where(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.jsonl"
    await _write_log(path)
    lines = path.read_text().splitlines()
    del lines[3]
    path.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", "--path", str(path), "--public-key", _pub(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: deleted at seq 4, line 4")


async def test_verify_finds_a_cut_end_through_the_witness_without_operator_input(
    tmp_path: Path, capsys
) -> None:
    path = tmp_path / "a.jsonl"
    await _write_log(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-6]))
    assert main(["audit", "verify", "--path", str(path), "--public-key", _pub(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problem"]["kind"] == "truncated"


async def test_verify_fails_when_the_witness_was_removed_too(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.jsonl"
    await _write_log(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-6]))
    witness = AuditSettings(path=str(path)).witness_file("cli")
    assert witness is not None
    witness.unlink()
    assert main(["audit", "verify", "--path", str(path), "--public-key", _pub(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problem"]["kind"] == "witness_missing"
    assert main(["audit", "verify", "--path", str(path), "--public-key", _pub(path), "--no-witness"]) == 0


async def test_verify_reads_sink_keys_and_witness_from_the_config(tmp_path: Path, capsys) -> None:
    path = tmp_path / "audit" / "a.jsonl"
    await _write_log(path, public_key_files=())
    config = tmp_path / "config.yaml"
    config.write_text(
        "auth:\n  local: {id: local-dev, claims: {roles: [clinician]}}\n"
        "backends:\n  b:\n    base_url: http://127.0.0.1:9/fhir\n"
        f"audit:\n  path: {path}\n  writer_id: cli\n  public_key_files: [{_pub(path)}]\n"
    )
    assert main(["audit", "verify", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["witness_checked"] and report["records"] == 20
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-2]))
    assert main(["audit", "verify", "--config", str(config), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problem"]["kind"] == "truncated"


async def test_verify_fails_when_the_log_is_shorter_than_expected(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.jsonl"
    await _write_log(path)
    assert main(["audit", "verify", "--path", str(path), "--public-key", _pub(path),
                 "--expect-min-seq", "1000", "--json"]) == 1  # fmt: skip
    assert json.loads(capsys.readouterr().out)["problem"]["kind"] == "truncated"


async def test_query_filters_and_returns_json(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.jsonl"
    await _write_log(path)
    assert main(["audit", "query", "--path", str(path), "--result", "denied", "--limit", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["request_id"] for r in out["records"]] == ["req-0", "req-4", "req-8"]
    assert out["next_cursor"] is not None
    assert main(["audit", "query", "--path", str(path), "--result", "denied", "--cursor", out["next_cursor"],
                 "--json"]) == 0  # fmt: skip
    rest = json.loads(capsys.readouterr().out)
    assert [r["request_id"] for r in rest["records"]] == ["req-12", "req-16"]


async def test_export_writes_a_valid_fhir_bundle(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    await _write_log(path, n=6)
    out = tmp_path / "bundle.json"
    assert main(["audit", "export", "--path", str(path), "--format", "fhir", "--output", "bundle",
                 "--out", str(out)]) == 0  # fmt: skip
    bundle = json.loads(out.read_text())
    Bundle.model_validate(bundle)
    assert len(bundle["entry"]) == 6


async def test_export_of_an_encrypted_log_needs_and_uses_the_key(tmp_path: Path, monkeypatch, capsys) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("CLI_AUDIT_KEY", key)
    path = tmp_path / "enc.jsonl"
    await _write_log(path, n=4, encryption_key_env="CLI_AUDIT_KEY", encryption_key_id="k1")
    assert main(["audit", "export", "--path", str(path), "--format", "jsonl", "--output", "ndjson"]) == 0
    skipped = capsys.readouterr()
    assert skipped.out == "" and "4 encrypted records skipped" in skipped.err
    assert main(["audit", "export", "--path", str(path), "--format", "fhir", "--output", "ndjson",
                 "--encryption-key-env", "CLI_AUDIT_KEY"]) == 0  # fmt: skip
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(events) == 4 and events[0]["entity"][0]["what"]["reference"] == "Patient/pat-0"
    assert main(["audit", "verify", "--path", str(path), "--public-key", _pub(path),
                 "--encryption-key-env", "CLI_AUDIT_KEY"]) == 0  # fmt: skip


def test_a_missing_path_is_a_usage_error_with_its_code(tmp_path: Path, capsys) -> None:
    assert main(["audit", "verify", "--path", str(tmp_path / "nope.jsonl")]) == 2
    assert "config_invalid" in capsys.readouterr().err


def test_a_subcommand_is_required() -> None:
    with pytest.raises(SystemExit):
        main(["audit"])
