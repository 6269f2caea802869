"""A bounded, append-only on-disk spool of Kafka messages that could not be delivered (yet).

The publisher (:mod:`producers.publisher`) spills here when Kafka is unreachable and drains in order
when it is back; a restarted process opens the same directory and drains what the previous one left.
This module is pure file handling: no Kafka, no threads.

    spool = Spool(SpoolConfig(directory=Path(".sop/spool/actor-00")))
    seq = spool.append("sop.steps", value, key=b"ep-1", headers=None, timestamp_ms=1_700_000_000_000)
    for record in spool.read(max_records=500):        # oldest first, from the read cursor
        ...produce it...; spool.ack(record.seq)        # delivered: may be acked out of order
    spool.rewind()                                     # a produce failed: read again from the oldest unacked
    spool.commit()                                     # persist the acked prefix, delete fully acked segments
    spool.close()

Layout of the directory: ``<first seq, 20 digits>.seg`` segment files, appended to with one ``write``
per record (a process killed right after ``append`` returned loses nothing; power loss is covered by
the ``fsync`` policy), ``cursor`` (the highest seq of the acknowledged prefix, replaced atomically),
``lock`` (``flock``: one process per spool). A record is ``magic, payload length, CRC-32`` followed by
the payload (seq, Kafka timestamp, topic, key, value, headers). On open every segment is verified: a
torn last record (the process died inside ``write``) is cut off and counted in ``truncated_bytes``; a
bad record anywhere else is moved, with the rest of its segment, to ``<segment>.corrupt`` and counted
in ``corrupt_bytes`` (an operator sees it; it is never silently skipped).

Delivery is at-least-once: acks not yet committed when the process dies are delivered again by the
next one (the processor de-duplicates by step index).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("sop.spool")

FSYNC_POLICIES = ("always", "interval", "never")
WHEN_FULL_POLICIES = ("pause", "fail")

_MAGIC = b"SPL1"
_HEAD = struct.Struct("<4sII")  # magic, payload length, crc32(payload)
_FIXED = struct.Struct("<QqHiIH")  # seq, timestamp ms, topic len, key len (-1: None), value len, header count
_HEADER_ENTRY = struct.Struct("<Hi")  # name len, value len (-1: None)
_SUFFIX = ".seg"

Headers = Sequence[tuple[str, bytes | None]]


class SpoolError(RuntimeError):
    """The spool cannot be used (another process holds it, the directory is not writable, …)."""


class SpoolFullError(SpoolError):
    """The spool reached its bound and the policy is ``fail``."""


@dataclass(frozen=True, kw_only=True)
class SpoolConfig:
    directory: Path
    max_bytes: int = 1 << 30  # bound on the segment files on disk
    segment_bytes: int = 32 << 20  # a segment is deleted once all its records are acknowledged
    fsync: str = "interval"  # always: after every append; interval: by maybe_sync(); never: the OS decides
    fsync_interval_s: float = 1.0
    when_full: str = "pause"  # pause: the producer waits for room; fail: SpoolFullError

    def __post_init__(self) -> None:
        problems = []
        if self.fsync not in FSYNC_POLICIES:
            problems.append(f"fsync must be one of {FSYNC_POLICIES}, got {self.fsync!r}")
        if self.when_full not in WHEN_FULL_POLICIES:
            problems.append(f"when_full must be one of {WHEN_FULL_POLICIES}, got {self.when_full!r}")
        if self.segment_bytes < 4096:
            problems.append(f"segment_bytes must be >= 4096, got {self.segment_bytes}")
        if self.max_bytes < self.segment_bytes:
            problems.append(f"max_bytes ({self.max_bytes}) must be >= segment_bytes ({self.segment_bytes})")
        if not self.fsync_interval_s > 0:
            problems.append(f"fsync_interval_s must be > 0, got {self.fsync_interval_s}")
        if problems:
            raise ValueError("SpoolConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class SpooledRecord:
    seq: int
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes | None]] | None
    timestamp_ms: int
    size: int  # bytes on disk, framing included


def encode_record(seq: int, topic: str, value: bytes, *, key: bytes | None, headers: Headers | None,
                  timestamp_ms: int) -> bytes:
    """One framed record as it lies in a segment file."""
    t = topic.encode()
    parts = [_FIXED.pack(seq, timestamp_ms, len(t), -1 if key is None else len(key), len(value),
                         len(headers or ())), t, key or b"", value]
    for name, hv in headers or ():
        n = name.encode()
        parts += [_HEADER_ENTRY.pack(len(n), -1 if hv is None else len(hv)), n, hv or b""]
    payload = b"".join(parts)
    return _HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes, size: int) -> SpooledRecord:
    seq, ts, tlen, klen, vlen, nh = _FIXED.unpack_from(payload, 0)
    pos = _FIXED.size
    topic = payload[pos:pos + tlen].decode()
    pos += tlen
    key = None
    if klen >= 0:
        key, pos = payload[pos:pos + klen], pos + klen
    value, pos = payload[pos:pos + vlen], pos + vlen
    headers: list[tuple[str, bytes | None]] | None = [] if nh else None
    for _ in range(nh):
        nlen, hlen = _HEADER_ENTRY.unpack_from(payload, pos)
        pos += _HEADER_ENTRY.size
        name, pos = payload[pos:pos + nlen].decode(), pos + nlen
        hv = None
        if hlen >= 0:
            hv, pos = payload[pos:pos + hlen], pos + hlen
        headers.append((name, hv))  # type: ignore[union-attr]
    return SpooledRecord(seq, topic, key, value, headers, ts, size)


def scan(data: bytes) -> tuple[list[SpooledRecord], int]:
    """The valid records at the start of ``data`` and the offset where they end (== len(data) if all are valid)."""
    records, pos = [], 0
    while pos + _HEAD.size <= len(data):
        magic, length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if magic != _MAGIC or end > len(data):
            break
        payload = data[pos + _HEAD.size:end]
        if zlib.crc32(payload) != crc:
            break
        try:
            records.append(decode_payload(payload, end - pos))
        except (struct.error, UnicodeDecodeError):
            break
        pos = end
    return records, pos


@dataclass
class _Segment:
    first_seq: int
    path: Path
    size: int
    last_seq: int  # first_seq - 1 while empty


class Spool:
    """See the module docstring. Not thread-safe: the publisher serialises calls under its lock."""

    def __init__(self, config: SpoolConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self.directory = config.directory
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot use the spool directory {self.directory}: {exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolError(f"the spool {self.directory} is in use by another process (give each actor its own "
                             "--actor-id, or its own SOP_ACTOR_SPOOL_DIR)") from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        self.truncated_bytes = 0
        self.corrupt_bytes = 0
        self._committed = self._read_cursor()  # every seq <= this is acknowledged (and persisted)
        self._persisted = self._committed
        self._acked: set[int] = set()  # acknowledged seqs beyond the committed prefix
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # the active (last) segment, opened for append
        self._recover()
        last = self._segments[-1].last_seq if self._segments else self._committed
        self._next_seq = max(last, self._committed) + 1
        self._read_seq = self._committed + 1  # the next seq read() hands out
        self._dirty = False
        self._last_sync = clock()
        self._read_pos: tuple[int, int, int] | None = None  # (segment first_seq, file offset, seq there)
        self.recovered_records = self.pending

    # -- state -----------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Records not yet acknowledged."""
        return self._next_seq - 1 - self._committed - len(self._acked)

    @property
    def unread(self) -> int:
        """Records that read() has not handed out since the last rewind."""
        return self._next_seq - self._read_seq

    @property
    def bytes(self) -> int:
        """Bytes of the segment files on disk (what ``max_bytes`` bounds)."""
        return sum(s.size for s in self._segments)

    @property
    def full(self) -> bool:
        return self.bytes >= self.config.max_bytes

    def has_room(self, size: int, headroom: int = 0) -> bool:
        return self.bytes + size <= self.config.max_bytes + headroom

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # -- writing ---------------------------------------------------------------------------------
    def append(self, topic: str, value: bytes, *, key: bytes | str | None, headers: Headers | None,
               timestamp_ms: int) -> int:
        """Append one message; returns its seq. Durable against a process crash once this returns
        (and against power loss once synced, see ``fsync``). The caller checks room first."""
        if isinstance(key, str):
            key = key.encode()
        seq = self._next_seq
        data = encode_record(seq, topic, value, key=key, headers=headers, timestamp_ms=timestamp_ms)
        seg = self._segments[-1] if self._segments else None
        if seg is None or self._fd is None or (seg.size and seg.size + len(data) > self.config.segment_bytes):
            seg = self._roll(seq)
        assert self._fd is not None
        written = os.write(self._fd, data)
        while written < len(data):  # a short write on a regular file is rare but legal
            written += os.write(self._fd, data[written:])
        seg.size += len(data)
        seg.last_seq = seq
        self._next_seq = seq + 1
        self._dirty = True
        if self.config.fsync == "always":
            self.sync()
        return seq

    def sync(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
        self._dirty = False
        self._last_sync = self._clock()

    def maybe_sync(self) -> None:
        """Call often: syncs under the ``interval`` policy when the interval has passed."""
        if self.config.fsync == "interval" and self._dirty and self._clock() - self._last_sync >= self.config.fsync_interval_s:
            self.sync()

    def _roll(self, first_seq: int) -> _Segment:
        if self._fd is not None:
            if self.config.fsync != "never":
                os.fsync(self._fd)
            os.close(self._fd)
        path = self.directory / f"{first_seq:020d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        seg = _Segment(first_seq, path, 0, first_seq - 1)
        self._segments.append(seg)
        if self.config.fsync != "never":
            self._sync_dir()
        return seg

    # -- reading ---------------------------------------------------------------------------------
    def read(self, max_records: int = 500, max_bytes: int = 4 << 20) -> list[SpooledRecord]:
        """Up to ``max_records`` (and about ``max_bytes``) records from the read cursor on, oldest first,
        skipping those already acknowledged. Advances the read cursor."""
        out: list[SpooledRecord] = []
        taken = 0
        while len(out) < max_records and taken < max_bytes and self._read_seq < self._next_seq:
            batch = self._read_some(max_records - len(out), max_bytes - taken)
            if not batch:
                break
            for rec in batch:
                self._read_seq = rec.seq + 1
                if rec.seq in self._acked:
                    continue
                out.append(rec)
                taken += rec.size
        return out

    def _read_some(self, max_records: int, max_bytes: int) -> list[SpooledRecord]:
        seg = next((s for s in self._segments if s.last_seq >= self._read_seq), None)
        if seg is None:
            self._read_seq = self._next_seq
            return []
        self._read_seq = max(self._read_seq, seg.first_seq)
        pos = self._read_pos
        offset = pos[1] if pos is not None and pos[0] == seg.first_seq and pos[2] == self._read_seq else 0
        out: list[SpooledRecord] = []
        taken = 0
        with open(seg.path, "rb") as f:
            f.seek(offset)
            while len(out) < max_records and taken < max_bytes:
                head = f.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    break
                magic, length, crc = _HEAD.unpack(head)
                payload = f.read(length)
                if magic != _MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                    # verified on open and written only by us since: the disk changed under us
                    raise SpoolError(f"spool segment {seg.path} is corrupt at offset {offset}")
                rec = decode_payload(payload, _HEAD.size + length)
                offset += rec.size
                if rec.seq >= self._read_seq:
                    out.append(rec)
                    taken += rec.size
        next_seq = out[-1].seq + 1 if out else self._read_seq
        self._read_pos = (seg.first_seq, offset, next_seq)
        return out

    def ack(self, seq: int) -> None:
        """``seq`` was delivered. Acks may come out of order; the prefix moves when it is contiguous."""
        if seq <= self._committed:
            return
        self._acked.add(seq)
        while self._committed + 1 in self._acked:
            self._committed += 1
            self._acked.discard(self._committed)

    def rewind(self) -> None:
        """Read again from the oldest unacknowledged record (after a failed produce)."""
        self._read_seq = self._committed + 1
        self._read_pos = None

    def commit(self) -> None:
        """Persist the acknowledged prefix and delete the segments it covers entirely."""
        if self._committed == self._persisted:
            return
        self._write_cursor(self._committed)
        self._persisted = self._committed
        keep = []
        for seg in self._segments:
            if seg.last_seq <= self._committed and seg is not self._segments[-1]:
                seg.path.unlink(missing_ok=True)
            else:
                keep.append(seg)
        self._segments = keep
        if self.pending == 0 and self._segments and self._segments[-1].last_seq <= self._committed:
            # everything delivered: drop the active segment too, the next append starts a new one
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._segments[-1].path.unlink(missing_ok=True)
            self._segments = []
        if self._read_pos is not None and not any(s.first_seq == self._read_pos[0] for s in self._segments):
            self._read_pos = None

    def close(self, *, clean: bool = True) -> None:
        """Commit and release. ``clean=False`` only closes the files: what a killed process leaves behind."""
        if clean:
            self.commit()
            self.sync()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    # -- recovery --------------------------------------------------------------------------------
    def _read_cursor(self) -> int:
        path = self.directory / "cursor"
        try:
            return int(path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            raise SpoolError(f"{path} does not hold a sequence number: move it away to drain the spool "
                             "from its oldest record (duplicates are harmless downstream)") from None

    def _write_cursor(self, seq: int) -> None:
        path = self.directory / "cursor"
        tmp = self.directory / "cursor.tmp"
        with open(tmp, "w") as f:
            f.write(f"{seq}\n")
            if self.config.fsync != "never":
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def _recover(self) -> None:
        paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(_SUFFIX))
        for i, path in enumerate(paths):
            data = path.read_bytes()
            records, good = scan(data)
            if good < len(data):
                if i == len(paths) - 1:
                    LOG.warning("spool %s: cut off a torn last record (%d bytes) left by a crash", path, len(data) - good)
                    self.truncated_bytes += len(data) - good
                else:
                    bad = path.with_name(path.name + ".corrupt")
                    bad.write_bytes(data[good:])
                    LOG.error("spool %s: %d bytes after offset %d are corrupt; moved to %s", path, len(data) - good,
                              good, bad)
                    self.corrupt_bytes += len(data) - good
                with open(path, "r+b") as f:
                    f.truncate(good)
            first = int(path.name[: -len(_SUFFIX)])
            last = records[-1].seq if records else first - 1
            if last <= self._committed and i < len(paths) - 1:
                path.unlink()  # fully acknowledged before the crash
                continue
            self._segments.append(_Segment(first, path, good, last))
        for before, after in zip(self._segments, self._segments[1:], strict=False):
            # records lost to corruption (counted in corrupt_bytes) must not hold the spool open forever
            self._acked.update(range(max(before.last_seq, self._committed) + 1, after.first_seq))
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)  # appends continue there

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
