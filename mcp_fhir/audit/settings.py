"""AuditSettings: the validated configuration of the audit trail (config section ``audit``).

Every timeout and size has a named, finite default. Errors name the key:
``ConfigError("audit.<key>", rule)``.

Retention: ``retention_days`` defaults to 2555 days (7 years), a common floor for
health-record access logs (e.g. HIPAA's 6-year documentation rule plus margin; many
Australian state record-keeping schedules ask for 7). The trail never deletes anything
itself: the value is for the operator's archival job, and is reported by the CLI.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mcp_fhir._exceptions import ConfigError

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CHECKPOINT_INTERVAL_SECONDS",
    "DEFAULT_DENIAL_BURST_THRESHOLD",
    "DEFAULT_DENIAL_BURST_WINDOW_SECONDS",
    "DEFAULT_GROUP_COMMIT_MAX_BATCH",
    "DEFAULT_GROUP_COMMIT_MAX_DELAY_MS",
    "DEFAULT_RETENTION_DAYS",
    "DEFAULT_WRITE_TIMEOUT_SECONDS",
    "SINKS",
    "AuditSettings",
]

SINKS = ("file", "sqlite", "postgres", "stdout")
DEFAULT_FILE_PATH = "var/audit/audit.jsonl"
DEFAULT_SQLITE_PATH = "var/audit/audit.db"
DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_CHECKPOINT_INTERVAL_SECONDS = 60.0
DEFAULT_RETENTION_DAYS = 2555
DEFAULT_GROUP_COMMIT_MAX_DELAY_MS = 2.0
DEFAULT_GROUP_COMMIT_MAX_BATCH = 256
DEFAULT_WRITE_TIMEOUT_SECONDS = 5.0
DEFAULT_DENIAL_BURST_THRESHOLD = 10
DEFAULT_DENIAL_BURST_WINDOW_SECONDS = 60.0
DEFAULT_PG_SCHEMA = "public"
DEFAULT_PG_TABLE = "audit_log"
MAX_GROUP_COMMIT_BATCH = 10_000
MAX_GROUP_COMMIT_DELAY_MS = 1000.0
MAX_WRITE_TIMEOUT_SECONDS = 120.0

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SQL_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_WRITER_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


def default_writer_id() -> str:
    """A stable name for this writer: the host name (set ``writer_id`` per process when several share PG)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname() or "localhost")[:100]
    return f"{host}-mcp-fhir"


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The ``audit`` section. Validated on construction."""

    sink: str = "file"
    path: str | None = None
    dsn_env: str | None = None
    writer_id: str = ""
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    checkpoint_interval_seconds: float = DEFAULT_CHECKPOINT_INTERVAL_SECONDS
    signing_key_file: str | None = None
    signing_key_env: str | None = None
    encryption_key_env: str | None = None
    encryption_key_file: str | None = None
    encryption_key_id: str | None = None
    retention_days: int = DEFAULT_RETENTION_DAYS
    group_commit_max_delay_ms: float = DEFAULT_GROUP_COMMIT_MAX_DELAY_MS
    group_commit_max_batch: int = DEFAULT_GROUP_COMMIT_MAX_BATCH
    write_timeout_seconds: float = DEFAULT_WRITE_TIMEOUT_SECONDS
    denial_burst_threshold: int = DEFAULT_DENIAL_BURST_THRESHOLD
    denial_burst_window_seconds: float = DEFAULT_DENIAL_BURST_WINDOW_SECONDS
    pg_schema: str = DEFAULT_PG_SCHEMA
    pg_table: str = DEFAULT_PG_TABLE
    pg_role: str | None = None

    def __post_init__(self) -> None:
        if self.sink not in SINKS:
            raise ConfigError("audit.sink", f"must be one of {', '.join(SINKS)}")
        if self.path is None and self.sink in ("file", "sqlite"):
            object.__setattr__(
                self, "path", DEFAULT_SQLITE_PATH if self.sink == "sqlite" else DEFAULT_FILE_PATH
            )
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ConfigError("audit.path", "must be a non-empty path")
        if not self.writer_id:
            object.__setattr__(self, "writer_id", default_writer_id())
        if not _WRITER_ID.match(self.writer_id):
            raise ConfigError("audit.writer_id", "1-128 characters from [A-Za-z0-9_.:@-]")
        for key in ("dsn_env", "signing_key_env", "encryption_key_env"):
            value = getattr(self, key)
            if value is not None and not _ENV_NAME.match(value):
                raise ConfigError(
                    f"audit.{key}", "must be the NAME of an environment variable, not its value"
                )
        if self.sink == "postgres" and not self.dsn_env:
            raise ConfigError("audit.dsn_env", "required for the postgres sink (never put the DSN inline)")
        for key in ("pg_schema", "pg_table"):
            if not _SQL_IDENT.match(getattr(self, key)):
                raise ConfigError(f"audit.{key}", "must be a lower-case SQL identifier")
        if self.pg_role is not None and not _SQL_IDENT.match(self.pg_role):
            raise ConfigError("audit.pg_role", "must be a lower-case SQL identifier")
        if self.signing_key_file and self.signing_key_env:
            raise ConfigError("audit.signing_key_file", "set signing_key_file or signing_key_env, not both")
        if self.encryption_key_file and self.encryption_key_env:
            raise ConfigError(
                "audit.encryption_key_file", "set encryption_key_file or encryption_key_env, not both"
            )
        if (self.encryption_key_file or self.encryption_key_env) and not self.encryption_key_id:
            raise ConfigError("audit.encryption_key_id", "required when an encryption key is configured")
        self._check_int("checkpoint_every", 1, 10_000_000)
        self._check_int("retention_days", 1, 36_500)
        self._check_int("group_commit_max_batch", 1, MAX_GROUP_COMMIT_BATCH)
        self._check_int("denial_burst_threshold", 1, 1_000_000)
        self._check_float("checkpoint_interval_seconds", 0.001, 86_400.0)
        self._check_float("group_commit_max_delay_ms", 0.0, MAX_GROUP_COMMIT_DELAY_MS)
        self._check_float("write_timeout_seconds", 0.001, MAX_WRITE_TIMEOUT_SECONDS)
        self._check_float("denial_burst_window_seconds", 0.001, 86_400.0)

    def _check_int(self, key: str, low: int, high: int) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"audit.{key}", f"must be an integer from {low} to {high}")

    def _check_float(self, key: str, low: float, high: float) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ConfigError(f"audit.{key}", f"must be a number from {low} to {high}")
        object.__setattr__(self, key, float(value))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AuditSettings:
        """Build from a YAML/dict section; unknown keys are a ConfigError."""
        names = {f.name for f in fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(f"audit.{key}", "unknown setting")
        return cls(**dict(data))

    @property
    def signing_key_path(self) -> Path:
        """The signing key path: ``signing_key_file``, else ``path + ".signing.pem"``."""
        if self.signing_key_file:
            return Path(self.signing_key_file)
        base = self.path or f"var/audit/{self.writer_id}"
        return Path(base + ".signing.pem")

    def dsn(self) -> str:
        """The PostgreSQL DSN, read from the environment variable named by ``dsn_env``."""
        if not self.dsn_env:
            raise ConfigError("audit.dsn_env", "not set")
        value = os.environ.get(self.dsn_env)
        if not value:
            raise ConfigError("audit.dsn_env", "the named environment variable is empty or missing")
        return value
