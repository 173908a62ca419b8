"""AuditTrail: the one object the server holds. Chains, signs, encrypts and group-commits records.

    server ──record(rec)──▶ queue ──▶ flusher task (one) ──▶ sink.append(batch + checkpoint) ──▶ fsync / COMMIT
                                      │ chains each entry (seq, prev, hash)          └──▶ witness.write(checkpoint)
                                      │ encrypts the record body (optional)
                                      └ ends EVERY batch with a signed checkpoint over its last entry

``record`` returns only after the batch holding its entry, and the signed checkpoint that closes
that batch, are durable, and the witness has been given the new signed head. So no record is ever
released that a signature does not cover. Any failure — the sink raising, the write timeout
passing, the log vanishing — becomes ``AuditUnavailable`` (code ``audit_unavailable``) at one seam
(``_flush``), counts ``metrics.AUDIT_FAILURES`` and marks the trail unhealthy. An unhealthy trail
reopens the sink before its next write, and ``check()`` tries the same, so it turns True after repair.

(Re)opening verifies from the last signature (``_recover``): it reads the stored chain backwards to
the newest checkpoint that verifies under a pinned key (the signer's own key and
``audit.public_key_files``). Entries after it were never acknowledged (a record is released only
with its batch's checkpoint) and may have been written by anyone with the disk, so the trail never
signs over them as its own: it appends a ``recovery`` entry naming them (seq range, count, sha256 of
their hashes) and any torn bytes the sink cut, raises the ``audit_recovery`` alert (log at ERROR,
metric, and an alert record), and signs after that. ``audit verify`` reports such a range as
``unvouched`` until an auditor accepts it. It refuses to start when the trail is shorter than its
witness or disagrees with it, or when the newest checkpoint is signed by a key that is not pinned.

``close()`` (alias ``aclose()``) drains the queue, seals the trail with a signed checkpoint if its
head is not one already, and releases the sink, the witness and the writer id: it is the one
awaitable a graceful shutdown needs.

Alerts: one record per call. A call's alerts (the policy's, and the denial-burst alert) are in its
own record's ``alerts`` field, counted and logged — see ``alerts.py``. The trail writes a separate
``kind="alert"`` record only for ``audit_recovery``, which no call raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp_fhir import metrics
from mcp_fhir._exceptions import AuditUnavailable, ConfigError
from mcp_fhir.audit.alerts import AlertEmitter, DenialBurstDetector
from mcp_fhir.audit.chain import GENESIS, ChainHead, entry_hash, seal
from mcp_fhir.audit.crypto import (
    CheckpointSigner,
    KeyRing,
    RecordCipher,
    decode_aes_key,
    load_or_create_signing_key,
    load_public_key,
    load_signer_factory,
    load_signing_key_pem,
)
from mcp_fhir.audit.disclosures import DisclosureReport, TrailNotVerified, build_disclosures
from mcp_fhir.audit.query import AuditQuery, check_limit, decode_entries, page, parse_cursor
from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.audit.settings import AuditSettings, GroupCommit, host_name
from mcp_fhir.audit.sinks.base import AuditSink
from mcp_fhir.audit.sinks.file import FileSink
from mcp_fhir.audit.sinks.sqlite import SQLiteSink
from mcp_fhir.audit.sinks.stdout import StdoutSink
from mcp_fhir.audit.verify import file_items
from mcp_fhir.audit.witness import FileWitness, PostgresWitness, RedisWitness, Witness, witness_seq_hash

__all__ = [
    "AUDIT_RECOVERY_ALERT",
    "AuditQuery",
    "AuditSettings",
    "AuditTrail",
    "build_trail",
    "claim_writer_id",
]

log = logging.getLogger(__name__)

AUDIT_RECOVERY_ALERT = "audit_recovery"
MAX_WRITER_SLOTS = 64
RECOVERY_SCAN_TIMEOUT_SECONDS = 300.0
WRITER_ID_FILE_MODE = 0o600


@dataclass(slots=True)
class _Pending:
    records: list[AuditRecord]
    future: asyncio.Future[list[str]] | None
    force_checkpoint: bool = False


@dataclass(slots=True)
class _Tail:
    """What recovery found: the newest verified checkpoint's seq, and the entries after it."""

    signed_seq: int
    signed_hash: str
    after: list[dict[str, Any]]


_STOP = object()


class AuditTrail:
    """Durable, hash-chained, signed audit records. Start it, ``record`` into it, close it."""

    def __init__(
        self,
        sink: AuditSink,
        *,
        signer: CheckpointSigner,
        writer_id: str,
        cipher: RecordCipher | None = None,
        alerts: AlertEmitter | None = None,
        keyring: KeyRing | None = None,
        witness: Witness | None = None,
        group_commit: GroupCommit = GroupCommit(),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], str] = utc_now_ms,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.sink = sink
        self.writer_id = writer_id
        self._signer = signer
        self._keyring = keyring or KeyRing([signer.public_key()])
        if not self._keyring.knows(signer.key_id):
            self._keyring = KeyRing([signer.public_key(), *self._keyring.public_keys()])
        self._witness = witness
        self._cipher = cipher
        self._alerts = alerts or AlertEmitter()
        self._commit = group_commit
        self._clock = clock
        self._wall = wall_clock
        self._on_close = on_close
        self._head = ChainHead()
        self._head_signed = True
        self._acked_seq = 0
        self._healthy = False
        self._started = False
        self._closed = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._io = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self.witness_failures = 0
        self.recoveries = 0

    def __repr__(self) -> str:
        return f"AuditTrail(sink={self.sink!r}, writer_id={self.writer_id!r}, healthy={self._healthy})"

    @property
    def head(self) -> ChainHead:
        """The durable chain head (seq and hash of the last stored entry)."""
        return ChainHead(self._head.seq, self._head.hash)

    @property
    def key_id(self) -> str:
        """The id of the key that signs this trail's checkpoints."""
        return self._signer.key_id

    async def start(self) -> None:
        """Open the sink, verify from the last signature (recovering a crashed tail), start the flusher."""
        if self._started:
            return
        async with self._io:
            try:
                await self._reopen()
            except (AuditUnavailable, ConfigError):
                metrics.AUDIT_FAILURES.inc()
                raise
        self._started = True
        self._flusher = asyncio.create_task(self._flush_loop(), name="audit-flusher")

    async def _reopen(self) -> None:
        """(Re)open the sink and adopt its head. Caller holds ``_io``. Raises AuditUnavailable."""
        try:
            opened = await asyncio.wait_for(self.sink.open(), self._commit.write_timeout_seconds)
            if opened.head.seq < self._acked_seq:
                raise AuditUnavailable("stored audit chain is shorter than what was acknowledged")
            head = ChainHead(opened.head.seq, opened.head.hash)
            # Normally one entry back; a long unsigned tail (or an upgrade) can mean reading far back.
            tail = await asyncio.wait_for(
                asyncio.to_thread(self._scan_tail, head), RECOVERY_SCAN_TIMEOUT_SECONDS
            )
            await self._check_witness(head, tail)
            signed = True
            if tail.after or opened.recovery is not None:
                await self._recover(head, tail, opened.recovery)
            elif head.seq and tail.signed_seq != head.seq:
                signed = False
        except (AuditUnavailable, ConfigError):
            self._healthy = False
            raise
        except Exception as exc:
            self._healthy = False
            raise AuditUnavailable(f"audit sink '{self.sink.name}' could not be opened") from exc
        self._head = head
        self._head_signed = signed
        self._acked_seq = head.seq
        self._healthy = True

    def _scan_tail(self, head: ChainHead) -> _Tail:
        """Read backwards to the newest checkpoint that verifies under a pinned key (blocking)."""
        after: list[dict[str, Any]] = []
        unknown: set[str] = set()
        if head.seq == 0:
            return _Tail(0, head.hash, [])
        reader = self.sink.reverse_reader()
        try:
            found = self._newest_verified(reader, after, unknown)
        finally:
            close = getattr(reader, "close", None)  # a generator holding a file or a connection
            if close is not None:
                close()
        if found is not None:
            after.reverse()
            return _Tail(int(found["seq"]), str(found["hash"]), after)
        if unknown:
            raise ConfigError(
                "audit.public_key_files",
                f"the trail is signed by key(s) {', '.join(sorted(unknown))} that are not pinned: add their "
                "public keys (the key history) before this writer may continue the trail",
            )
        after.reverse()
        return _Tail(0, GENESIS, after)

    def _newest_verified(
        self, reader: Any, after: list[dict[str, Any]], unknown: set[str]
    ) -> dict[str, Any] | None:
        """Walk back to the newest checkpoint that verifies; collect what comes after it into ``after``."""
        for entry in reader:
            if "checkpoint" in entry and entry_hash(entry) == entry.get("hash"):
                cp = entry.get("checkpoint") or {}
                covers = isinstance(cp, dict) and cp.get("seq") == entry.get("seq", 0) - 1
                covers = covers and cp.get("hash") == entry.get("prev")
                if covers and self._keyring.verify_entry(entry):
                    return entry
                if not self._keyring.knows(entry.get("pub")):
                    unknown.add(str(entry.get("pub")))
            after.append(entry)
        return None

    async def _check_witness(self, head: ChainHead, tail: _Tail) -> None:
        if self._witness is None:
            return
        try:
            seen = witness_seq_hash(await asyncio.to_thread(self._witness.read))
        except Exception as exc:  # an unreadable witness is not a reason to stop auditing
            self.witness_failures += 1
            log.warning("audit witness %s could not be read: %s", self._witness.name, type(exc).__name__)
            return
        if seen is None:
            return
        seq, digest = seen
        if seq > head.seq:
            log.error("audit trail ends at seq %d but its witness saw seq %d: it was cut", head.seq, seq)
            raise AuditUnavailable("the audit trail is shorter than its witness (truncated); see verify")
        known = {tail.signed_seq: tail.signed_hash, head.seq: head.hash}
        known.update({int(e.get("seq", -1)): str(e.get("hash")) for e in tail.after})
        if seq in known and known[seq] != digest:
            log.error("audit trail holds a different entry at seq %d than its witness", seq)
            raise AuditUnavailable("the audit trail disagrees with its witness; see verify")

    async def _recover(self, head: ChainHead, tail: _Tail, torn: dict[str, Any] | None) -> None:
        """Never sign over what cannot be verified: name it in a recovery entry, alert, then sign."""
        unvouched = None
        if tail.after:
            digest = hashlib.sha256("".join(str(e.get("hash")) for e in tail.after).encode()).hexdigest()
            unvouched = {
                "from": int(tail.after[0]["seq"]), "to": int(tail.after[-1]["seq"]),
                "count": len(tail.after), "sha256": digest,
            }  # fmt: skip
        now = self._wall()
        note: dict[str, Any] = {
            "kind": "unvouched_tail" if unvouched else "torn_tail",
            "ts": now,
            "writer": self.writer_id,
            "last_signed_seq": tail.signed_seq,
            "unvouched": unvouched,
            "torn": torn,
        }
        entries = [seal(head, {"recovery": note})]
        alert = AuditRecord(
            ts=now, request_id=f"audit-recovery-{entries[0]['seq']}", kind="alert", result="error",
            alerts=(AUDIT_RECOVERY_ALERT,), subject_id=self.writer_id,
            extra={"alert": AUDIT_RECOVERY_ALERT, "source": "sidecar", "recovery_seq": entries[0]["seq"],
                   "unvouched": unvouched, "torn_bytes": (torn or {}).get("truncated_bytes")},
        )  # fmt: skip
        entries.append(seal(head, self._body(alert, head)))
        entries.append(seal(head, await self._checkpoint_body(head)))
        await asyncio.wait_for(self.sink.append(entries), self._commit.write_timeout_seconds)
        await self._witness_write(entries[-1])
        self.recoveries += 1
        metrics.AUDIT_ALERTS.labels(alert=AUDIT_RECOVERY_ALERT).inc()
        if unvouched:
            log.error(
                "audit trail: %d entries (seq %d-%d) after the last signed checkpoint could not be vouched "
                "for; recorded as unvouched at seq %d (alert %s)",
                unvouched["count"], unvouched["from"], unvouched["to"], entries[0]["seq"], AUDIT_RECOVERY_ALERT,
            )  # fmt: skip
        else:
            log.warning(
                "audit log resumed after cutting a torn, unacknowledged tail (seq %d)", entries[0]["seq"]
            )

    async def record(self, rec: AuditRecord) -> str:
        """Store ``rec`` (its alerts inside it) durably and signed; return ``"<seq>:<hash prefix>"``."""
        if not self._started or self._closed:
            metrics.AUDIT_FAILURES.inc()
            raise AuditUnavailable("audit trail is not running")
        started = time.perf_counter()
        records = [self._alerts.annotate(rec)]
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(records, future))
        try:
            ids = await future
        except AuditUnavailable:
            metrics.AUDIT_FAILURES.inc()
            raise
        metrics.AUDIT_WRITE_LATENCY.observe(time.perf_counter() - started)
        return ids[0]

    async def checkpoint(self) -> None:
        """Make sure the head is a signed checkpoint (every batch already ends with one)."""
        if not self._started or self._closed:
            raise AuditUnavailable("audit trail is not running")
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending([], future, force_checkpoint=True))
        await future

    async def check(self) -> bool:
        """Writable right now? Tries to recover when unhealthy. Never raises."""
        if not self._started or self._closed:
            return False
        async with self._io:
            if self._healthy:
                ok = await self.sink.check()
                if not ok:
                    self._healthy = False
                return ok
            try:
                await self._reopen()
            except (AuditUnavailable, ConfigError):
                return False
            return await self.sink.check()

    async def query(
        self, f: AuditQuery, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of matching records (oldest first) and the cursor for the next page."""
        limit = check_limit(limit)
        after = parse_cursor(cursor)

        def run() -> tuple[list[dict[str, Any]], str | None]:
            return page(decode_entries(self.sink.reader(after), self._cipher), f, limit=limit)

        try:
            return await asyncio.to_thread(run)
        except Exception as exc:
            raise AuditUnavailable(f"audit sink '{self.sink.name}' could not be read") from exc

    async def disclosures(
        self,
        patient: str,
        *,
        since: str | None = None,
        until: str | None = None,
        accept_recoveries: tuple[int, ...] = (),
    ) -> DisclosureReport:
        """The patient's accounting of disclosures, from this trail once it verifies (see disclosures.py).

        Verifies the stored chain up to the head as it stands now, against this writer's pinned keys
        and its witness. Raises ``AuditUnavailable`` when the trail does not verify or cannot be read.
        """
        async with self._io:
            upto = self._head.seq
        witness = self._witness

        def run() -> DisclosureReport:
            seen = witness.read() if witness is not None else None  # before the trail: never ahead of it
            if isinstance(self.sink, FileSink):
                items: Any = file_items(self.sink.path)
            else:
                items = ((n, e, False) for n, e in enumerate(self.sink.reader(), start=1))
            bounded = (i for i in items if i[1] is not None and int(i[1].get("seq", 0)) <= upto)
            return build_disclosures(
                bounded, patient=patient, since=since, until=until, public_key=self._keyring,
                witness=seen, require_witness=witness is not None and upto > 0,
                accept_recoveries=accept_recoveries, encryption_key=self._cipher,
            )  # fmt: skip

        try:
            return await asyncio.to_thread(run)
        except TrailNotVerified as exc:
            log.error("disclosures refused: %s", exc)
            raise AuditUnavailable("the audit trail does not verify: no disclosures report from it") from exc
        except Exception as exc:
            raise AuditUnavailable(f"audit sink '{self.sink.name}' could not be read") from exc

    async def close(self) -> None:
        """Seal and stop: drain the queue, end on a signed checkpoint, close sink, witness and writer id."""
        if self._closed or not self._started:
            self._closed = True
            self._release()
            return
        if not self._head_signed and self._healthy:
            with contextlib.suppress(AuditUnavailable):
                await self.checkpoint()
        self._closed = True
        self._queue.put_nowait(_STOP)
        if self._flusher is not None:
            await self._flusher
        async with self._io:
            await self.sink.close()
        self._release()

    aclose = close

    def _release(self) -> None:
        if self._witness is not None:
            with contextlib.suppress(Exception):
                self._witness.close()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    # -- the flusher -----------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch, stopping = await self._collect(first)
            async with self._io:
                await self._flush(batch)
        # Fail anything still queued after stop.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP and item.future is not None and not item.future.done():
                item.future.set_exception(AuditUnavailable("audit trail is closed"))

    async def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The batch to commit next, and whether a stop was seen.

        Group commit without a fixed wait: take everything already queued (writers that
        arrived during the previous fsync). A lone writer is committed at once, so one call
        at a time costs one fsync, not one fsync plus ``max_delay_seconds``. Only when other writers
        are queued behind ``first`` (concurrency is real) does the flusher yield to the event
        loop, up to ``max_delay_seconds``, so writers that are already runnable join the same fsync.
        """
        batch: list[_Pending] = [first]
        size = len(first.records)
        commit = self._commit
        deadline = self._clock() + commit.max_delay_seconds
        while size < commit.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if len(batch) == 1 or self._clock() >= deadline:
                    break
                await asyncio.sleep(0)  # let writers that are ready right now enqueue
                if self._queue.empty():
                    break
                continue
            if item is _STOP:
                return batch, True
            batch.append(item)
            size += len(item.records)
        return batch, False

    async def _flush(self, batch: list[_Pending]) -> None:
        """The one seam where sink failures become AuditUnavailable."""
        try:
            if not self._healthy:
                await self._reopen()
            head = ChainHead(self._head.seq, self._head.hash)
            entries: list[dict[str, Any]] = []
            ids: list[list[str]] = []
            for pending in batch:
                mine = []
                for rec in pending.records:
                    entry = seal(head, self._body(rec, head))
                    entries.append(entry)
                    mine.append(f"{entry['seq']}:{entry['hash'][:16]}")
                ids.append(mine)
            if head.seq > 0 and (entries or not self._head_signed):
                entries.append(seal(head, await self._checkpoint_body(head)))
            if entries:
                await asyncio.wait_for(self.sink.append(entries), self._commit.write_timeout_seconds)
        except Exception as exc:
            self._healthy = False
            log.error("audit write failed on sink %s: %s", self.sink.name, type(exc).__name__)
            for pending in batch:
                if pending.future is not None and not pending.future.done():
                    err = AuditUnavailable(
                        f"audit record could not be made durable on sink '{self.sink.name}'"
                    )
                    err.__cause__ = exc
                    pending.future.set_exception(err)
            return
        self._head = head
        self._acked_seq = head.seq
        if entries:
            self._head_signed = True
            await self._witness_write(entries[-1])
        for pending, mine in zip(batch, ids, strict=True):
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(mine)

    async def _witness_write(self, checkpoint_entry: dict[str, Any]) -> None:
        witness = self._witness
        if witness is None:
            return
        try:
            if isinstance(witness, FileWitness):
                witness.write(checkpoint_entry)  # one small write and a rename: cheaper than a thread hop
            else:
                await asyncio.wait_for(
                    asyncio.to_thread(witness.write, checkpoint_entry), self._commit.write_timeout_seconds
                )
        except Exception as exc:
            self.witness_failures += 1
            log.warning("audit witness %s not updated: %s", witness.name, type(exc).__name__)

    def _body(self, rec: AuditRecord, head: ChainHead) -> dict[str, Any]:
        data = rec.to_dict()
        if self._cipher is None:
            return {"record": data}
        return self._cipher.encrypt(data, seq=head.seq + 1, prev=head.hash)

    async def _checkpoint_body(self, head: ChainHead) -> dict[str, Any]:
        kid = self._signer.key_id
        cp = {"seq": head.seq, "hash": head.hash, "ts": self._wall(), "writer": self.writer_id, "kid": kid}
        sig = (
            await asyncio.to_thread(self._signer.sign, cp) if self._signer.blocking else self._signer.sign(cp)
        )
        return {"checkpoint": cp, "sig": sig, "pub": kid}


def claim_writer_id(settings: AuditSettings) -> tuple[str, Callable[[], None]]:
    """This process's writer id and the function that releases it.

    A configured ``writer_id`` is used as is. Otherwise: ``<hostname>-<suffix>``, where the suffix is
    read from (or, the first time, written to) the first ``writer-id.<n>`` file in the state directory
    that no other running process holds locked; this process holds its lock until ``release``.
    """
    if settings.writer_id:
        return settings.writer_id, lambda: None
    folder = settings.state_dir
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(MAX_WRITER_SLOTS):
        fd = os.open(folder / f"writer-id.{n}", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                     WRITER_ID_FILE_MODE)  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        os.fchmod(fd, WRITER_ID_FILE_MODE)
        suffix = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if not suffix.isalnum():
            suffix = secrets.token_hex(4)
            os.ftruncate(fd, 0)
            os.pwrite(fd, suffix.encode() + b"\n", 0)
            os.fsync(fd)

        def release(fd: int = fd) -> None:
            with contextlib.suppress(OSError):
                os.close(fd)

        return f"{host_name()}-{suffix}", release
    raise ConfigError("audit.writer_state_dir", f"all {MAX_WRITER_SLOTS} writer ids there are in use")


def _load_signer(settings: AuditSettings) -> CheckpointSigner:
    try:
        if settings.signer_factory:
            return CheckpointSigner(load_signer_factory(settings.signer_factory))
        if settings.signing_key_env:
            pem = os.environ.get(settings.signing_key_env, "")
            if not pem:
                raise ConfigError(
                    "audit.signing_key_env", "the named environment variable is empty or missing"
                )
            return CheckpointSigner(load_signing_key_pem(pem.encode()))
        path = settings.signing_key_path
        key, created = load_or_create_signing_key(path)
        if created:
            log.warning(
                "generated a new audit signing key at %s (mode 0600); pin its public key %s.pub "
                "in audit.public_key_files and keep a copy off this host", path, path,
            )  # fmt: skip
        return CheckpointSigner(key)
    except ConfigError:
        raise
    except (ImportError, AttributeError, TypeError) as exc:
        if settings.signer_factory:
            raise ConfigError("audit.signer_factory", "could not build a Signer from it") from exc
        raise ConfigError("audit.signing_key_file", "not a readable Ed25519 private key (PEM)") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError("audit.signing_key_file", "not a readable Ed25519 private key (PEM)") from exc


def load_keyring(files: tuple[str, ...] | list[str], extra: list[Any] | None = None) -> KeyRing | None:
    """The pinned key history from public key files (ConfigError naming ``audit.public_key_files``)."""
    keys = list(extra or [])
    try:
        keys += [load_public_key(Path(f).read_bytes()) for f in files]
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "audit.public_key_files", "each must be a readable Ed25519 public key (PEM)"
        ) from exc
    return KeyRing(keys) if keys else None


def build_witness(settings: AuditSettings, writer_id: str) -> Witness | None:
    """The witness ``settings`` describe, or None."""
    if settings.witness == "none" or settings.sink == "stdout":
        return None
    if settings.witness == "file":
        path = settings.witness_file(writer_id)
        return None if path is None else FileWitness(path)
    if settings.witness == "redis":
        url = os.environ.get(str(settings.witness_url_env), "")
        if not url:
            raise ConfigError("audit.witness_url_env", "the named environment variable is empty or missing")
        return RedisWitness(url, f"{settings.witness_key_prefix}{writer_id}")
    dsn = os.environ.get(str(settings.witness_dsn_env), "")
    if not dsn:
        raise ConfigError("audit.witness_dsn_env", "the named environment variable is empty or missing")
    return PostgresWitness(dsn, writer_id, schema=settings.witness_pg_schema, table=settings.witness_pg_table)


def load_cipher(
    *, key_env: str | None, key_file: str | None, key_id: str | None, section: str = "audit"
) -> RecordCipher | None:
    """The record cipher from an env var or a file holding a base64 32-byte key, or None."""
    if not key_env and not key_file:
        return None
    key_name = "encryption_key_env" if key_env else "encryption_key_file"
    try:
        if key_env:
            text = os.environ.get(key_env, "")
            if not text:
                raise ConfigError(f"{section}.encryption_key_env", "the named environment variable is empty")
        else:
            text = Path(str(key_file)).read_text()
        return RecordCipher(decode_aes_key(text), key_id)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{section}.{key_name}", "must hold a base64 32-byte AES-256 key") from exc


def build_sink(settings: AuditSettings, writer_id: str | None = None) -> AuditSink:
    """The sink named by ``settings.sink``."""
    if settings.sink == "file":
        return FileSink(Path(str(settings.path)))
    if settings.sink == "sqlite":
        return SQLiteSink(Path(str(settings.path)))
    if settings.sink == "stdout":
        return StdoutSink()
    from mcp_fhir.audit.sinks.postgres import PostgresSink

    return PostgresSink(
        settings.dsn(),
        writer_id or settings.writer_id or claim_writer_id(settings)[0],
        schema=settings.pg_schema,
        table=settings.pg_table,
        role=settings.pg_role,
        create_schema=settings.pg_create_schema,
    )


def build_trail(
    settings: AuditSettings,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], str] = utc_now_ms,
) -> AuditTrail:
    """The trail described by ``settings`` (not started: call ``await trail.start()``)."""
    signer = _load_signer(settings)
    writer_id, release = claim_writer_id(settings)
    try:
        return AuditTrail(
            build_sink(settings, writer_id),
            signer=signer,
            writer_id=writer_id,
            cipher=load_cipher(
                key_env=settings.encryption_key_env,
                key_file=settings.encryption_key_file,
                key_id=settings.encryption_key_id,
            ),
            alerts=AlertEmitter(
                DenialBurstDetector(
                    settings.denial_burst_threshold, settings.denial_burst_window_seconds, clock=clock
                )
            ),
            keyring=load_keyring(settings.public_key_files, [signer.public_key()]),
            witness=build_witness(settings, writer_id),
            group_commit=settings.group_commit,
            clock=clock,
            wall_clock=wall_clock,
            on_close=release,
        )
    except BaseException:
        release()
        raise
