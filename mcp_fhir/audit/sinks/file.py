"""The JSON-lines file sink: O_APPEND, one writer (flock), group commit with one fdatasync per batch.

Crash behaviour, precisely:
* A batch is written with ``os.write`` calls on an ``O_APPEND`` descriptor, then
  ``os.fdatasync`` (``os.fsync`` where the OS lacks it); only after that does any caller's
  ``record`` return. So every acknowledged entry is a complete, newline-terminated line on disk.
* A crash between write and fsync can leave (a) complete but unacknowledged lines — they are
  valid chain entries and stay; or (b) a *partial last line* with no trailing newline. On the
  next open the sink finds (b), truncates the file back to the last newline (fsync), and the
  trail appends a ``recovery`` entry recording how many bytes were cut and their sha256.
  Nothing acknowledged is ever cut: an acknowledged line always ends in a newline before it was acked.
* A last *complete* line that is not valid JSON is not a torn write; the sink refuses to open
  (``verify`` will say where), rather than guess.
* Before every batch the sink checks that the path still names the inode it holds open, so a
  deleted, moved or replaced log fails loudly instead of writing into an orphaned file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mcp_fhir.audit.chain import ChainHead, canonical_json
from mcp_fhir.audit.sinks.base import AuditSink, Opened, SinkError

__all__ = ["FileSink", "iter_file_lines", "iter_file_lines_reversed"]

FILE_MODE = 0o600
TAIL_CHUNK = 64 * 1024
MAX_LINE_BYTES = 16 * 1024 * 1024


_datasync = getattr(os, "fdatasync", os.fsync)


def iter_file_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """Yield ``(line_no, raw_bytes_without_newline, terminated)`` for every line of the file."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            terminated = raw.endswith(b"\n")
            yield line_no, raw[:-1] if terminated else raw, terminated


def iter_file_lines_reversed(path: Path) -> Iterator[bytes]:
    """Complete (newline-terminated) lines from the end of the file backwards; a torn tail is skipped."""
    with path.open("rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        carry = b""
        first = True
        while end > 0:
            start = max(0, end - TAIL_CHUNK)
            fh.seek(start)
            data = fh.read(end - start) + carry
            end = start
            parts = data.split(b"\n")
            if first:
                parts.pop()  # text after the last newline: empty, or a torn line
                first = False
            carry = parts.pop(0) if end > 0 else b""
            for raw in reversed(parts):
                if raw:
                    yield raw
        if carry:
            yield carry


class FileSink(AuditSink):
    """Append-only JSON lines; one fsync per batch."""

    name = "file"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._lock = threading.Lock()  # serialises writes, fsyncs and tail reads across threads
        self._ever_opened = False

    def __repr__(self) -> str:
        return f"FileSink(path={str(self.path)!r})"

    async def open(self) -> Opened:
        return await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> Opened:
        with self._lock:
            self._close_fd()
            flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
            if not self._ever_opened:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                flags |= (
                    os.O_CREAT
                )  # only the first open may create; a log that vanished later stays an error
            fd = os.open(self.path, flags, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                raise SinkError("audit log is locked by another writer") from exc
            try:
                head, recovery = self._read_tail(fd)
            except BaseException:
                os.close(fd)
                raise
            st = os.fstat(fd)
            self._fd, self._ino = fd, (st.st_dev, st.st_ino)
            self._ever_opened = True
            return Opened(head=head, recovery=recovery)

    def _read_tail(self, fd: int) -> tuple[ChainHead, dict[str, Any] | None]:
        size = os.fstat(fd).st_size
        if size == 0:
            return ChainHead(), None
        with open(self.path, "rb") as fh:  # a second, read-only description
            chunk = TAIL_CHUNK
            while True:
                start = max(0, size - chunk)
                fh.seek(start)
                data = fh.read(size - start)
                if start == 0 or data.count(b"\n") >= 2:
                    break
                if chunk > MAX_LINE_BYTES:
                    raise SinkError("audit log tail has no line break in the last 16 MiB")
                chunk *= 4
        recovery: dict[str, Any] | None = None
        if not data.endswith(b"\n"):
            torn_at = data.rfind(b"\n")
            torn = data[torn_at + 1 :]
            keep = start + torn_at + 1
            os.ftruncate(fd, keep)
            os.fsync(fd)
            recovery = {
                "kind": "torn_tail",
                "truncated_bytes": len(torn),
                "truncated_sha256": hashlib.sha256(torn).hexdigest(),
                "offset": keep,
            }
            data = data[: torn_at + 1]
            if not data:
                return ChainHead(), recovery
        last_line = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            entry = json.loads(last_line)
            head = ChainHead(seq=int(entry["seq"]), hash=str(entry["hash"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SinkError(
                "the last complete line of the audit log is not a chain entry; run verify"
            ) from exc
        return head, recovery

    async def append(self, entries: list[dict[str, Any]]) -> None:
        payload = b"".join(canonical_json(e) + b"\n" for e in entries)
        await asyncio.to_thread(self._append_sync, payload)

    def _append_sync(self, payload: bytes) -> None:
        with self._lock:
            fd = self._fd
            if fd is None:
                raise SinkError("audit log is not open")
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != self._ino:
                raise SinkError("audit log path no longer names the open file")
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            self._fsync(fd)

    def _fsync(self, fd: int) -> None:
        # fdatasync flushes the data and the metadata needed to read it back (the file size
        # of an append), which is all an append-only log needs; mtime is not worth a journal commit.
        _datasync(fd)
        self.commit_count += 1

    async def check(self) -> bool:
        return await asyncio.to_thread(self._check_sync)

    def _check_sync(self) -> bool:
        with self._lock:
            if self._fd is None:
                return False
            try:
                st = os.stat(self.path)
                os.fstat(self._fd)
            except OSError:
                return False
            return (st.st_dev, st.st_ino) == self._ino and os.access(self.path, os.W_OK)

    async def close(self) -> None:
        await asyncio.to_thread(self._close_locked)

    def _close_locked(self) -> None:
        with self._lock:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def reverse_reader(self) -> Iterator[dict[str, Any]]:
        for raw in iter_file_lines_reversed(self.path):
            yield json.loads(raw)

    def reader(self, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        for _line_no, raw, terminated in iter_file_lines(self.path):
            if not terminated or not raw:
                continue
            entry = json.loads(raw)
            if int(entry.get("seq", 0)) > after_seq:
                yield entry
