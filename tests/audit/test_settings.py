"""AuditSettings validates on construction and names the key it rejects."""

from __future__ import annotations

import pytest

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.audit.settings import DEFAULT_RETENTION_DAYS, AuditSettings


def test_defaults_are_a_file_sink_with_seven_years_retention() -> None:
    s = AuditSettings()
    assert (s.sink, s.path, s.retention_days) == ("file", "var/audit/audit.jsonl", DEFAULT_RETENTION_DAYS)
    assert AuditSettings(sink="sqlite").path == "var/audit/audit.db"
    assert s.writer_id == ""  # resolved per process when the trail is built: see test_writer_id.py


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"sink": "s3"}, "audit.sink"),
        ({"sink": "postgres"}, "audit.dsn_env"),
        ({"sink": "postgres", "dsn_env": "postgresql://u:p@h/db"}, "audit.dsn_env"),
        ({"checkpoint_every": 0}, "audit.checkpoint_every"),
        ({"group_commit_max_batch": 10**9}, "audit.group_commit_max_batch"),
        ({"write_timeout_seconds": 0}, "audit.write_timeout_seconds"),
        ({"encryption_key_env": "K"}, "audit.encryption_key_id"),
        ({"encryption_key_env": "K", "encryption_key_file": "f", "encryption_key_id": "k"},
         "audit.encryption_key_file"),
        ({"signing_key_env": "A", "signing_key_file": "b"}, "audit.signing_key_file"),
        ({"pg_table": "audit; drop"}, "audit.pg_table"),
        ({"writer_id": "has space"}, "audit.writer_id"),
        ({"witness": "s3"}, "audit.witness"),
        ({"witness": "redis"}, "audit.witness_url_env"),
        ({"witness": "postgres"}, "audit.witness_dsn_env"),
        ({"witness": "redis", "witness_url_env": "redis://x"}, "audit.witness_url_env"),
        ({"public_key_files": "a.pub"}, "audit.public_key_files"),
        ({"signer_factory": "not a spec"}, "audit.signer_factory"),
        ({"signer_factory": "m:f", "signing_key_file": "k.pem"}, "audit.signer_factory"),
    ],
)  # fmt: skip
def test_bad_settings_raise_config_error_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AuditSettings(**kwargs)
    assert caught.value.code == "config_invalid"
    assert caught.value.key == key


def test_unknown_keys_in_a_mapping_are_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        AuditSettings.from_mapping({"sink": "file", "colour": "blue"})
    assert caught.value.key == "audit.colour"


def test_a_dsn_is_read_from_the_named_variable_and_never_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    s = AuditSettings(sink="postgres", dsn_env="AUDIT_TEST_DSN")
    with pytest.raises(ConfigError):
        s.dsn()
    monkeypatch.setenv("AUDIT_TEST_DSN", "postgresql://x@127.0.0.1/db")
    assert s.dsn() == "postgresql://x@127.0.0.1/db"
