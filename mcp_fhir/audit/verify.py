"""Verifying a stored chain: what it proves, where it breaks, and what it cannot see.

``verify_file`` / ``verify_sqlite`` / ``verify_postgres`` read every entry and check, in order:

* each entry's ``hash`` matches its canonical bytes ........................ else ``edited``
* ``seq`` runs 1, 2, 3 ... with no gap ..................................... else ``deleted``
  (or ``reordered`` when the missing seq sits later in the log and the entry found
  here is a genuine chain member; ``inserted`` when the entry found here is not)
* no seq appears twice ..................................................... else ``inserted``
* each ``prev`` equals the previous entry's ``hash`` ....................... else ``inserted``
  (when the genuine entry follows) or ``chain_broken`` (an earlier entry was rewritten
  together with its hash; signed checkpoints pin which version is genuine)
* each checkpoint covers the entry just before it .......................... else ``bad_checkpoint``
* each checkpoint's Ed25519 signature is valid for the public key .......... else ``bad_checkpoint_signature``
* with the encryption key, every encrypted record decrypts in its place .... else ``decrypt_failed``
* with ``expect_min_seq``, the log reaches at least that seq ............... else ``truncated``

The report names the first problem: its kind, the seq and the line (1-based; for databases,
the row's position in seq order).

Truncation, honestly: a hash chain cannot show that entries were cut from its END. A cut
that removes a signed checkpoint is detectable only against a checkpoint kept elsewhere
(ship checkpoints to a second place, or note ``last_checkpoint`` from a previous report);
entries written after the last checkpoint are protected by the chain alone, so a cut there
is detectable only by count: pass ``expect_min_seq`` (e.g. the seq from a previous verify or
from the server's own metrics). The report states how many entries follow the last checkpoint.

A torn last line (no trailing newline) is a crash during an unacknowledged write: it is a
warning, not a failure, and the writer cuts it (recording a ``recovery`` entry) when it restarts.
Without the public key, signatures are not checked (warning). Without the encryption key,
the chain still verifies (the hash covers the ciphertext) but contents are not checked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mcp_fhir.audit.chain import GENESIS, entry_hash, entry_kind
from mcp_fhir.audit.crypto import CheckpointVerifier, DecryptionFailed, RecordCipher, load_public_key
from mcp_fhir.audit.sinks.file import iter_file_lines

__all__ = [
    "PROBLEM_KINDS",
    "Problem",
    "VerifyReport",
    "file_items",
    "verify_entries",
    "verify_file",
    "verify_postgres",
    "verify_sqlite",
]

PROBLEM_KINDS = frozenset({
    "malformed", "edited", "deleted", "reordered", "inserted", "chain_broken", "bad_checkpoint",
    "bad_checkpoint_signature", "decrypt_failed", "truncated",
})  # fmt: skip
PROGRESS_EVERY = 10_000

Progress = Callable[[int], None]
PublicKeyLike = Ed25519PublicKey | bytes | str | Path | None
EncryptionKeyLike = RecordCipher | bytes | None


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a chain."""

    kind: str
    seq: int
    line: int
    detail: str


@dataclass(slots=True)
class VerifyReport:
    """What verification found. ``ok`` is False exactly when ``problem`` is set."""

    ok: bool = True
    problem: Problem | None = None
    entries: int = 0
    records: int = 0
    encrypted: int = 0
    checkpoints: int = 0
    recoveries: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS
    last_checkpoint_seq: int | None = None
    after_last_checkpoint: int = 0
    signatures_checked: bool = False
    contents_checked: bool = True
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass(slots=True)
class _Row:
    line: int
    seq: int
    hash: str
    prev: str
    self_ok: bool
    kind: str
    cp_seq: int | None = None
    cp_hash: str | None = None
    sig_ok: bool | None = None
    decrypt_ok: bool | None = None


Item = tuple[int, dict[str, Any] | None, bool]  # (line, entry or None if unparseable, is_torn_tail)


def _as_verifier(public_key: PublicKeyLike) -> CheckpointVerifier | None:
    if public_key is None:
        return None
    if isinstance(public_key, Ed25519PublicKey):
        return CheckpointVerifier(public_key)
    data = Path(public_key).read_bytes() if isinstance(public_key, str | Path) else public_key
    return CheckpointVerifier(load_public_key(data))


def _as_cipher(key: EncryptionKeyLike) -> RecordCipher | None:
    if key is None or isinstance(key, RecordCipher):
        return key
    return RecordCipher(key, None)


def _row(
    line: int, entry: dict[str, Any], verifier: CheckpointVerifier | None, cipher: RecordCipher | None
) -> _Row:
    try:
        seq, hsh, prev = int(entry["seq"]), str(entry["hash"]), str(entry["prev"])
    except (KeyError, TypeError, ValueError):
        return _Row(line, -1, "", "", False, "malformed")
    kind = entry_kind(entry)
    row = _Row(line, seq, hsh, prev, entry_hash(entry) == hsh and kind != "unknown", kind)
    if kind == "checkpoint":
        cp = entry.get("checkpoint")
        if isinstance(cp, dict):
            row.cp_seq, row.cp_hash = cp.get("seq"), cp.get("hash")
            if verifier is not None:
                row.sig_ok = (
                    entry.get("pub") == verifier.key_id
                    and isinstance(entry.get("sig"), str)
                    and all(k in cp for k in ("seq", "hash", "ts", "writer"))
                    and verifier.verify(cp, entry["sig"])
                )
    elif kind == "encrypted" and cipher is not None:
        try:
            cipher.decrypt(entry)
            row.decrypt_ok = True
        except DecryptionFailed:
            row.decrypt_ok = False
    return row


def verify_entries(
    items: Iterable[Item],
    *,
    public_key: PublicKeyLike = None,
    encryption_key: EncryptionKeyLike = None,
    progress: Progress | None = None,
    expect_min_seq: int | None = None,
) -> VerifyReport:
    """Verify a sequence of ``(line, entry | None, torn)`` items. See the module docstring."""
    verifier = _as_verifier(public_key)
    cipher = _as_cipher(encryption_key)
    report = VerifyReport(signatures_checked=verifier is not None)
    rows: list[_Row] = []
    for n, (line, entry, torn) in enumerate(items, start=1):
        if progress is not None and n % PROGRESS_EVERY == 0:
            progress(n)
        if entry is None:
            if torn:
                report.warnings.append(
                    f"line {line}: torn last line (crash during an unacknowledged write); "
                    "the writer cuts it on restart"
                )
                continue
            rows.append(_Row(line, -1, "", "", False, "malformed"))
            continue
        rows.append(_row(line, entry, verifier, cipher))
    if progress is not None:
        progress(len(rows))
    problem = _walk(rows, report)
    last_line = rows[-1].line if rows else 0
    if problem is None and expect_min_seq is not None and report.last_seq < expect_min_seq:
        problem = Problem(
            "truncated", report.last_seq + 1, last_line + 1,
            f"log ends at seq {report.last_seq} but at least seq {expect_min_seq} was expected",
        )  # fmt: skip
    if problem is not None:
        report.ok, report.problem = False, problem
        return report
    if report.encrypted and cipher is None:
        report.contents_checked = False
        report.warnings.append("encrypted, contents not checked (no encryption key given)")
    if verifier is None and report.checkpoints:
        report.warnings.append("checkpoint signatures not checked (no public key given)")
    if report.after_last_checkpoint:
        report.warnings.append(
            f"{report.after_last_checkpoint} entries follow the last signed checkpoint: a cut there "
            "shows only against --expect-min-seq"
        )
    return report


def _walk(rows: list[_Row], report: VerifyReport) -> Problem | None:
    by_seq: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_seq.setdefault(row.seq, []).append(i)
    expected, head = 1, GENESIS
    for i, row in enumerate(rows):
        if row.kind == "malformed":
            return Problem(
                "malformed", expected, row.line, "not a chain entry (unparseable or missing fields)"
            )
        if not row.self_ok:
            return Problem("edited", row.seq, row.line, "entry content does not match its hash")
        if row.seq != expected:
            return _misplaced(rows, i, expected, by_seq)
        if row.prev != head:
            following = rows[i + 1] if i + 1 < len(rows) else None
            if len(by_seq[row.seq]) > 1 or (following is not None and following.prev == head):
                return Problem("inserted", row.seq, row.line, "entry does not link to its predecessor; "
                               "the genuine entry follows it")  # fmt: skip
            return Problem(
                "chain_broken", row.seq, row.line,
                f"prev does not match the hash of seq {row.seq - 1}: that entry was rewritten with a new "
                "hash, or this one was forged",
            )  # fmt: skip
        if row.kind == "checkpoint":
            if row.cp_seq != row.seq - 1 or row.cp_hash != head:
                return Problem("bad_checkpoint", row.seq, row.line,
                               "checkpoint does not cover the entry before it")  # fmt: skip
            if row.sig_ok is False:
                return Problem("bad_checkpoint_signature", row.seq, row.line,
                               "checkpoint signature is not valid for the public key")  # fmt: skip
            report.checkpoints += 1
            report.last_checkpoint_seq = row.seq
            report.after_last_checkpoint = 0
        else:
            report.after_last_checkpoint += 1
        if row.decrypt_ok is False:
            return Problem("decrypt_failed", row.seq, row.line, "record does not decrypt with the key given")
        report.entries += 1
        report.records += row.kind in ("record", "encrypted")
        report.encrypted += row.kind == "encrypted"
        report.recoveries += row.kind == "recovery"
        head = row.hash
        expected += 1
        report.last_seq, report.last_hash = row.seq, row.hash
    return None


def _misplaced(rows: list[_Row], i: int, expected: int, by_seq: dict[int, list[int]]) -> Problem:
    row = rows[i]
    if row.seq < expected:
        claimants = by_seq.get(row.seq, [])
        successor = by_seq.get(row.seq + 1, [])
        genuine_prev = rows[successor[0]].prev if successor else None
        forged = next((j for j in claimants if rows[j].hash != genuine_prev), i)
        return Problem("inserted", row.seq, rows[forged].line, f"seq {row.seq} appears more than once")
    if expected in by_seq:
        predecessor = by_seq.get(row.seq - 1, [])
        genuine = len(by_seq[row.seq]) == 1 and any(rows[j].hash == row.prev for j in predecessor)
        if genuine:
            return Problem(
                "reordered",
                expected,
                row.line,
                f"seq {row.seq} found where seq {expected} was expected; seq {expected} comes later",
            )
        return Problem(
            "inserted", row.seq, row.line, f"entry claiming seq {row.seq} is not part of the chain"
        )
    missing = f"seq {expected}" if row.seq == expected + 1 else f"seqs {expected}..{row.seq - 1}"
    return Problem("deleted", expected, row.line, f"{missing} missing before this line")


def file_items(path: Path) -> Iterator[Item]:
    """Parse a JSON-lines log into verification items, marking an unterminated last line as torn."""
    prev: tuple[int, bytes, bool] | None = None
    for current in iter_file_lines(path):
        if prev is not None:
            yield _parse(prev, last=False)
        prev = current
    if prev is not None:
        yield _parse(prev, last=True)


def _parse(item: tuple[int, bytes, bool], *, last: bool) -> Item:
    line, raw, terminated = item
    try:
        entry = json.loads(raw)
    except ValueError:
        return line, None, last and not terminated
    if not isinstance(entry, dict):
        return line, None, False
    if last and not terminated:
        return line, None, True  # parseable but unterminated: still an unacknowledged write
    return line, entry, False


def verify_file(
    path: str | Path,
    *,
    public_key: PublicKeyLike = None,
    encryption_key: EncryptionKeyLike = None,
    progress: Progress | None = None,
    expect_min_seq: int | None = None,
) -> VerifyReport:
    """Verify a JSON-lines audit log."""
    return verify_entries(
        file_items(Path(path)), public_key=public_key, encryption_key=encryption_key,
        progress=progress, expect_min_seq=expect_min_seq,
    )  # fmt: skip


def _numbered(entries: Iterable[dict[str, Any]]) -> Iterator[Item]:
    for n, entry in enumerate(entries, start=1):
        yield n, entry, False


def verify_sqlite(
    path: str | Path,
    *,
    public_key: PublicKeyLike = None,
    encryption_key: EncryptionKeyLike = None,
    progress: Progress | None = None,
    expect_min_seq: int | None = None,
) -> VerifyReport:
    """Verify a SQLite audit database (``line`` is the row's position in seq order)."""
    from mcp_fhir.audit.sinks.sqlite import iter_sqlite_entries

    return verify_entries(
        _numbered(iter_sqlite_entries(Path(path))), public_key=public_key, encryption_key=encryption_key,
        progress=progress, expect_min_seq=expect_min_seq,
    )  # fmt: skip


def verify_postgres(
    dsn: str,
    writer: str,
    *,
    schema: str = "public",
    table: str = "audit_log",
    role: str | None = None,
    public_key: PublicKeyLike = None,
    encryption_key: EncryptionKeyLike = None,
    progress: Progress | None = None,
    expect_min_seq: int | None = None,
) -> VerifyReport:
    """Verify one writer's chain in PostgreSQL (``line`` is the row's position in seq order)."""
    from mcp_fhir.audit.sinks.postgres import iter_postgres_entries

    entries = iter_postgres_entries(dsn, writer, schema=schema, table=table, role=role)
    return verify_entries(
        _numbered(entries), public_key=public_key, encryption_key=encryption_key,
        progress=progress, expect_min_seq=expect_min_seq,
    )  # fmt: skip
