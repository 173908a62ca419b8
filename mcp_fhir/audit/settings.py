"""AuditSettings: the validated configuration of the audit trail (config section ``audit``).

Every timeout and size has a named, finite default. Errors name the key:
``ConfigError("audit.<key>", rule)``.

Where things live by default (all relative paths are relative to the working directory):

* the trail: ``var/audit/audit.jsonl`` (file) or ``var/audit/audit.db`` (sqlite);
* the signing key: ``<audit dir>-keys/audit-signing.pem`` — a sibling of the audit directory, never
  inside it (``config check`` warns when a configured key is inside it);
* the witness: ``<audit dir>-witness/<trail file name>.witness.json`` (PostgreSQL trails:
  ``var/audit-witness/pg-<writer>.witness.json``);
* the writer id: ``<hostname>-<suffix>``, the suffix persisted in ``writer-id.<n>`` beside the trail
  (``writer_state_dir``); each running process holds an exclusive lock on one such file, so two
  processes started from one config on one host get two writer ids, each stable across restarts.

Retention: ``retention_days`` defaults to 2555 days (7 years), a common floor for
health-record access logs (e.g. HIPAA's 6-year documentation rule plus margin; many
Australian state record-keeping schedules ask for 7). The trail never deletes anything
itself: the value is for the operator's archival job, and is reported by the CLI.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
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
    "WITNESSES",
    "AuditSettings",
    "GroupCommit",
    "config_warnings",
]

SINKS = ("file", "sqlite", "postgres", "stdout")
WITNESSES = ("file", "redis", "postgres", "none")
DEFAULT_WITNESS_KEY_PREFIX = "mcp-fhir:audit-witness:"
DEFAULT_PG_WITNESS_TABLE = "audit_witness"
DEFAULT_STATE_DIR = "var/audit"
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
_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
_KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.:@-]{0,100}$")


def _count(default: int, low: int, high: int) -> Any:
    """An integer setting checked on construction to lie in ``[low, high]``."""
    return field(default=default, metadata={"count": (low, high)})


def _number(default: float, low: float, high: float) -> Any:
    """A number setting checked on construction to lie in ``[low, high]``, and stored as a float."""
    return field(default=default, metadata={"number": (low, high)})


def host_name() -> str:
    """This host's name, reduced to writer-id characters."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname() or "localhost")[:100]


@dataclass(frozen=True, slots=True)
class GroupCommit:
    """How the trail batches concurrent records into one durable write, and the deadline of every write."""

    max_batch: int = DEFAULT_GROUP_COMMIT_MAX_BATCH
    max_delay_seconds: float = DEFAULT_GROUP_COMMIT_MAX_DELAY_MS / 1000.0
    write_timeout_seconds: float = DEFAULT_WRITE_TIMEOUT_SECONDS


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The ``audit`` section. Validated on construction."""

    sink: str = "file"
    path: str | None = None
    dsn_env: str | None = None
    writer_id: str = ""
    checkpoint_every: int = _count(DEFAULT_CHECKPOINT_EVERY, 1, 10_000_000)
    checkpoint_interval_seconds: float = _number(DEFAULT_CHECKPOINT_INTERVAL_SECONDS, 0.001, 86_400.0)
    signing_key_file: str | None = None
    signing_key_env: str | None = None
    encryption_key_env: str | None = None
    encryption_key_file: str | None = None
    encryption_key_id: str | None = None
    retention_days: int = _count(DEFAULT_RETENTION_DAYS, 1, 36_500)
    group_commit_max_delay_ms: float = _number(
        DEFAULT_GROUP_COMMIT_MAX_DELAY_MS, 0.0, MAX_GROUP_COMMIT_DELAY_MS
    )
    group_commit_max_batch: int = _count(DEFAULT_GROUP_COMMIT_MAX_BATCH, 1, MAX_GROUP_COMMIT_BATCH)
    write_timeout_seconds: float = _number(DEFAULT_WRITE_TIMEOUT_SECONDS, 0.001, MAX_WRITE_TIMEOUT_SECONDS)
    denial_burst_threshold: int = _count(DEFAULT_DENIAL_BURST_THRESHOLD, 1, 1_000_000)
    denial_burst_window_seconds: float = _number(DEFAULT_DENIAL_BURST_WINDOW_SECONDS, 0.001, 86_400.0)
    pg_schema: str = DEFAULT_PG_SCHEMA
    pg_table: str = DEFAULT_PG_TABLE
    pg_role: str | None = None
    pg_create_schema: bool = True
    public_key_files: tuple[str, ...] = ()
    signer_factory: str | None = None
    witness: str = "file"
    witness_path: str | None = None
    witness_url_env: str | None = None
    witness_dsn_env: str | None = None
    witness_key_prefix: str = DEFAULT_WITNESS_KEY_PREFIX
    witness_pg_schema: str = DEFAULT_PG_SCHEMA
    witness_pg_table: str = DEFAULT_PG_WITNESS_TABLE
    writer_state_dir: str | None = None

    def __post_init__(self) -> None:
        if self.sink not in SINKS:
            raise ConfigError("audit.sink", f"must be one of {', '.join(SINKS)}")
        if self.path is None and self.sink in ("file", "sqlite"):
            object.__setattr__(
                self, "path", DEFAULT_SQLITE_PATH if self.sink == "sqlite" else DEFAULT_FILE_PATH
            )
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ConfigError("audit.path", "must be a non-empty path")
        if self.writer_id and not _WRITER_ID.match(self.writer_id):
            raise ConfigError("audit.writer_id", "1-128 characters from [A-Za-z0-9_.:@-]")
        self._check_witness()
        if isinstance(self.public_key_files, str) or not all(
            isinstance(p, str) and p.strip() for p in self.public_key_files
        ):
            raise ConfigError("audit.public_key_files", "must be a list of public key (PEM) file paths")
        object.__setattr__(self, "public_key_files", tuple(self.public_key_files))
        if self.signer_factory is not None and not _FACTORY.match(str(self.signer_factory)):
            raise ConfigError("audit.signer_factory", "must be 'package.module:callable'")
        if self.signer_factory and (self.signing_key_file or self.signing_key_env):
            raise ConfigError("audit.signer_factory", "set signer_factory or a signing key, not both")
        if not isinstance(self.pg_create_schema, bool):
            raise ConfigError("audit.pg_create_schema", "must be true or false")
        for key in ("dsn_env", "signing_key_env", "encryption_key_env", "witness_url_env", "witness_dsn_env"):
            value = getattr(self, key)
            if value is not None and not _ENV_NAME.match(value):
                raise ConfigError(
                    f"audit.{key}", "must be the NAME of an environment variable, not its value"
                )
        if self.sink == "postgres" and not self.dsn_env:
            raise ConfigError("audit.dsn_env", "required for the postgres sink (never put the DSN inline)")
        for key in ("pg_schema", "pg_table", "witness_pg_schema", "witness_pg_table"):
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
        for kind, check in (("count", self._check_int), ("number", self._check_float)):
            for f in fields(self):
                if kind in f.metadata:
                    check(f.name, *f.metadata[kind])

    def _check_witness(self) -> None:
        if self.witness not in WITNESSES:
            raise ConfigError("audit.witness", f"must be one of {', '.join(WITNESSES)}")
        if self.witness == "redis" and not self.witness_url_env:
            raise ConfigError("audit.witness_url_env", "required for the redis witness (a variable NAME)")
        if self.witness == "postgres" and not self.witness_dsn_env:
            raise ConfigError("audit.witness_dsn_env", "required for the postgres witness (a variable NAME)")
        if not isinstance(self.witness_key_prefix, str) or not _KEY_PREFIX.match(self.witness_key_prefix):
            raise ConfigError("audit.witness_key_prefix", "0-100 characters from [A-Za-z0-9_.:@-]")
        if self.witness_path is not None and (
            not isinstance(self.witness_path, str) or not self.witness_path
        ):
            raise ConfigError("audit.witness_path", "must be a non-empty path")

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
    def group_commit(self) -> GroupCommit:
        """``group_commit_max_batch``, ``group_commit_max_delay_ms`` (as seconds) and ``write_timeout_seconds``."""
        return GroupCommit(
            self.group_commit_max_batch, self.group_commit_max_delay_ms / 1000.0, self.write_timeout_seconds
        )

    @property
    def audit_dir(self) -> Path:
        """The directory that holds the trail (``var/audit`` for database sinks)."""
        return (
            Path(self.path).parent
            if self.path and self.sink in ("file", "sqlite")
            else Path(DEFAULT_STATE_DIR)
        )

    @property
    def signing_key_path(self) -> Path:
        """The signing key path: ``signing_key_file``, else ``<audit dir>-keys/audit-signing.pem``."""
        if self.signing_key_file:
            return Path(self.signing_key_file)
        folder = self.audit_dir
        return folder.with_name(folder.name + "-keys") / "audit-signing.pem"

    @property
    def state_dir(self) -> Path:
        """Where the writer-id files live: ``writer_state_dir``, else the audit directory."""
        return Path(self.writer_state_dir) if self.writer_state_dir else self.audit_dir

    def witness_file(self, writer_id: str) -> Path | None:
        """The file witness's path (None unless ``witness`` is ``file`` and the sink has a durable chain)."""
        if self.witness != "file" or self.sink == "stdout":
            return None
        if self.witness_path:
            return Path(self.witness_path)
        folder = self.audit_dir
        name = Path(str(self.path)).name if self.sink in ("file", "sqlite") else f"pg-{writer_id}"
        return folder.with_name(folder.name + "-witness") / f"{name}.witness.json"

    def dsn(self) -> str:
        """The PostgreSQL DSN, read from the environment variable named by ``dsn_env``."""
        if not self.dsn_env:
            raise ConfigError("audit.dsn_env", "not set")
        value = os.environ.get(self.dsn_env)
        if not value:
            raise ConfigError("audit.dsn_env", "the named environment variable is empty or missing")
        return value


def _inside(child: Path, folder: Path) -> bool:
    try:
        child.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _chain_target(s: AuditSettings) -> tuple[str, str] | None:
    if s.sink in ("file", "sqlite"):
        return (s.sink, str(Path(str(s.path)).resolve()))
    if s.sink == "postgres":
        return ("postgres", f"{s.dsn_env}/{s.pg_schema}.{s.pg_table}")
    return None


def config_warnings(settings: AuditSettings | Iterable[AuditSettings]) -> list[str]:
    """What ``config check`` warns about in one or several audit sections (one per replica's config)."""
    many = [settings] if isinstance(settings, AuditSettings) else list(settings)
    out: list[str] = []
    for s in many:
        if s.sink in ("file", "sqlite") and not s.signing_key_env and not s.signer_factory:
            if _inside(s.signing_key_path, s.audit_dir):
                out.append(
                    "audit.signing_key_file is inside the audit directory: whoever can rewrite the trail "
                    "can re-sign it; keep the key elsewhere (or off the host with audit.signer_factory)"
                )
        key = s.signing_key_path
        if not s.signing_key_env and not s.signer_factory and key.exists():
            if stat.S_IMODE(key.stat().st_mode) & 0o077:
                out.append("audit signing key file is readable by group or others: chmod 600 it")
        witness = s.witness_file(s.writer_id or "w")
        if witness is not None and s.sink in ("file", "sqlite") and _inside(witness, s.audit_dir):
            out.append(
                "audit.witness_path is inside the audit directory: a cut trail and its witness go together"
            )
        if s.witness == "none" and s.sink != "stdout":
            out.append("audit.witness is none: a trail cut at its end is detected only with --expect-min-seq")
        if not s.public_key_files:
            out.append(
                "audit.public_key_files is empty: pin the signing key's public half (and after a rotation, "
                "every earlier one) so that `audit verify --config` does not rely on the key's own directory"
            )
        if s.sink == "postgres" and s.writer_id:
            out.append(
                f"audit.writer_id is fixed ({s.writer_id}): every replica started from this config writes "
                "the same chain and they collide (audit_unavailable); leave it unset for a per-process id"
            )
        for legacy in ("checkpoint_every", "checkpoint_interval_seconds"):
            if (
                getattr(s, legacy)
                != {
                    "checkpoint_every": DEFAULT_CHECKPOINT_EVERY,
                    "checkpoint_interval_seconds": DEFAULT_CHECKPOINT_INTERVAL_SECONDS,
                }[legacy]
            ):
                out.append(f"audit.{legacy} is no longer used: every group commit is signed")  # fmt: skip
    seen: dict[tuple[str, str, str], int] = {}
    for n, s in enumerate(many):
        target = _chain_target(s)
        if target is None:
            continue
        ident = (*target, s.writer_id or "(per-process default)")
        if ident in seen and (s.writer_id or s.sink in ("file", "sqlite")):
            out.append(
                f"configs {seen[ident] + 1} and {n + 1} write the same {target[0]} chain"
                + (f" as writer {s.writer_id}" if s.writer_id else "")
                + ": the second writer fails closed (audit_unavailable)"
            )
        seen.setdefault(ident, n)
    return out
