"""Every file that holds audit data, keys or PHI is created 0600, whatever the umask lets through."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import AuditTrail, build_trail
from mcp_fhir.cli.audit import main
from mcp_fhir.ehr.idmap import SqliteIdMap

from .conftest import make_record


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the common default: without care, files come out 0644
    try:
        yield
    finally:
        os.umask(old)


async def _trail_files(settings: AuditSettings) -> tuple[list[Path], AuditTrail]:
    """Every file a running trail has made (SQLite's -wal and -shm exist only while it is open)."""
    trail = build_trail(settings)
    await trail.start()
    await trail.record(make_record(1))
    key = settings.signing_key_path
    witness = settings.witness_file(trail.writer_id)
    assert witness is not None
    files = [Path(str(settings.path)), key, key.with_name(key.name + ".pub"), witness]
    files += sorted(settings.state_dir.glob("writer-id.*"))
    if settings.sink == "sqlite":
        files += [Path(f"{settings.path}-wal"), Path(f"{settings.path}-shm")]
    return files, trail


async def test_the_file_trail_its_keys_witness_and_writer_id_are_0600(tmp_path: Path) -> None:
    files, trail = await _trail_files(AuditSettings(path=str(tmp_path / "audit" / "audit.jsonl")))
    await trail.close()
    assert len(files) == 5
    assert {str(f): _mode(f) for f in files} == {str(f): 0o600 for f in files}


async def test_the_sqlite_trail_and_its_wal_and_shm_files_are_0600(tmp_path: Path) -> None:
    files, trail = await _trail_files(AuditSettings(sink="sqlite", path=str(tmp_path / "audit" / "audit.db")))
    try:
        assert len(files) == 7
        assert {str(f): _mode(f) for f in files} == {str(f): 0o600 for f in files}
    finally:
        await trail.close()


async def test_keygen_and_export_outputs_are_0600(tmp_path: Path) -> None:
    settings = AuditSettings(path=str(tmp_path / "audit" / "audit.jsonl"))
    _, trail = await _trail_files(settings)
    await trail.close()
    assert main(["audit", "keygen", "--out", str(tmp_path / "new.pem")]) == 0
    out = tmp_path / "export.json"
    assert main(["audit", "export", "--path", str(settings.path), "--out", str(out)]) == 0
    for path in (tmp_path / "new.pem", tmp_path / "new.pem.pub", out):
        assert _mode(path) == 0o600, path


async def test_the_id_map_database_and_its_wal_files_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "idmap.db"
    idmap = SqliteIdMap(path)
    await idmap.put("pat-1", "epic", "fhir_id", "e1")
    try:
        for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert _mode(f) == 0o600, f
    finally:
        await idmap.close()
