"""AuditTrail: the one object the server holds. Chains, signs, encrypts and group-commits records.

    server ──record(rec)──▶ queue ──▶ flusher task (one) ──▶ sink.append(batch) ──▶ fsync / COMMIT
                                      │ chains each entry (seq, prev, hash)
                                      │ encrypts the record body (optional)
                                      └ adds a signed checkpoint every N records or T seconds

``record`` returns only after the batch holding its entry is durable. Any failure — the sink
raising, the write timeout passing, the log vanishing — becomes ``AuditUnavailable``
(code ``audit_unavailable``) at one seam (``_flush``), counts ``metrics.AUDIT_FAILURES`` and
marks the trail unhealthy. An unhealthy trail reopens the sink and re-reads the chain head
before its next write, and ``check()`` tries the same, so it turns True again after repair.
It refuses to resume on a stored chain that is *shorter* than what it has acknowledged.

Alerts: each access record's policy alerts (and the denial-burst alert) are written as
``kind="alert"`` records in the same batch — see ``alerts.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp_fhir import metrics
from mcp_fhir._exceptions import AuditUnavailable, ConfigError
from mcp_fhir.audit.alerts import AlertEmitter, DenialBurstDetector
from mcp_fhir.audit.chain import ChainHead, seal
from mcp_fhir.audit.crypto import (
    CheckpointSigner,
    RecordCipher,
    decode_aes_key,
    load_or_create_signing_key,
    load_signing_key_pem,
)
from mcp_fhir.audit.query import AuditQuery, check_limit, decode_entries, page, parse_cursor
from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.sinks.base import AuditSink
from mcp_fhir.audit.sinks.file import FileSink
from mcp_fhir.audit.sinks.sqlite import SQLiteSink
from mcp_fhir.audit.sinks.stdout import StdoutSink

__all__ = ["AuditQuery", "AuditSettings", "AuditTrail", "build_trail"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    records: list[AuditRecord]
    future: asyncio.Future[list[str]] | None
    force_checkpoint: bool = False


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
        checkpoint_every: int = 1000,
        checkpoint_interval_seconds: float = 60.0,
        max_batch: int = 256,
        max_delay_seconds: float = 0.002,
        write_timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], str] = utc_now_ms,
    ) -> None:
        self.sink = sink
        self.writer_id = writer_id
        self._signer = signer
        self._cipher = cipher
        self._alerts = alerts or AlertEmitter()
        self._ckpt_every = checkpoint_every
        self._ckpt_interval = checkpoint_interval_seconds
        self._max_batch = max_batch
        self._max_delay = max_delay_seconds
        self._write_timeout = write_timeout_seconds
        self._clock = clock
        self._wall = wall_clock
        self._head = ChainHead()
        self._acked_seq = 0
        self._since_ckpt = 0
        self._last_ckpt = clock()
        self._healthy = False
        self._started = False
        self._closed = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._io = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"AuditTrail(sink={self.sink!r}, writer_id={self.writer_id!r}, healthy={self._healthy})"

    @property
    def head(self) -> ChainHead:
        """The durable chain head (seq and hash of the last stored entry)."""
        return ChainHead(self._head.seq, self._head.hash)

    async def start(self) -> None:
        """Open the sink, resume the chain (repairing a torn tail), and start the flusher."""
        if self._started:
            return
        async with self._io:
            try:
                await self._reopen()
            except AuditUnavailable:
                metrics.AUDIT_FAILURES.inc()
                raise
        self._started = True
        self._flusher = asyncio.create_task(self._flush_loop(), name="audit-flusher")
        self._ticker = asyncio.create_task(self._tick_loop(), name="audit-checkpoint-ticker")

    async def _reopen(self) -> None:
        """(Re)open the sink and adopt its head. Caller holds ``_io``. Raises AuditUnavailable."""
        try:
            opened = await asyncio.wait_for(self.sink.open(), self._write_timeout)
            if opened.head.seq < self._acked_seq:
                raise AuditUnavailable("stored audit chain is shorter than what was acknowledged")
            head = ChainHead(opened.head.seq, opened.head.hash)
            if opened.recovery is not None:
                note = {**opened.recovery, "ts": self._wall(), "writer": self.writer_id}
                entry = seal(head, {"recovery": note})
                await asyncio.wait_for(self.sink.append([entry]), self._write_timeout)
                log.warning(
                    "audit log resumed after cutting a torn, unacknowledged tail (seq %d)", entry["seq"]
                )
        except AuditUnavailable:
            self._healthy = False
            raise
        except Exception as exc:
            self._healthy = False
            raise AuditUnavailable(f"audit sink '{self.sink.name}' could not be opened") from exc
        self._head = head
        self._acked_seq = head.seq
        self._healthy = True

    async def record(self, rec: AuditRecord) -> str:
        """Store ``rec`` (and its alert records) durably; return ``"<seq>:<hash prefix>"``."""
        if not self._started or self._closed:
            metrics.AUDIT_FAILURES.inc()
            raise AuditUnavailable("audit trail is not running")
        started = time.perf_counter()
        records = [rec, *self._alerts.derive(rec)]
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
        """Write a signed checkpoint now (if anything was written since the last one)."""
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
            except AuditUnavailable:
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

    async def close(self) -> None:
        """Write a final checkpoint, drain the queue, stop the flusher and close the sink."""
        if self._closed or not self._started:
            self._closed = True
            return
        if self._since_ckpt and self._healthy:
            with contextlib.suppress(AuditUnavailable):
                await self.checkpoint()
        self._closed = True
        self._queue.put_nowait(_STOP)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._flusher is not None:
            await self._flusher
        async with self._io:
            await self.sink.close()

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
        at a time costs one fsync, not one fsync plus ``max_delay``. Only when other writers
        are queued behind ``first`` (concurrency is real) does the flusher yield to the event
        loop, up to ``max_delay``, so writers that are already runnable join the same fsync.
        """
        batch: list[_Pending] = [first]
        size = len(first.records)
        deadline = self._clock() + self._max_delay
        while size < self._max_batch:
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
            n_records = len(entries)
            forced = any(p.force_checkpoint for p in batch)
            since = self._since_ckpt + n_records
            now = self._clock()
            due = since >= self._ckpt_every or (since and now - self._last_ckpt >= self._ckpt_interval)
            if head.seq > 0 and since and (due or forced):
                entries.append(seal(head, self._checkpoint_body(head)))
            if entries:
                await asyncio.wait_for(self.sink.append(entries), self._write_timeout)
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
        if entries and "checkpoint" in entries[-1]:
            self._since_ckpt = 0
            self._last_ckpt = now
        else:
            self._since_ckpt = since
        for pending, mine in zip(batch, ids, strict=True):
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(mine)

    def _body(self, rec: AuditRecord, head: ChainHead) -> dict[str, Any]:
        data = rec.to_dict()
        if self._cipher is None:
            return {"record": data}
        return self._cipher.encrypt(data, seq=head.seq + 1, prev=head.hash)

    def _checkpoint_body(self, head: ChainHead) -> dict[str, Any]:
        cp = {"seq": head.seq, "hash": head.hash, "ts": self._wall(), "writer": self.writer_id}
        return {"checkpoint": cp, "sig": self._signer.sign(cp), "pub": self._signer.key_id}

    async def _tick_loop(self) -> None:
        """Time-based checkpoints while the log is quiet."""
        while not self._closed:
            await asyncio.sleep(self._ckpt_interval)
            if self._since_ckpt and self._clock() - self._last_ckpt >= self._ckpt_interval:
                self._queue.put_nowait(_Pending([], None, force_checkpoint=True))


def _load_signer(settings: AuditSettings) -> CheckpointSigner:
    try:
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
                "generated a new audit signing key at %s (mode 0600); its public key is %s.pub", path, path
            )
        return CheckpointSigner(key)
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("audit.signing_key_file", "not a readable Ed25519 private key (PEM)") from exc


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


def build_sink(settings: AuditSettings) -> AuditSink:
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
        settings.writer_id,
        schema=settings.pg_schema,
        table=settings.pg_table,
        role=settings.pg_role,
    )


def build_trail(
    settings: AuditSettings,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], str] = utc_now_ms,
) -> AuditTrail:
    """The trail described by ``settings`` (not started: call ``await trail.start()``)."""
    return AuditTrail(
        build_sink(settings),
        signer=_load_signer(settings),
        writer_id=settings.writer_id,
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
        checkpoint_every=settings.checkpoint_every,
        checkpoint_interval_seconds=settings.checkpoint_interval_seconds,
        max_batch=settings.group_commit_max_batch,
        max_delay_seconds=settings.group_commit_max_delay_ms / 1000.0,
        write_timeout_seconds=settings.write_timeout_seconds,
        clock=clock,
        wall_clock=wall_clock,
    )
