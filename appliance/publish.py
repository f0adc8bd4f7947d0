"""Kafka publishing that loses nothing across broker outages: a producer plus an on-disk spool.

Normal operation ("direct"): each message goes straight to the confluent-kafka producer
(idempotent, acks=all, zstd; ``common.kafka.producer_config``) and a copy is held in memory until
its delivery report arrives. No disk I/O on the happy path.

Trouble (a failed delivery, ``_ALL_BROKERS_DOWN``, a fatal producer error, or a full producer
queue = backpressure) switches to "spooling". Ordering is the whole difficulty, so the rule is
simple and strict:

1. every message not yet acknowledged is written to the spool first, in produce order, and the
   producer's own queue is purged, so librdkafka cannot deliver a later message after an
   earlier one failed;
2. while the spool is non-empty, new messages go to the spool too (appended after the backlog);
3. a prober asks the broker for the topic's metadata every ``kafka.probe_interval_s``; once it
   answers, the spool is replayed oldest first with a bounded window in flight; a replay
   failure rewinds to the first unacknowledged record and waits again;
4. only when the last spooled record is acknowledged does publishing go direct again (under the
   same lock as ``publish``, so no message can slip in between).

A message whose delivery report says "delivered" after it was already spooled is remembered and
skipped during replay, so the usual outage produces no duplicates. Delivery is at-least-once:
after a crash or a replay failure a few messages can arrive twice (consumers dedupe on
``(device_id, frame_index)``), but none is lost or reordered ahead of an older one.

Spool format: append-only segment files ``<id>.seg`` of records
``magic | seq | key length | value length | crc32 | key | value``, a ``cursor`` file with the
position of the first unacknowledged record, and a size cap: when full, the oldest segment is
dropped and counted ("spool full, dropping oldest"). fsync policy ``interval`` (default): every
record is written with one ``write()`` (no user-space buffer: a process crash loses nothing) and
fsynced at most every ``fsync_interval_s`` and on rotate/close, so a power cut loses at most that
last interval; ``always`` fsyncs every record (SD cards wear), ``never`` leaves it to the kernel.
At start-up the spool is scanned (a torn last record is cut off) and replayed first.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import CollectorRegistry, Counter, Gauge

from appliance.config import KafkaConfig, SpoolConfig
from common.kafka import producer_config

log = logging.getLogger(__name__)

#: Errors that mean the broker no longer accepts this producer id/epoch: only a fresh producer helps.
_STALE_PRODUCER = frozenset({
    KafkaError._FATAL, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.UNKNOWN_PRODUCER_ID, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.INVALID_PRODUCER_ID_MAPPING,
})

_MAGIC = b"RS"
_HEADER = struct.Struct("<2sQHII")  # magic, seq, key_len, value_len, crc32
_CURSOR = "cursor"
_SUFFIX = ".seg"


_PERMANENT = {
    getattr(KafkaError, name)
    for name in ("MSG_SIZE_TOO_LARGE", "INVALID_MSG", "INVALID_MSG_SIZE", "CORRUPT_MESSAGE", "INVALID_RECORD")
    if hasattr(KafkaError, name)
}


def _permanent(err: KafkaError) -> bool:
    """Errors that retrying the same bytes can never fix (they would block the spool forever)."""
    return err.code() in _PERMANENT


class SpoolError(RuntimeError):
    """The spool folder cannot be used (not writable, not a folder)."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    seq: int
    key: bytes
    value: bytes
    segment: int
    offset: int  # start of the record
    end: int  # offset just after it


@dataclass(slots=True)
class _Segment:
    seg_id: int
    path: Path
    size: int = 0
    records: int = 0
    acked: int = 0  # records before the cursor (only ever non-zero in the head segment)


def _crc(seq: int, key: bytes, value: bytes) -> int:
    return zlib.crc32(value, zlib.crc32(key, zlib.crc32(struct.pack("<Q", seq))))


class Spool:
    """Bounded, ordered, crash-safe on-disk queue of Kafka messages. Not thread-safe (the publisher locks)."""

    def __init__(self, cfg: SpoolConfig) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._tail_fd: int | None = None
        self._read_fd: tuple[int, int] | None = None  # (segment id, fd)
        self.cursor: tuple[int, int] = (0, 0)  # first unacknowledged record
        self.reader: tuple[int, int] = (0, 0)  # next record to hand out for replay
        self.max_seq = -1
        self.dropped_messages = 0
        self.dropped_bytes = 0
        self.corrupt_bytes = 0
        self._dirty = False
        self._last_fsync = time.monotonic()
        self._last_cursor_write = 0.0

    # -- open / scan ----------------------------------------------------------------------
    def open(self) -> Spool:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {self.dir}: {exc}") from exc
        if not os.access(self.dir, os.W_OK):
            raise SpoolError(f"spool folder {self.dir} is not writable")
        cursor = self._read_cursor()
        for path in sorted(self.dir.glob("*" + _SUFFIX)):
            try:
                seg_id = int(path.stem)
            except ValueError:
                log.warning("ignoring stray file in spool: %s", path.name)
                continue
            self._segments[seg_id] = self._scan(seg_id, path)
        for seg_id in sorted(self._segments):
            if seg_id < cursor[0]:  # wholly delivered before the last stop
                self._delete(seg_id)
        if self._segments:
            head = next(iter(self._segments))
            if cursor[0] != head:  # the cursor's segment is gone: everything left is pending
                cursor = (head, 0)
            acked, boundary = 0, 0
            for rec in self._iter_segment(head):
                if rec.end > cursor[1]:
                    break
                acked, boundary = acked + 1, rec.end
            self._segments[head].acked = acked
            self.cursor = (head, boundary)
        else:
            self.cursor = (cursor[0] + 1, 0)
        self.reader = self.cursor
        if self.pending_messages:
            log.warning(
                "spool holds %d messages (%d bytes) from before; they are replayed first",
                self.pending_messages,
                self.pending_bytes,
            )
        return self

    def _read_cursor(self) -> tuple[int, int]:
        path = self.dir / _CURSOR
        try:
            seg, off = path.read_text().split()
            return int(seg), int(off)
        except (OSError, ValueError):
            return (0, 0)

    def _write_cursor(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_cursor_write < 0.5:
            return
        self._last_cursor_write = now
        tmp = self.dir / (_CURSOR + ".tmp")
        tmp.write_text(f"{self.cursor[0]} {self.cursor[1]}\n")
        os.replace(tmp, self.dir / _CURSOR)

    def _scan(self, seg_id: int, path: Path) -> _Segment:
        """Count valid records; cut off a torn or corrupt tail so appends and reads stay aligned."""
        seg = _Segment(seg_id, path)
        size = path.stat().st_size
        good = 0
        with open(path, "rb") as f:
            while True:
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                magic, seq, klen, vlen, crc = _HEADER.unpack(header)
                if magic != _MAGIC:
                    break
                body = f.read(klen + vlen)
                if len(body) < klen + vlen or _crc(seq, body[:klen], body[klen:]) != crc:
                    break
                good += _HEADER.size + klen + vlen
                seg.records += 1
                self.max_seq = max(self.max_seq, seq)
        if good < size:
            lost = size - good
            self.corrupt_bytes += lost
            log.error("spool segment %s: %d bytes after the last valid record cut off (torn write)", path.name, lost)
            with open(path, "r+b") as f:
                f.truncate(good)
        seg.size = good
        return seg

    def _iter_segment(self, seg_id: int, start: int = 0):  # type: ignore[no-untyped-def]
        seg = self._segments[seg_id]
        with open(seg.path, "rb") as f:
            f.seek(start)
            off = start
            while off < seg.size:
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    return
                _m, seq, klen, vlen, _c = _HEADER.unpack(header)
                body = f.read(klen + vlen)
                end = off + _HEADER.size + klen + vlen
                yield SpoolRecord(seq, body[:klen], body[klen:], seg_id, off, end)
                off = end

    # -- sizes ------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    @property
    def pending_messages(self) -> int:
        return sum(s.records - s.acked for s in self._segments.values())

    @property
    def pending_bytes(self) -> int:
        if not self._segments:
            return 0
        return self.total_bytes - self.cursor[1] if self.cursor[0] in self._segments else self.total_bytes

    @property
    def empty(self) -> bool:
        return self.pending_messages == 0

    # -- write ------------------------------------------------------------------------------
    def _tail(self) -> _Segment:
        if not self._segments:
            seg_id = max(self.cursor[0], 0)
            self._new_segment(seg_id)
            self.cursor = self.reader = (seg_id, 0)
        return next(reversed(self._segments.values()))

    def _new_segment(self, seg_id: int) -> _Segment:
        path = self.dir / f"{seg_id:012d}{_SUFFIX}"
        seg = self._segments[seg_id] = _Segment(seg_id, path)
        self._close_tail()
        self._tail_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return seg

    def _close_tail(self) -> None:
        if self._tail_fd is not None:
            if self._dirty and self.cfg.fsync != "never":
                os.fsync(self._tail_fd)
            os.close(self._tail_fd)
            self._tail_fd = None
            self._dirty = False

    def append(self, seq: int, key: bytes, value: bytes) -> None:
        """Append one record; when the cap is reached, drop the oldest segment first (counted)."""
        n = _HEADER.size + len(key) + len(value)
        if n > self.cfg.max_bytes - self.cfg.segment_bytes:
            self.dropped_messages += 1
            self.dropped_bytes += n
            log.error("message of %d bytes does not fit in the spool (max_bytes %d); dropped", n, self.cfg.max_bytes)
            return
        tail = self._tail()
        if tail.size and tail.size + n > self.cfg.segment_bytes:
            tail = self._new_segment(tail.seg_id + 1)
        while self.total_bytes + n > self.cfg.max_bytes and len(self._segments) > 1:
            self._drop_oldest()
        if self._tail_fd is None:
            self._tail_fd = os.open(tail.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        data = _HEADER.pack(_MAGIC, seq, len(key), len(value), _crc(seq, key, value)) + key + value
        written = os.write(self._tail_fd, data)
        while written < len(data):  # os.write may be partial on some filesystems
            written += os.write(self._tail_fd, data[written:])
        tail.size += n
        tail.records += 1
        self.max_seq = max(self.max_seq, seq)
        self._dirty = True
        self.maybe_fsync(force=self.cfg.fsync == "always")

    def maybe_fsync(self, force: bool = False) -> None:
        if not self._dirty or self._tail_fd is None or self.cfg.fsync == "never":
            return
        now = time.monotonic()
        if force or now - self._last_fsync >= self.cfg.fsync_interval_s:
            os.fsync(self._tail_fd)
            self._last_fsync = now
            self._dirty = False

    def _drop_oldest(self) -> None:
        seg_id, seg = next(iter(self._segments.items()))
        lost = seg.records - seg.acked
        lost_bytes = seg.size - (self.cursor[1] if self.cursor[0] == seg_id else 0)
        self.dropped_messages += lost
        self.dropped_bytes += lost_bytes
        log.error(
            "spool full, dropping oldest: %d messages (%d bytes) lost; raise spool.max_bytes or fix the broker",
            lost,
            lost_bytes,
        )
        self._delete(seg_id)
        nxt = next(iter(self._segments))
        if self.cursor[0] <= seg_id:
            self.cursor = (nxt, 0)
        if self.reader[0] <= seg_id:
            self.reader = (nxt, 0)
        self._write_cursor(force=True)

    def _delete(self, seg_id: int) -> None:
        seg = self._segments.pop(seg_id)
        if self._read_fd is not None and self._read_fd[0] == seg_id:
            os.close(self._read_fd[1])
            self._read_fd = None
        seg.path.unlink(missing_ok=True)

    # -- read / ack -------------------------------------------------------------------------
    def _fd_for(self, seg_id: int) -> int:
        if self._read_fd is None or self._read_fd[0] != seg_id:
            if self._read_fd is not None:
                os.close(self._read_fd[1])
            self._read_fd = (seg_id, os.open(self._segments[seg_id].path, os.O_RDONLY))
        return self._read_fd[1]

    def read_next(self) -> SpoolRecord | None:
        """The record at the reader position (advancing it), or None when the reader is caught up."""
        while True:
            seg_id, off = self.reader
            seg = self._segments.get(seg_id)
            if seg is None:
                later = [s for s in self._segments if s > seg_id]
                if not later:
                    return None
                self.reader = (later[0], 0)
                continue
            if off >= seg.size:
                later = [s for s in self._segments if s > seg_id]
                if not later:
                    return None
                self.reader = (later[0], 0)
                continue
            fd = self._fd_for(seg_id)
            header = os.pread(fd, _HEADER.size, off)
            bad = len(header) < _HEADER.size
            if not bad:
                magic, seq, klen, vlen, crc = _HEADER.unpack(header)
                body = os.pread(fd, klen + vlen, off + _HEADER.size)
                bad = magic != _MAGIC or len(body) < klen + vlen or _crc(seq, body[:klen], body[klen:]) != crc
            if bad:  # the disk changed under us: skip the rest of this segment, loudly
                lost = seg.size - off
                self.corrupt_bytes += lost
                log.error("spool segment %s corrupt at offset %d: %d bytes skipped", seg.path.name, off, lost)
                seg.size = off
                continue
            end = off + _HEADER.size + klen + vlen
            self.reader = (seg_id, end)
            return SpoolRecord(seq, body[:klen], body[klen:], seg_id, off, end)

    def caught_up(self) -> bool:
        """True when the reader has handed out every record written so far."""
        seg_id, off = self.reader
        if not self._segments:
            return True
        last = next(reversed(self._segments.values()))
        if seg_id > last.seg_id:
            return True
        if seg_id < last.seg_id:
            return False
        return off >= last.size

    def seek(self, position: tuple[int, int]) -> None:
        self.reader = position

    def rewind(self) -> None:
        """Hand out records again from the first unacknowledged one."""
        self.reader = self.cursor

    def ack(self, segment: int, end: int) -> bool:
        """The record ending at ``(segment, end)`` (the next after the cursor) is delivered."""
        if (segment, end) <= self.cursor or segment not in self._segments:
            return False  # stale: before the cursor or in a dropped segment
        for seg_id in [s for s in self._segments if s < segment]:
            self._delete(seg_id)
        self.cursor = (segment, end)
        self._segments[segment].acked += 1
        self._write_cursor()
        return True

    def reset_if_drained(self) -> bool:
        """Delete every segment once all records are acknowledged; the next append starts a new one."""
        if not self.empty:
            return False
        last = max(self._segments, default=self.cursor[0])
        self._close_tail()
        for seg_id in list(self._segments):
            self._delete(seg_id)
        self.cursor = self.reader = (last + 1, 0)
        self._write_cursor(force=True)
        return True

    def close(self) -> None:
        self._close_tail()
        if self._read_fd is not None:
            os.close(self._read_fd[1])
            self._read_fd = None
        if self.dir.is_dir():
            self._write_cursor(force=True)


class PublishMetrics:
    """Prometheus series of the publisher (``reidfleet_appliance_kafka_*`` / ``_spool_*``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "reidfleet_appliance_"
        self.sent = Counter(p + "kafka_messages_sent", "Messages acknowledged by Kafka.", registry=registry)
        self.sent_bytes = Counter(p + "kafka_sent_bytes", "Value bytes acknowledged by Kafka.", registry=registry)
        self.errors = Counter(p + "kafka_delivery_errors", "Failed deliveries (then spooled).", registry=registry)
        self.up = Gauge(p + "kafka_direct", "1 = publishing direct, 0 = spooling.", registry=registry)
        self.spooled = Counter(p + "spool_written_messages", "Messages written to the spool.", registry=registry)
        self.replayed = Counter(p + "spool_replayed_messages", "Spooled messages delivered.", registry=registry)
        self.spool_msgs = Gauge(p + "spool_messages", "Messages waiting in the spool.", registry=registry)
        self.spool_bytes = Gauge(p + "spool_bytes", "Bytes of spool segment files.", registry=registry)
        self.dropped = Gauge(
            p + "spool_dropped_messages",
            "Messages lost because the spool was full (dropping oldest).",
            registry=registry,
        )
        self.dropped_bytes = Gauge(p + "spool_dropped_bytes", "Bytes lost to a full spool.", registry=registry)


@dataclass(slots=True)
class _ReplayEntry:
    seq: int
    segment: int
    end: int
    size: int
    generation: int
    acked: bool = False


@dataclass
class PublishStats:
    sent_messages: int = 0
    sent_bytes: int = 0
    delivery_errors: int = 0
    spooled_messages: int = 0
    replayed_messages: int = 0
    spills: int = 0
    rejected_messages: int = 0
    last_error: str | None = None


class Publisher:
    """Thread-safe: ``publish`` from the pipeline thread; a pump thread serves callbacks and replay."""

    def __init__(
        self,
        kafka: KafkaConfig,
        spool: SpoolConfig,
        key: str,
        registry: CollectorRegistry | None = None,
        on_delivered: Callable[[bytes], None] | None = None,
    ) -> None:
        self.kcfg = kafka
        self.topic = kafka.topic
        self.key = key.encode()
        self.spool = Spool(spool)
        self.window = spool.replay_window
        self.stats = PublishStats()
        self.metrics = PublishMetrics(registry) if registry is not None else None
        self._lock = threading.RLock()
        self._producer: Producer | None = None
        self._direct = True
        self._replaying = False
        self._generation = 0
        self._inflight: OrderedDict[int, bytes] = OrderedDict()  # direct messages awaiting their report
        self._replay: deque[_ReplayEntry] = deque()
        self._delivered_spooled: set[int] = set()  # spooled copies whose original was delivered after all
        self._next_seq = 0
        self._next_probe = 0.0
        self._recreate = False
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None
        self.client_id = kafka.client_id or f"appliance-{key}"
        self._on_delivered = on_delivered  # called with each acknowledged value (latency metrics, tests)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Publisher:
        self.spool.open()
        self._next_seq = self.spool.max_seq + 1
        self._direct = self.spool.empty
        self._producer = self._new_producer()
        self._pump = threading.Thread(target=self._pump_loop, name="kafka-pump", daemon=True)
        self._pump.start()
        self._update_gauges()
        return self

    def _new_producer(self) -> Producer:
        cfg = producer_config(self.kcfg.bootstrap, self.client_id, **self.kcfg.producer)
        cfg["error_cb"] = self._on_error
        try:
            return Producer(cfg)
        except KafkaException as exc:
            raise ValueError(f"invalid kafka.producer settings: {exc}") from exc

    @property
    def direct(self) -> bool:
        return self._direct

    # -- publish ----------------------------------------------------------------------------
    def publish(self, value: bytes) -> None:
        """Hand one message over; it is delivered, or spooled, but never silently lost."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            if self._direct:
                assert self._producer is not None
                self._inflight[seq] = value
                try:
                    self._producer.produce(
                        self.topic, value=value, key=self.key, on_delivery=partial(self._on_direct, seq)
                    )
                except BufferError:
                    self._spill("producer queue full (backpressure)")  # moves this message too, in order
                except KafkaException as exc:
                    if _permanent(exc.args[0]):
                        self._inflight.pop(seq, None)
                        self._reject(seq, exc.args[0])
                    else:
                        self._note_fatal(exc.args[0])
                        self._spill(f"produce failed: {exc}")
                self._producer.poll(0)
            else:
                self._to_spool(seq, value)

    def _to_spool(self, seq: int, value: bytes) -> None:
        self.spool.append(seq, self.key, value)
        self.stats.spooled_messages += 1
        if self.metrics:
            self.metrics.spooled.inc()

    def _spill(self, reason: str) -> None:
        """Leave direct mode: every unacknowledged message goes to the spool, in order, first."""
        if not self._direct:
            return
        self._direct = False
        self._replaying = False
        self.stats.spills += 1
        self.stats.last_error = reason
        n = len(self._inflight)
        for seq, value in self._inflight.items():
            self._to_spool(seq, value)
        self._inflight.clear()
        if self._producer is not None:
            try:
                self._producer.purge(in_queue=True, in_flight=False, blocking=False)
            except KafkaException as exc:  # pragma: no cover - purge only fails on a closed handle
                log.warning("purge failed: %s", exc)
        self._next_probe = time.monotonic() + self.kcfg.probe_interval_s
        self._update_gauges()
        log.warning("kafka unavailable (%s): spooling to %s (%d unacknowledged moved)", reason, self.spool.dir, n)

    # -- callbacks (run inside poll/flush, i.e. under the lock) ----------------------------
    def _on_direct(self, seq: int, err: KafkaError | None, msg: Any) -> None:
        if seq not in self._inflight:  # already spooled
            if err is None:
                self._delivered_spooled.add(seq)
                self._count_sent(len(msg.value() or b""))
                if self._on_delivered is not None:
                    self._on_delivered(msg.value())
            return
        if err is None:
            value = self._inflight.pop(seq)
            self._count_sent(len(value))
            if self._on_delivered is not None:
                self._on_delivered(value)
            return
        self._count_error(err)
        if _permanent(err):
            self._inflight.pop(seq)
            self._reject(seq, err)
            return
        self._note_fatal(err)
        self._spill(f"delivery failed: {err.str()}")

    def _on_replay(self, entry: _ReplayEntry, err: KafkaError | None, msg: Any) -> None:
        if entry.generation != self._generation:  # from a replay round that was rewound
            if err is None:
                self._delivered_spooled.add(entry.seq)
                self._count_sent(entry.size, replayed=True)
                if self._on_delivered is not None and msg is not None:
                    self._on_delivered(msg.value())
            return
        if err is not None:
            self._count_error(err)
            if _permanent(err):  # would fail forever and block the spool: drop it, loudly
                self._reject(entry.seq, err)
                entry.acked = True
                self._advance_replay()
                return
            self._note_fatal(err)
            self._abort_replay(f"replay delivery failed: {err.str()}")
            return
        entry.acked = True
        self._count_sent(entry.size, replayed=True)
        if self._on_delivered is not None and msg is not None:
            self._on_delivered(msg.value())
        self._advance_replay()

    def _advance_replay(self) -> None:
        while self._replay and self._replay[0].acked:
            e = self._replay.popleft()
            self.spool.ack(e.segment, e.end)

    def _reject(self, seq: int, err: KafkaError) -> None:
        self.stats.rejected_messages += 1
        self.stats.last_error = err.str()
        log.error("kafka rejected message %d for good (%s); dropped", seq, err.str())

    def _on_error(self, err: KafkaError) -> None:
        code = err.code()
        if err.fatal():
            log.error("fatal kafka producer error, recreating the producer: %s", err.str())
            self.stats.last_error = err.str()
            with self._lock:
                self._spill(f"fatal producer error: {err.str()}")
                self._abort_replay(err.str())
                self._recreate = True
        elif code == KafkaError._ALL_BROKERS_DOWN:
            with self._lock:
                self._spill("all brokers down")
                self._abort_replay("all brokers down")
        else:
            log.debug("kafka: %s", err.str())

    def _note_fatal(self, err: KafkaError) -> None:
        """An idempotent producer that hit a fatal error (e.g. the broker lost its producer state on
        restart) refuses everything from then on: the pump replaces it with a fresh one. A broker that
        kept (or half-kept) producer state across a restart answers with a fencing/epoch error instead;
        librdkafka does not mark those fatal, yet every retry fails the same way until a new producer id
        is taken (found by tests/system/test_broker_outage.py on tansu with s3 storage)."""
        if err.fatal() or err.code() in _STALE_PRODUCER:
            if not self._recreate:
                log.warning("kafka producer is in a fatal state (%s): recreating it", err.str())
            self._recreate = True

    def _count_sent(self, size: int, replayed: bool = False) -> None:
        self.stats.sent_messages += 1
        self.stats.sent_bytes += size
        if replayed:
            self.stats.replayed_messages += 1
        if self.metrics:
            self.metrics.sent.inc()
            self.metrics.sent_bytes.inc(size)
            if replayed:
                self.metrics.replayed.inc()

    def _count_error(self, err: KafkaError) -> None:
        self.stats.delivery_errors += 1
        self.stats.last_error = err.str()
        if self.metrics:
            self.metrics.errors.inc()

    # -- replay -----------------------------------------------------------------------------
    def _abort_replay(self, reason: str) -> None:
        if not self._replaying:
            return
        self._replaying = False
        self._generation += 1
        for e in self._replay:
            if e.acked:  # delivered beyond a gap: do not send it again
                self._delivered_spooled.add(e.seq)
        self._replay.clear()
        self.spool.rewind()
        if self._producer is not None:
            self._producer.purge(in_queue=True, in_flight=False, blocking=False)
        self._next_probe = time.monotonic() + self.kcfg.probe_interval_s
        log.warning("spool replay paused (%s); retrying", reason)

    def _broker_ready(self) -> bool:
        """Metadata for our topic with partitions and no error: the broker is back and the topic exists."""
        assert self._producer is not None
        try:
            md = self._producer.list_topics(self.topic, timeout=min(2.0, self.kcfg.probe_interval_s * 2))
        except KafkaException as exc:
            self.stats.last_error = f"probe: {exc}"
            return False
        t = md.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            self.stats.last_error = f"topic {self.topic} not available: {t.error if t is not None else 'missing'}"
            return False
        return True

    def _fill_replay(self) -> None:
        assert self._producer is not None
        while len(self._replay) < self.window:
            rec = self.spool.read_next()
            if rec is None:
                break
            entry = _ReplayEntry(rec.seq, rec.segment, rec.end, len(rec.value), self._generation)
            if rec.seq in self._delivered_spooled:
                self._delivered_spooled.discard(rec.seq)
                entry.acked = True
                self._replay.append(entry)
                continue
            try:
                self._producer.produce(
                    self.topic, value=rec.value, key=rec.key, on_delivery=partial(self._on_replay, entry)
                )
            except BufferError:
                self.spool.seek((rec.segment, rec.offset))
                break
            except KafkaException as exc:
                if not _permanent(exc.args[0]):
                    self._note_fatal(exc.args[0])
                    self.spool.seek((rec.segment, rec.offset))
                    self._abort_replay(f"produce failed: {exc}")
                    return
                self._reject(rec.seq, exc.args[0])
                entry.acked = True
            self._replay.append(entry)
        self._advance_replay()
        if not self._replay and self.spool.caught_up() and self.spool.reset_if_drained():
            self._direct = True
            self._replaying = False
            self._delivered_spooled.clear()
            log.info("spool drained: publishing direct again")

    def pump(self) -> None:
        """One round of housekeeping: serve callbacks, probe the broker, move the replay along."""
        probe = False
        with self._lock:
            if self._producer is None:
                return
            if self._recreate:
                self._replace_producer()
            self._producer.poll(0)
            self.spool.maybe_fsync()
            if not self._direct and not self._replaying and time.monotonic() >= self._next_probe:
                probe = True
        if probe:
            ready = self._broker_ready()
            with self._lock:
                self._next_probe = time.monotonic() + self.kcfg.probe_interval_s
                if ready and not self._direct and not self._replaying:
                    # A fresh producer for every replay round: the old one may hold idempotence state
                    # (producer id, sequence numbers) that a restarted broker no longer knows, and then
                    # every message times out instead of failing fast (seen with tansu restarts).
                    self._replace_producer()
                    self._replaying = True
                    self._generation += 1
                    self.spool.rewind()
                    log.info("broker reachable: replaying %d spooled messages", self.spool.pending_messages)
        with self._lock:
            if self._replaying:
                self._fill_replay()
                self._producer.poll(0)
            self._update_gauges()

    def _replace_producer(self) -> None:
        """Swap in a new producer; the old one's queue is purged (everything unacknowledged is in the
        spool or about to be rewound, so nothing is lost)."""
        self._recreate = False
        assert self._producer is not None
        if self._replaying:
            self._abort_replay("producer replaced")
        old, self._producer = self._producer, self._new_producer()
        self._generation += 1  # reports from the old producer belong to an old round
        old.purge(in_queue=True, in_flight=True, blocking=False)
        old.poll(0)
        old.flush(0)

    def _pump_loop(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.pump()
            except Exception:  # the pump must survive anything; the next round retries
                log.exception("publisher pump failed")

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.up.set(1 if self._direct else 0)
            self.metrics.spool_msgs.set(self.spool.pending_messages)
            self.metrics.spool_bytes.set(self.spool.total_bytes)
            self.metrics.dropped.set(self.spool.dropped_messages)
            self.metrics.dropped_bytes.set(self.spool.dropped_bytes)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": "direct" if self._direct else ("replaying" if self._replaying else "spooling"),
                "sent_messages": self.stats.sent_messages,
                "sent_bytes": self.stats.sent_bytes,
                "delivery_errors": self.stats.delivery_errors,
                "inflight_messages": len(self._inflight) + len(self._replay),
                "spool_messages": self.spool.pending_messages,
                "spool_bytes": self.spool.total_bytes,
                "spool_written_messages": self.stats.spooled_messages,
                "spool_replayed_messages": self.stats.replayed_messages,
                "spool_dropped_messages": self.spool.dropped_messages,
                "spool_dropped_bytes": self.spool.dropped_bytes,
                "rejected_messages": self.stats.rejected_messages,
                "last_error": self.stats.last_error,
            }

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight and the spool is empty (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._direct and not self._inflight and self.spool.empty:
                    return True
            time.sleep(0.02)
        return False

    def close(self, timeout_s: float | None = None) -> None:
        """Flush what the broker takes within ``timeout_s``; spool the rest; persist the cursor."""
        timeout_s = self.kcfg.flush_timeout_s if timeout_s is None else timeout_s
        self._stop.set()
        if self._pump is not None:
            self._pump.join(timeout=5)
        with self._lock:
            if self._producer is not None:
                if self._direct or self._replaying:
                    self._producer.flush(timeout_s)
                if self._inflight:  # only ever non-empty in direct mode
                    self._spill("shutting down with undelivered messages")
                self._producer.purge(in_queue=True, in_flight=True, blocking=True)
                self._producer.poll(0)
                self._producer = None
            if self._direct:
                self.spool.reset_if_drained()
            pending = self.spool.pending_messages
            self.spool.close()
        if pending:
            log.warning("stopped with %d messages in the spool; they are sent first on the next start", pending)
