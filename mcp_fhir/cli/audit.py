"""``mcp-fhir audit``: verify, query and export the audit trail.

    mcp-fhir audit verify --path var/audit/audit.jsonl [--public-key K.pub] [--expect-min-seq N] [--json]
    mcp-fhir audit query  --path ... [--patient P] [--agent A] [--since T] [--until T] [--result R]
                          [--purpose P] [--alert A] [--tool T] [--limit N] [--cursor C] [--json]
    mcp-fhir audit export --path ... --format fhir|jsonl --output bundle|ndjson [--out FILE] [filters]

Sources: ``--path`` (``.db``/``.sqlite``/``.sqlite3`` is SQLite, anything else JSON lines) or
``--dsn-env NAME --writer W`` for PostgreSQL. Exit codes: 0 ok, 1 verification failed, 2 usage
or configuration error. Progress goes to stderr; results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

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
from mcp_fhir.audit.trail import load_cipher
from mcp_fhir.audit.verify import VerifyReport, verify_entries

__all__ = ["add_parser", "main"]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
EXPORT_ALL_LIMIT = 10_000_000


def _source_options(p: argparse.ArgumentParser) -> None:
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
    verify.add_argument("--public-key", help="Ed25519 public key PEM (default: <path>.signing.pem.pub)")
    verify.add_argument("--expect-min-seq", type=int, help="fail if the log ends before this seq")
    verify.set_defaults(func=run_verify)

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


def _cipher(args: argparse.Namespace) -> RecordCipher | None:
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
    if args.dsn_env:
        from mcp_fhir.audit.sinks.postgres import iter_postgres_entries

        return iter_postgres_entries(_dsn(args), args.writer, schema=args.schema, table=args.table)
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


def _public_key(args: argparse.Namespace) -> bytes | None:
    if args.public_key:
        return Path(args.public_key).read_bytes()
    if args.path:
        beside = Path(args.path + ".signing.pem.pub")
        if beside.exists():
            return beside.read_bytes()
    return None


@_guarded
def run_verify(args: argparse.Namespace) -> int:
    """``audit verify``."""
    report = verify_entries(
        _verify_items(args), public_key=_public_key(args), encryption_key=_cipher(args),
        progress=_progress, expect_min_seq=args.expect_min_seq,
    )  # fmt: skip
    print(file=sys.stderr)
    _print_report(report, args.json, sys.stdout)
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED


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
            f"last checkpoint {report.last_checkpoint_seq}",
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
        Path(args.out).write_text(text)
        print(f"exported {len(rows)} records to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
