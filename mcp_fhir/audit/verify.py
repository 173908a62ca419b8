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
* each checkpoint's Ed25519 signature is valid under the PINNED key its id names
  (a key history after rotations; never a key found beside the trail) ...... else ``bad_checkpoint_signature``
* with the encryption key, every encrypted record decrypts in its place .... else ``decrypt_failed``
* the log reaches its witness's seq, and holds the same entry there ........ else ``truncated`` /
  ``witness_mismatch`` (the witness is the latest signed head, kept outside the trail);
  a witness that was expected and is gone .................................. ``witness_missing``
* with ``expect_min_seq``, the log reaches at least that seq ............... else ``truncated``
* the log ends on a signed checkpoint (the writer signs every batch
  before releasing any of it) .............................................. else ``unsigned_tail``
* no entries a restarted writer declared unvouched (a ``recovery`` entry:
  written after the last signature, before a crash or by someone else),
  unless the auditor accepted that recovery by its seq ..................... else ``unvouched``

The report names the first problem: its kind, the seq and the line (1-based; for databases,
the row's position in seq order). Chain problems come first; then truncation against the witness,
the unsigned tail, and unvouched ranges.

A torn last line (no trailing newline) is a crash during an unacknowledged write: it is a
warning, not a failure (unless the witness shows the entry was signed), and the writer cuts it
(recording a ``recovery`` entry) when it restarts. A pinned public key is required
(``ConfigError`` without one). Without the encryption key, the chain still verifies (the hash
covers the ciphertext) but contents are not checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.audit.chain import GENESIS, entry_hash, entry_kind
from mcp_fhir.audit.crypto import DecryptionFailed, KeyRing, RecordCipher, load_public_key
from mcp_fhir.audit.sinks.file import iter_file_lines
from mcp_fhir.audit.witness import witness_seq_hash

__all__ = [
    "Problem",
    "VerifyOptions",
    "VerifyReport",
    "as_keyring",
    "file_items",
    "verify_entries",
    "verify_file",
    "verify_postgres",
    "verify_sqlite",
]

_DECODER = msgspec.json.Decoder()
PROGRESS_EVERY = 10_000
HASH_HEX_LEN = 64

Progress = Callable[[int], None]
KeyLike = Ed25519PublicKey | bytes | str | Path
PublicKeyLike = KeyRing | KeyLike | Sequence[KeyLike] | None
EncryptionKeyLike = RecordCipher | bytes | None


class VerifyOptions(TypedDict, total=False):
    """What every ``verify_*`` takes besides where the chain is (``verify_entries`` documents each)."""

    public_key: PublicKeyLike
    encryption_key: EncryptionKeyLike
    progress: Progress | None
    expect_min_seq: int | None
    witness: dict[str, Any] | None
    accept_recoveries: Iterable[int]
    require_witness: bool


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
    key_ids: list[str] = field(default_factory=list)
    contents_checked: bool = True
    witness_checked: bool = False
    witness_seq: int | None = None
    unvouched: list[dict[str, Any]] = field(default_factory=list)
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
    kid: str | None = None
    decrypt_ok: bool | None = None
    unvouched: tuple[int, int] | None = None


Item = tuple[int, dict[str, Any] | None, bool]  # (line, entry or None if unparseable, is_torn_tail)


def _one_key(key: KeyLike) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    data = Path(key).read_bytes() if isinstance(key, str | Path) else key
    return load_public_key(data)


def as_keyring(public_key: PublicKeyLike) -> KeyRing:
    """The pinned key(s) as a KeyRing; ConfigError when none is given."""
    if public_key is None or (isinstance(public_key, list | tuple) and not public_key):
        raise ConfigError("public_key", "verification needs a pinned public key (or key history)")
    if isinstance(public_key, KeyRing):
        return public_key
    if isinstance(public_key, Ed25519PublicKey | bytes | str | Path):
        return KeyRing([_one_key(public_key)])
    return KeyRing(_one_key(k) for k in public_key)


def _as_cipher(key: EncryptionKeyLike) -> RecordCipher | None:
    if key is None or isinstance(key, RecordCipher):
        return key
    return RecordCipher(key, None)


def _row(line: int, entry: dict[str, Any], keyring: KeyRing, cipher: RecordCipher | None) -> _Row:
    try:
        seq, hsh, prev = int(entry["seq"]), str(entry["hash"]), str(entry["prev"])
    except (KeyError, TypeError, ValueError):
        return _Row(line, -1, "", "", False, "malformed")
    kind = entry_kind(entry)
    hash_ok = isinstance(entry, _HashChecked) or entry_hash(entry) == hsh
    row = _Row(line, seq, hsh, prev, hash_ok and kind != "unknown", kind)
    if kind == "checkpoint":
        cp = entry.get("checkpoint")
        if isinstance(cp, dict):
            row.cp_seq, row.cp_hash = cp.get("seq"), cp.get("hash")
        row.kid = str(entry.get("pub"))
        row.sig_ok = keyring.verify_entry(entry)
    elif kind == "recovery":
        declared = (
            (entry.get("recovery") or {}).get("unvouched")
            if isinstance(entry.get("recovery"), dict)
            else None
        )
        if isinstance(declared, dict):
            try:
                row.unvouched = (int(declared["from"]), int(declared["to"]))
            except (KeyError, TypeError, ValueError):
                row.unvouched = (seq, seq)
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
    witness: dict[str, Any] | None = None,
    accept_recoveries: Iterable[int] = (),
    require_witness: bool = False,
) -> VerifyReport:
    """Verify a sequence of ``(line, entry | None, torn)`` items. See the module docstring."""
    keyring = as_keyring(public_key)
    cipher = _as_cipher(encryption_key)
    accepted = set(accept_recoveries)
    report = VerifyReport(signatures_checked=True)
    rows: list[_Row] = []
    torn_line: int | None = None
    for n, (line, entry, torn) in enumerate(items, start=1):
        if progress is not None and n % PROGRESS_EVERY == 0:
            progress(n)
        if entry is None:
            if torn:
                torn_line = line
                report.warnings.append(
                    f"line {line}: torn last line (crash during an unacknowledged write); "
                    "the writer cuts it on restart"
                )
                continue
            rows.append(_Row(line, -1, "", "", False, "malformed"))
            continue
        rows.append(_row(line, entry, keyring, cipher))
    if progress is not None:
        progress(len(rows))
    problem = _walk(rows, report)
    last_line = rows[-1].line if rows else 0
    if problem is None:
        problem = _check_witness(rows, report, witness, torn_line or last_line + 1)
    if problem is None and witness is None and require_witness and report.checkpoints:
        problem = Problem(
            "witness_missing", report.last_seq, last_line,
            "the trail has signed checkpoints but its witness is gone: it may have been cut and the witness "
            "removed with it (use --no-witness only for a copy that never had one)",
        )  # fmt: skip
    if problem is None and expect_min_seq is not None and report.last_seq < expect_min_seq:
        problem = Problem(
            "truncated", report.last_seq + 1, last_line + 1,
            f"log ends at seq {report.last_seq} but at least seq {expect_min_seq} was expected",
        )  # fmt: skip
    if problem is None and report.after_last_checkpoint:
        first = rows[-report.after_last_checkpoint]
        problem = Problem(
            "unsigned_tail", first.seq, first.line,
            f"{report.after_last_checkpoint} entries follow the last signed checkpoint: never acknowledged "
            "by the writer (a crash it has not yet recovered from) or written by someone else",
        )  # fmt: skip
    if problem is None:
        problem = _check_unvouched(rows, report, accepted)
    if problem is not None:
        report.ok, report.problem = False, problem
        return report
    if report.encrypted and cipher is None:
        report.contents_checked = False
        report.warnings.append("encrypted, contents not checked (no encryption key given)")
    if not report.witness_checked:
        report.warnings.append("no witness checked: a cut at the end shows only against --expect-min-seq")
    return report


def _check_witness(
    rows: list[_Row], report: VerifyReport, witness: dict[str, Any] | None, end_line: int
) -> Problem | None:
    if witness is None:
        return None
    seen = witness_seq_hash(witness)
    report.witness_checked = True
    if seen is None:
        return Problem("witness_mismatch", 0, 0, "the witness is not a chain entry")
    seq, digest = seen
    report.witness_seq = seq
    if report.last_seq < seq:
        return Problem(
            "truncated", report.last_seq + 1, end_line,
            f"log ends at seq {report.last_seq} but its witness saw signed seq {seq}",
        )  # fmt: skip
    row = next((r for r in rows if r.seq == seq), None)
    if row is None or row.hash != digest:
        return Problem(
            "witness_mismatch", seq, row.line if row else 0,
            "the entry at the witness's seq is not the one the writer signed",
        )  # fmt: skip
    return None


def _check_unvouched(rows: list[_Row], report: VerifyReport, accepted: set[int]) -> Problem | None:
    problem = None
    for row in rows:
        if row.unvouched is None:
            continue
        low, high = row.unvouched
        report.unvouched.append(
            {"recovery_seq": row.seq, "from": low, "to": high, "accepted": row.seq in accepted}
        )
        if row.seq not in accepted and problem is None:
            first = next((r for r in rows if r.seq == low), row)
            problem = Problem(
                "unvouched", low, first.line,
                f"seqs {low}..{high} followed the last signature when the writer restarted (recovery at "
                f"seq {row.seq}): no signature vouches for them; review, then --accept-recovery {row.seq}",
            )  # fmt: skip
    return problem


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
            if not row.sig_ok:
                return Problem("bad_checkpoint_signature", row.seq, row.line,
                               f"checkpoint signature is not valid under a pinned key (key id {row.kid})")  # fmt: skip
            if row.kid not in report.key_ids:
                report.key_ids.append(str(row.kid))
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


class _HashChecked(dict):  # type: ignore[type-arg]
    """An entry whose stored line was already found to hash to its ``hash`` (see ``_stored_hash_ok``)."""

    __slots__ = ()


def _stored_hash_ok(raw: bytes, entry: dict[str, Any]) -> bool:
    """Fast path: the writer stores canonical JSON, so the line minus its ``"hash":"…",`` is what was hashed.

    Sound because the hash binds the bytes: if sha256 of those bytes equals the hash the chain and
    signatures vouch for, the bytes (and so the parsed entry) are the genuine ones. A line that is
    not byte-canonical fails here and is checked the slow way (re-serialised), with the same verdict.
    """
    digest = entry.get("hash")
    if not isinstance(digest, str) or len(digest) != HASH_HEX_LEN:
        return False
    needle = b'"hash":"' + digest.encode() + b'",'
    at = raw.find(needle)
    if at < 0:
        return False
    return hashlib.sha256(raw[:at] + raw[at + len(needle) :]).hexdigest() == digest


def _loads(raw: bytes) -> Any:
    """Parse one stored line: msgspec for speed; anything it refuses gets the standard library's say."""
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw.decode("utf-8"))


def _parse(item: tuple[int, bytes, bool], *, last: bool) -> Item:
    line, raw, terminated = item
    try:
        entry = _loads(raw)
    except ValueError:
        return line, None, last and not terminated
    if not isinstance(entry, dict):
        return line, None, False
    if last and not terminated:
        return line, None, True  # parseable but unterminated: still an unacknowledged write
    if _stored_hash_ok(raw, entry):
        return line, _HashChecked(entry), False
    return line, entry, False


def verify_file(path: str | Path, **options: Unpack[VerifyOptions]) -> VerifyReport:
    """Verify a JSON-lines audit log."""
    return verify_entries(file_items(Path(path)), **options)


def _numbered(entries: Iterable[dict[str, Any]]) -> Iterator[Item]:
    for n, entry in enumerate(entries, start=1):
        yield n, entry, False


def verify_sqlite(path: str | Path, **options: Unpack[VerifyOptions]) -> VerifyReport:
    """Verify a SQLite audit database (``line`` is the row's position in seq order)."""
    from mcp_fhir.audit.sinks.sqlite import iter_sqlite_entries

    return verify_entries(_numbered(iter_sqlite_entries(Path(path))), **options)


def verify_postgres(
    dsn: str,
    writer: str,
    *,
    schema: str = "public",
    table: str = "audit_log",
    role: str | None = None,
    **options: Unpack[VerifyOptions],
) -> VerifyReport:
    """Verify one writer's chain in PostgreSQL (``line`` is the row's position in seq order)."""
    from mcp_fhir.audit.sinks.postgres import PostgresSink

    entries = PostgresSink(dsn, writer, schema=schema, table=table, role=role).reader()
    return verify_entries(_numbered(entries), **options)
