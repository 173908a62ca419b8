"""Writer ids: unique per process by default, stable across restarts, and collisions warned about."""

from __future__ import annotations

import stat
from pathlib import Path

from mcp_fhir.audit.settings import AuditSettings, config_warnings, host_name
from mcp_fhir.audit.trail import build_trail, claim_writer_id
from mcp_fhir.cli.main import main

from .conftest import make_record


def test_two_processes_on_one_host_with_one_config_get_different_writer_ids(tmp_path: Path) -> None:
    settings = AuditSettings(sink="sqlite", path=str(tmp_path / "audit.db"))
    first, release_first = claim_writer_id(settings)
    second, release_second = claim_writer_id(settings)
    try:
        assert first != second
        assert first.startswith(host_name() + "-") and second.startswith(host_name() + "-")
    finally:
        release_first()
        release_second()


def test_a_restarted_process_gets_its_writer_id_back(tmp_path: Path) -> None:
    settings = AuditSettings(sink="sqlite", path=str(tmp_path / "audit.db"))
    first, release = claim_writer_id(settings)
    release()
    again, release = claim_writer_id(settings)
    release()
    assert again == first
    suffix_file = tmp_path / "writer-id.0"
    assert suffix_file.read_text().strip() == first.rsplit("-", 1)[1]
    assert stat.S_IMODE(suffix_file.stat().st_mode) == 0o600


def test_a_configured_writer_id_is_used_as_is(tmp_path: Path) -> None:
    settings = AuditSettings(sink="sqlite", path=str(tmp_path / "audit.db"), writer_id="replica-a")
    assert claim_writer_id(settings)[0] == "replica-a"
    assert not list(tmp_path.glob("writer-id.*"))


async def test_the_trail_holds_its_writer_id_until_it_is_closed(tmp_path: Path) -> None:
    settings = AuditSettings(sink="sqlite", path=str(tmp_path / "audit.db"))
    trail = build_trail(settings)
    await trail.start()
    await trail.record(make_record(1))
    other, release = claim_writer_id(settings)
    release()
    assert other != trail.writer_id
    await trail.close()
    again, release = claim_writer_id(settings)
    release()
    assert again == trail.writer_id


def test_config_check_warns_when_a_fixed_writer_id_is_shared_by_replicas() -> None:
    shared = AuditSettings(sink="postgres", dsn_env="AUDIT_DSN", writer_id="sidecar")
    warnings = config_warnings([shared, shared])
    assert any("writer_id is fixed" in w for w in warnings)
    assert any("configs 1 and 2 write the same postgres chain as writer sidecar" in w for w in warnings)
    assert not any("same postgres chain" in w for w in config_warnings(
        [AuditSettings(sink="postgres", dsn_env="AUDIT_DSN"), AuditSettings(sink="postgres", dsn_env="AUDIT_DSN")]
    ))  # fmt: skip


def test_config_check_warns_when_two_configs_share_one_trail_file(tmp_path: Path) -> None:
    one = AuditSettings(path=str(tmp_path / "a.jsonl"))
    assert any("configs 1 and 2 write the same file chain" in w for w in config_warnings([one, one]))


def test_config_check_warns_when_the_signing_key_is_inside_the_audit_directory(tmp_path: Path) -> None:
    inside = AuditSettings(path=str(tmp_path / "a.jsonl"), signing_key_file=str(tmp_path / "k.pem"))
    assert any("inside the audit directory" in w for w in config_warnings(inside))
    default = AuditSettings(path=str(tmp_path / "audit" / "a.jsonl"))
    assert not any("signing_key_file is inside" in w for w in config_warnings(default))


def test_config_check_prints_the_audit_warnings_for_several_files(tmp_path: Path, capsys) -> None:
    body = (
        "auth:\n  local: {id: local-dev, claims: {roles: [clinician]}}\n"
        "backends:\n  b:\n    base_url: http://127.0.0.1:9/fhir\n"
        f"audit:\n  path: {tmp_path / 'audit.jsonl'}\n  signing_key_file: {tmp_path / 'k.pem'}\n"
    )
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(body)
    assert main(["config", "check", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]) == 0
    err = capsys.readouterr().err
    assert "signing_key_file is inside the audit directory" in err
    assert "configs 1 and 2 write the same file chain" in err
