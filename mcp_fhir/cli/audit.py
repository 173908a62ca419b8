"""``mcp-fhir audit``: verify, query and export the audit trail.

    mcp-fhir audit verify --config config.yaml [--json]
    mcp-fhir audit verify --path var/audit/audit.jsonl --public-key K.pub [--public-key OLD.pub ...]
                          [--witness-file W | --no-witness] [--accept-recovery SEQ ...]
                          [--expect-min-seq N] [--json]
    mcp-fhir audit init-postgres --dsn-env ADMIN_DSN [--schema S] [--table T]
    mcp-fhir audit disclosures --config config.yaml --patient ID [--from T] [--to T]
                          --format md|html|json|fhir [--out FILE]   (refuses a trail that does not verify)
    mcp-fhir audit keygen --out KEY.pem          (a new signing key, 0600, and KEY.pem.pub: for rotation)
    mcp-fhir audit query  --path ... [--patient P] [--agent A] [--since T] [--until T] [--result R]
                          [--purpose P] [--alert A] [--tool T] [--limit N] [--cursor C] [--json]
    mcp-fhir audit export --path ... --format fhir|jsonl --output bundle|ndjson [--out FILE] [filters]

Sources: ``--config`` (the sidecar's own config: sink, path, pinned keys, witness), ``--path``
(``.db``/``.sqlite``/``.sqlite3`` is SQLite, anything else JSON lines) or ``--dsn-env NAME --writer W``
for PostgreSQL. ``verify`` needs a pinned public key: ``audit.public_key_files`` in the config (or,
failing that, the configured signing key's public half), or ``--public-key`` (repeat it for a key
history); it never uses a key found beside the trail. The witness comes from the config, from
``--witness-file``, or from its default place beside the audit directory; a missing witness fails
unless ``--no-witness``. Exit codes: 0 ok, 1 verification failed, 2 usage or configuration error.
Progress goes to stderr; results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO, cast

from mcp_fhir._exceptions import ConfigError, MCPFhirError
from mcp_fhir.audit.crypto import RecordCipher
from mcp_fhir.audit.export_fhir import to_audit_event, to_bundle, to_ndjson
from mcp_fhir.audit.query import (
    DEFAULT_QUERY_LIMIT,
    AuditQuery,
    check_limit,
    decode_entries,
    page,
    parse_cursor,
)
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import load_cipher
from mcp_fhir.audit.verify import VerifyReport, verify_entries

__all__ = ["add_parser", "main"]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
EXPORT_ALL_LIMIT = 10_000_000


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the sidecar's YAML config: read the audit section from it")
    p.add_argument("--path", help="JSON-lines log, or SQLite database (.db/.sqlite)")
    p.add_argument("--dsn-env", help="NAME of the environment variable holding the PostgreSQL DSN")
    p.add_argument("--writer", help="writer id of the chain to read (PostgreSQL)")
    p.add_argument("--schema", default="public", help="PostgreSQL schema (default public)")
    p.add_argument("--table", default="audit_log", help="PostgreSQL table (default audit_log)")
    p.add_argument("--encryption-key-file", help="file with the base64 AES-256 key")
    p.add_argument(
        "--encryption-key-env", help="NAME of the environment variable with the base64 AES-256 key"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _pinning_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--public-key", action="append", default=[],
        help="pinned Ed25519 public key PEM; repeat for the key history after rotations",
    )  # fmt: skip
    p.add_argument(
        "--witness-file", help="the witness file (default: from --config, or beside the audit dir)"
    )
    p.add_argument("--no-witness", action="store_true", help="do not check a witness (a copied trail)")
    p.add_argument(
        "--accept-recovery", action="append", type=int, default=[], metavar="SEQ",
        help="accept the unvouched range of the recovery entry at SEQ, after review",
    )  # fmt: skip


def _filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patient", help="canonical patient id the records are about")
    p.add_argument("--agent", help="subject id of the calling agent")
    p.add_argument("--since", help="RFC 3339, inclusive")
    p.add_argument("--until", help="RFC 3339, exclusive")
    p.add_argument("--result", choices=["allowed", "denied", "error"], help="the call's outcome")
    p.add_argument("--purpose", help="purpose of use the call named")
    p.add_argument("--alert", help="records that raised this alert")
    p.add_argument("--tool", help="tool name")
    p.add_argument(
        "--kind", choices=["access", "alert", "auth_failure", "shadow_divergence"], help="record kind"
    )


def add_parser(subparsers: Any) -> None:
    """Add ``audit`` and its subcommands to a parent parser's subparsers."""
    audit = subparsers.add_parser("audit", help="verify, query and export the audit trail")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    verify = sub.add_parser("verify", help="check the hash chain and checkpoint signatures")
    _source_options(verify)
    _pinning_options(verify)
    verify.add_argument("--expect-min-seq", type=int, help="fail if the log ends before this seq")
    verify.set_defaults(func=run_verify)

    disclosures = sub.add_parser(
        "disclosures", help="accounting of disclosures for one patient (from a trail that verifies)"
    )
    _source_options(disclosures)
    _pinning_options(disclosures)
    disclosures.add_argument("--patient", required=True, help="the canonical patient id")
    disclosures.add_argument("--from", dest="since", help="RFC 3339, inclusive")
    disclosures.add_argument("--to", dest="until", help="RFC 3339, exclusive")
    disclosures.add_argument(
        "--format",
        choices=["md", "html", "json", "fhir"],
        default="md",
        help="md for a reader, html to print, json for tools, fhir for a Bundle of AuditEvents (default md)",
    )
    disclosures.add_argument("--out", help="write here (mode 0600) instead of stdout")
    disclosures.set_defaults(func=run_disclosures)

    keygen = sub.add_parser("keygen", help="make a new Ed25519 signing key (0600) and its .pub, for rotation")
    keygen.add_argument("--out", required=True, help="the private key file to create (must not exist)")
    keygen.set_defaults(func=run_keygen)

    init = sub.add_parser(
        "init-postgres", help="create the PostgreSQL audit schema, table, triggers and role"
    )
    init.add_argument("--dsn-env", required=True, help="NAME of the variable holding an ADMIN DSN")
    init.add_argument("--schema", default="public", help="PostgreSQL schema to create (default public)")
    init.add_argument("--table", default="audit_log", help="PostgreSQL table to create (default audit_log)")
    init.set_defaults(func=run_init_postgres)

    query = sub.add_parser("query", help="search records")
    _source_options(query)
    _filter_options(query)
    query.add_argument("--limit", type=int, default=DEFAULT_QUERY_LIMIT, help="records per page")
    query.add_argument("--cursor", help="continue from the cursor a previous page printed")
    query.set_defaults(func=run_query)

    export = sub.add_parser("export", help="export records as FHIR AuditEvents or JSON lines")
    _source_options(export)
    _filter_options(export)
    export.add_argument(
        "--format", choices=["fhir", "jsonl"], default="fhir", help="FHIR AuditEvents or raw records"
    )
    export.add_argument(
        "--output", choices=["bundle", "ndjson"], default="bundle", help="one Bundle or NDJSON"
    )
    export.add_argument("--out", help="write here instead of stdout")
    export.add_argument("--limit", type=int, default=EXPORT_ALL_LIMIT, help="at most this many records")
    export.set_defaults(func=run_export)


def main(argv: list[str] | None = None) -> int:
    """Run ``audit ...`` as if from the command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="mcp-fhir")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


# -- sources -------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> AuditSettings | None:
    """The audit section of ``--config``, with its sink copied onto the source options; or None."""
    if not getattr(args, "config", None):
        return None
    cached = getattr(args, "_audit_settings", None)
    if cached is not None:
        return cast(AuditSettings, cached)
    from mcp_fhir import config

    settings = config.load(args.config).audit_settings()
    if settings.sink in ("file", "sqlite") and not args.path:
        args.path = settings.path
    if settings.sink == "postgres" and not args.dsn_env:
        args.dsn_env, args.schema, args.table = settings.dsn_env, settings.pg_schema, settings.pg_table
        args.writer = args.writer or settings.writer_id or None
    if settings.sink == "stdout":
        raise ConfigError("cli.config", "the stdout sink cannot be read back: verify the shipped stream")
    if not args.encryption_key_env and not args.encryption_key_file:
        args.encryption_key_env = settings.encryption_key_env
        args.encryption_key_file = settings.encryption_key_file
    args._audit_settings = settings
    return settings


def _cipher(args: argparse.Namespace) -> RecordCipher | None:
    _settings(args)
    return load_cipher(
        key_env=args.encryption_key_env, key_file=args.encryption_key_file, key_id=None, section="cli"
    )


def _dsn(args: argparse.Namespace) -> str:
    value = os.environ.get(args.dsn_env or "")
    if not value:
        raise ConfigError("cli.dsn_env", "the named environment variable is empty or missing")
    if not args.writer:
        raise ConfigError("cli.writer", "required with --dsn-env")
    return value


def _entries(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    _settings(args)
    if args.dsn_env:
        from mcp_fhir.audit.sinks.postgres import PostgresSink

        return PostgresSink(_dsn(args), args.writer, schema=args.schema, table=args.table).reader()
    path = _path(args)
    if path.suffix in SQLITE_SUFFIXES:
        from mcp_fhir.audit.sinks.sqlite import iter_sqlite_entries

        return iter_sqlite_entries(path)
    from mcp_fhir.audit.sinks.file import FileSink

    return FileSink(path).reader()


def _path(args: argparse.Namespace) -> Path:
    if not args.path:
        raise ConfigError("cli.path", "give --path or --dsn-env")
    path = Path(args.path)
    if not path.exists():
        raise ConfigError("cli.path", "no such file")
    return path


def _query(args: argparse.Namespace) -> AuditQuery:
    return AuditQuery(
        patient=args.patient, subject_id=args.agent, since=args.since, until=args.until, result=args.result,
        purpose=args.purpose, alert=args.alert, tool=args.tool, kind=args.kind,
    )  # fmt: skip


def _guarded(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except MCPFhirError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (OSError, ValueError) as exc:
            print(f"error: {type(exc).__name__}: cannot read the audit source", file=sys.stderr)
            return EXIT_USAGE

    run.__name__ = fn.__name__
    return run


# -- verify --------------------------------------------------------------------------------


def _progress(count: int) -> None:
    print(f"\rverified {count} entries", end="", file=sys.stderr, flush=True)


def _verify_items(args: argparse.Namespace) -> Iterable[tuple[int, dict[str, Any] | None, bool]]:
    if args.dsn_env or _path(args).suffix in SQLITE_SUFFIXES:
        return ((n, e, False) for n, e in enumerate(_entries(args), start=1))
    from mcp_fhir.audit.verify import file_items

    return file_items(_path(args))


def _public_keys(args: argparse.Namespace) -> list[bytes]:
    """The pinned keys: --public-key, else the config's public_key_files, else its signing key's public half."""
    try:
        if args.public_key:
            return [Path(p).read_bytes() for p in args.public_key]
        settings = _settings(args)
        if settings is not None:
            if settings.public_key_files:
                return [Path(p).read_bytes() for p in settings.public_key_files]
            if not settings.signing_key_env and not settings.signer_factory:
                pub = settings.signing_key_path.with_name(settings.signing_key_path.name + ".pub")
                return [pub.read_bytes()]
    except OSError as exc:
        raise ConfigError("cli.public_key", "a pinned public key file could not be read") from exc
    raise ConfigError(
        "cli.public_key",
        "verify needs a pinned public key: --public-key FILE (repeat for a key history), or --config "
        "with audit.public_key_files",
    )


def _witness(args: argparse.Namespace) -> tuple[dict[str, Any] | None, bool]:
    """The witnessed head to check the trail against, and whether one was expected."""
    if args.no_witness:
        return None, False
    from mcp_fhir.audit.trail import build_witness
    from mcp_fhir.audit.witness import FileWitness, Witness

    settings = _settings(args)
    witness: Witness | None
    if args.witness_file:
        witness = FileWitness(Path(args.witness_file))
    elif settings is not None:
        witness = build_witness(settings, args.writer or settings.writer_id or "")
    elif args.path:
        sink = "sqlite" if Path(args.path).suffix in SQLITE_SUFFIXES else "file"
        witness = build_witness(AuditSettings(sink=sink, path=args.path, writer_id="cli"), "cli")
    else:
        witness = build_witness(
            AuditSettings(sink="postgres", dsn_env=args.dsn_env, writer_id=args.writer or "cli"), args.writer
        )
    if witness is None:
        return None, False
    try:
        return witness.read(), True
    finally:
        witness.close()


@_guarded
def run_verify(args: argparse.Namespace) -> int:
    """``audit verify``."""
    keys = _public_keys(args)
    witness, expected = _witness(args)
    report = verify_entries(
        _verify_items(args), public_key=keys, encryption_key=_cipher(args),
        progress=_progress, expect_min_seq=args.expect_min_seq, witness=witness,
        accept_recoveries=args.accept_recovery, require_witness=expected,
    )  # fmt: skip
    print(file=sys.stderr)
    _print_report(report, args.json, sys.stdout)
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED


@_guarded
def run_disclosures(args: argparse.Namespace) -> int:
    """``audit disclosures``: verify, then report; a trail that does not verify gets no report."""
    from mcp_fhir.audit.disclosures import TrailNotVerified, build_disclosures, render
    from mcp_fhir.audit.query import AuditQuery

    AuditQuery(since=args.since, until=args.until)  # validates the timestamps (InvalidArgument)
    keys = _public_keys(args)
    witness, expected = _witness(args)
    try:
        report = build_disclosures(
            _verify_items(args), patient=args.patient, since=args.since, until=args.until, public_key=keys,
            witness=witness, require_witness=expected, accept_recoveries=args.accept_recovery,
            encryption_key=_cipher(args), progress=_progress,
        )  # fmt: skip
    except TrailNotVerified as exc:
        print(file=sys.stderr)
        _print_report(exc.report, False, sys.stderr)
        print("error: the trail does not verify; no disclosures report is made from it", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    print(file=sys.stderr)
    text = render(report, args.format)
    if args.out:
        _write_private(Path(args.out), text)
        print(
            f"wrote the {args.format} report for {len(report.accesses)} accesses to {args.out}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return EXIT_OK


@_guarded
def run_keygen(args: argparse.Namespace) -> int:
    """``audit keygen``: a new signing key; prints its key id and where its public half is."""
    from mcp_fhir.audit.crypto import key_id, load_or_create_signing_key

    out = Path(args.out)
    if out.exists():
        raise ConfigError("cli.out", "the key file exists already (a rotation makes a NEW key)")
    key, _ = load_or_create_signing_key(out)
    print(f"key id {key_id(key.public_key())}: private {out} (0600), public {out}.pub")
    return EXIT_OK


@_guarded
def run_init_postgres(args: argparse.Namespace) -> int:
    """``audit init-postgres``: the schema, table, triggers and writer role (run once, as an admin)."""
    from mcp_fhir.audit.sinks.postgres import WRITER_ROLE, setup_postgres_schema

    value = os.environ.get(args.dsn_env or "")
    if not value:
        raise ConfigError("cli.dsn_env", "the named environment variable is empty or missing")
    setup_postgres_schema(value, schema=args.schema, table=args.table)
    print(f"ok: {args.schema}.{args.table} is append-only; writers run as role {WRITER_ROLE}")
    return EXIT_OK


def _print_report(report: VerifyReport, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), sort_keys=True), file=out)
        return
    if report.problem is not None:
        p = report.problem
        print(f"FAILED: {p.kind} at seq {p.seq}, line {p.line}: {p.detail}", file=out)
    else:
        print(
            f"OK: {report.entries} entries ({report.records} records, {report.checkpoints} checkpoints, "
            f"{report.recoveries} recoveries), last seq {report.last_seq}, "
            f"last checkpoint {report.last_checkpoint_seq}, keys {','.join(report.key_ids) or '-'}, "
            f"witness {report.witness_seq if report.witness_checked else 'not checked'}",
            file=out,
        )
    for gap in report.unvouched:
        state = "accepted" if gap["accepted"] else "NOT accepted"
        print(
            f"unvouched: seqs {gap['from']}..{gap['to']} (recovery at seq {gap['recovery_seq']}, {state})",
            file=out,
        )
    for warning in report.warnings:
        print(f"warning: {warning}", file=out)


# -- query and export ----------------------------------------------------------------------


@_guarded
def run_query(args: argparse.Namespace) -> int:
    """``audit query``."""
    cipher = _cipher(args)
    source = _SkippedCounter(_after(_entries(args), parse_cursor(args.cursor)), cipher)
    rows, cursor = page(decode_entries(source, cipher), _query(args), limit=check_limit(args.limit))
    source.warn()
    if args.json:
        print(json.dumps({"records": rows, "next_cursor": cursor}, sort_keys=True))
        return EXIT_OK
    for row in rows:
        print(
            f"{row['seq']:>8}  {row.get('ts')}  {row.get('kind'):<8} {row.get('result'):<8} "
            f"agent={row.get('subject_id')} tool={row.get('tool')} patient={row.get('patient')} "
            f"purpose={row.get('purpose')} reasons={','.join(row.get('reason_codes') or []) or '-'}"
        )
    if cursor:
        print(f"more: --cursor {cursor}")
    return EXIT_OK


class _SkippedCounter:
    """Counts encrypted entries that pass by when no key was given, to warn on stderr."""

    def __init__(self, entries: Iterable[dict[str, Any]], cipher: RecordCipher | None) -> None:
        self._entries = entries
        self._watch = cipher is None
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for entry in self._entries:
            if self._watch and "ct" in entry:
                self.skipped += 1
            yield entry

    def warn(self) -> None:
        if self.skipped:
            print(
                f"warning: {self.skipped} encrypted records skipped (no encryption key given)",
                file=sys.stderr,
            )


def _write_private(path: Path, text: str) -> None:
    """Audit data leaves the trail only into files readable by their owner (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def _after(entries: Iterable[dict[str, Any]], seq: int) -> Iterator[dict[str, Any]]:
    return (e for e in entries if int(e.get("seq", 0)) > seq)


@_guarded
def run_export(args: argparse.Namespace) -> int:
    """``audit export``."""
    cipher = _cipher(args)
    source = _SkippedCounter(_entries(args), cipher)
    rows, _ = page(decode_entries(source, cipher), _query(args), limit=max(1, args.limit))
    source.warn()
    if args.format == "fhir":
        writer = args.writer or "mcp-fhir"
        events = [to_audit_event(r, seq=r["seq"], writer=writer) for r in rows]
        text = (
            json.dumps(to_bundle(events), sort_keys=True) + "\n"
            if args.output == "bundle"
            else to_ndjson(events)
        )
    elif args.output == "bundle":
        text = json.dumps(rows, sort_keys=True) + "\n"
    else:
        text = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows)
    if args.out:
        _write_private(Path(args.out), text)
        print(f"exported {len(rows)} records to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
