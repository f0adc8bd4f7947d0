"""The Re-ID consumer: reid_input → decode → embed → gender → match → analytics store → reid_output.

Delivery is at-least-once with idempotent effects. A batch is processed whole, then (1) its vector
writes are done, (2) its analytics rows commit in one transaction, (3) its reid_output and dead-letter
messages are flushed, and only then (4) its offsets are stored for the auto-committer. A crash at any
point replays the batch; deterministic ids (see identity.py) make the replay rewrite the same rows.

Dynamic batching across cameras: messages are pulled until ``batch.max_crops`` crops,
``batch.max_messages`` messages or ``batch.max_wait_ms`` after the first message, so a GPU sees big
batches under load while a single quiet camera still gets its ids within the deadline.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.configfile import ConfigError
from common.kafka import consumer_config
from common.service import StopSignal, allowed_cpus, set_os_name
from schemas.codec import AvroCodec
from server import results
from server.config import ServerConfig
from server.embed.preprocess import CropError
from server.identity import IdentityMatcher, TrackState, settings_for_model
from server.intake import IntakeBatch, Refusal, check_finite, embeddable, parse_frame
from server.sink import DeliveryFailed, Record, Result, ResultSink
from server.store import AnalyticsStore, BatchWrite, prototype_row
from server.validate import DecodedCrop, InvalidFrame, crop_of, decode_crops, undecoded_crops
from server.vectors import Prototype, build_vectors
from server.vectors.mirror import MirrorDied

log = logging.getLogger(__name__)

_REAP_POLL_S = 0.005  # Kafka poll timeout while a batch's commit is in flight (see ReidConsumer._collect)
_BYTES_PER_CROP = 2_000.0  # a first guess until a batch is measured: low, so a first batch closes early, not big

# Per batch: fetch (waiting in the Kafka client, idle time included), parse (with remote intake: in the
# embedder's processes, their slowest part), then decode/embed/gender (the prepare stage, a worker thread when
# overlapped), wait_prepared, match, handoff (the consumer thread waiting for room in the commit queue,
# ``batch.commit_queue``, and handing this batch over), vectors_store and produce (the commit).
_STAGES = ("fetch", "parse", "decode", "embed", "gender", "wait_prepared", "match", "handoff", "vectors_store",
           "produce")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        p = "reidfleet_server_"
        self.messages = Counter(p + "messages_total", "Edge frames consumed, by outcome", ["outcome"],
                                registry=registry)
        self.dlq = Counter(p + "dlq_total", "Messages sent to the dead-letter topic", ["error_type"], registry=registry)
        self.crops = Counter(p + "crops_total", "Person crops embedded", registry=registry)
        self.batch_crops = Histogram(p + "batch_crops", "Crops per batch", registry=registry,
                                     buckets=(0, 1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 8192))
        self.batch_messages = Histogram(p + "batch_messages", "Messages per batch", registry=registry,
                                        buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384))
        self.stage = Histogram(p + "stage_seconds", "Time per batch in each stage", ["stage"], registry=registry,
                               buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.e2e = Histogram(p + "frame_latency_seconds", "Capture to stored result, per frame", registry=registry,
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.input_delay = Histogram(p + "input_delay_seconds", "Produced (the message's timestamp) to taken into "
                                     "a batch, per frame: producer linger, broker and fetch", registry=registry,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.lag = Gauge(p + "consumer_lag_messages", "High watermark minus position", ["partition"],
                         registry=registry)
        self.crops_per_s = Gauge(p + "crops_per_second", "Crops embedded per second over the last ~10 s",
                                 registry=registry)
        self.identities = Gauge(p + "gallery_identities", "Identities in the matching gallery", registry=registry)
        self.mirror_lag = Gauge(p + "vector_mirror_pending_points", "Prototype changes committed to SQL but not "
                                "yet written to the Qdrant mirror", registry=registry)
        self.gpu_decode_fallbacks = Counter(p + "gpu_jpeg_fallbacks_total", "Batches redone on the CPU decode path "
                                            "because the GPU JPEG decoder rejected a crop", registry=registry)
        self.assignments = Counter(p + "track_assignments_total", "Track to identity decisions", ["kind"],
                                   registry=registry)


@dataclass
class Item:
    """One consumed message on its way through the batch."""

    msg: Message
    record: dict[str, Any] | None = None
    crops: list[DecodedCrop] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (error_type, reason) → dead letter

    def parsed(self, rec: dict[str, Any] | Refusal) -> None:
        """Take a :func:`server.intake.parse_frame` answer: the record, or the refusal as the error."""
        if isinstance(rec, dict):
            self.record = rec
        else:
            self.error = rec


@dataclass
class Prepared:
    """A batch after decode, embed and gender: what :meth:`ReidConsumer.finish` needs."""

    ok: list[Item]
    todo: list[tuple[int, DecodedCrop]]
    embs: np.ndarray
    males: np.ndarray | None

    def only(self, items: Sequence[Item]) -> Prepared:
        """This batch restricted to ``items`` (a subset of its messages): their crops, vectors and gender rows."""
        keep = {id(it) for it in items}
        index: dict[int, int] = {}  # position in self.ok -> position in the result's ok
        ok: list[Item] = []
        for i, it in enumerate(self.ok):
            if id(it) in keep:
                index[i] = len(ok)
                ok.append(it)
        rows = [j for j, (i, _c) in enumerate(self.todo) if i in index]
        return Prepared(ok, [(index[self.todo[j][0]], self.todo[j][1]) for j in rows], self.embs[rows],
                        self.males[rows] if self.males is not None else None)


@dataclass
class Commit:
    """A matched batch on its way to durability: rows, vector changes, output messages and dead letters."""

    items: Sequence[Item]
    ok: list[Item]
    n_crops: int
    batch: BatchWrite
    outputs: list[Result]  # reid_output (key, record): encoded by the sink
    dead: list[Item]
    vector_changes: dict[str, Prototype | None]  # the cache's changes for the Qdrant mirror


class ReidConsumer:
    def __init__(self, cfg: ServerConfig, *, stop: StopSignal | None = None,
                 registry: CollectorRegistry | None = None, embedder: Any = None, gender: Any = None,
                 metrics: Metrics | None = None) -> None:
        from server.attributes import build_gender
        from server.embed.base import build_embedder

        self.cfg = cfg
        self.stop = stop or StopSignal(install_handlers=False)
        if metrics is not None:  # a restarted consumer keeps counting into the same series
            self.registry, self.metrics = metrics.registry, metrics
        else:
            self.registry = registry or CollectorRegistry()
            self.metrics = Metrics(self.registry)
        if embedder is None and cfg.batch.embed_process:
            from server.embed.remote import RemoteEmbedder

            embedder = RemoteEmbedder(cfg.embedder, assets=cfg.assets, workers=cfg.batch.embed_workers)
        self.embedder = embedder or build_embedder(cfg.embedder, assets=cfg.assets)
        try:  # before anything else is opened: an uncalibrated model without a threshold is a config error
            self.identity = settings_for_model(cfg.identity, self.embedder.model_id)
        except ConfigError:
            getattr(self.embedder, "close", lambda: None)()
            raise
        self.gender = gender if gender is not None or cfg.gender.mode == "off" else \
            build_gender(cfg.gender.model, assets=cfg.assets)
        self.store = AnalyticsStore(cfg.store.url)
        # The analytics store holds the durable copy of the gallery; the vector store loads from it.
        self.vectors = build_vectors(cfg.vectors, self.embedder.dim, self.embedder.model_id,
                                     source=(Prototype(pid, gid, vec, payload) for pid, gid, vec, payload, _rev
                                             in self.store.load_prototypes(self.embedder.model_id)))
        self._import_legacy_prototypes()
        self.matcher = IdentityMatcher(self.identity, cfg.gender, self.vectors, self.store, self.embedder.model_id)
        self.bucket_us = cfg.store.sighting_bucket_s * 1_000_000
        self.instance = f"{cfg.kafka.group_id}/{socket.gethostname()}/{os.getpid()}"
        k = cfg.kafka
        self.consumer = Consumer(consumer_config(
            k.bootstrap, k.group_id, k.client_id, **{
                "session.timeout.ms": k.session_timeout_ms,
                "heartbeat.interval.ms": max(500, k.session_timeout_ms // 4),
                "max.poll.interval.ms": k.max_poll_interval_ms,
                "fetch.wait.max.ms": k.fetch_max_wait_ms,
                "enable.partition.eof": False,
                **k.extra}))
        # The durable half of each batch: on a writer thread with its own results producer, or in a commit
        # process (server/writer.py) that owns the SQL transaction and the producer.
        self._writer: Any = None
        self.sink: ResultSink | None = None
        if cfg.batch.commit_process:
            from server.writer import CommitProcess

            self._writer = CommitProcess(cfg)
        else:
            self.sink = ResultSink(k, stopped=self.stop.is_set)
        self.codec = AvroCodec("edge_frame")
        self.dlq_codec = AvroCodec("dead_letter")
        # nvJPEG path: the embedder decodes JPEG bytes on the GPU (gender needs CPU pixels, so not with it).
        self.gpu_jpeg = bool(cfg.batch.gpu_jpeg and self.gender is None
                             and getattr(self.embedder, "decodes_jpegs", False))
        # The embedder's processes decode and check the messages too (server/intake.py): not with gender on,
        # whose model needs the pixels here.
        self.remote_intake = bool(cfg.batch.remote_intake and self.gender is None
                                  and hasattr(self.embedder, "intake"))
        self._bytes_per_crop = _BYTES_PER_CROP  # message bytes per crop, learnt from each batch (remote intake)
        threads = cfg.batch.decode_threads or allowed_cpus()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jpeg")
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit", initializer=set_os_name,
                                             initargs=("reid-commit",)) \
            if cfg.batch.pipelined_commit and self._writer is None else None
        # Batches handed to the commit stage and not yet durable, oldest first (at most ``batch.commit_queue``).
        self._inflight: collections.deque[tuple[Sequence[Item], Future[None] | Commit]] = collections.deque()
        self._commit_failed: str | None = None  # the commit thread's first failure: later batches are refused
        self._pending: collections.deque[Item] = collections.deque()
        # Revocations so far, and the count at which each partition was last revoked: a batch fetched before its
        # partition's revoke is not finished (see _still_ours).
        self._revocations = 0
        self._revoked_in: dict[tuple[str, int], int] = {}
        self._assigned: list[TopicPartition] = []
        self.last_loop_at = time.monotonic()
        self.last_batch_at: float | None = None
        self.batches = 0
        self._rate: list[tuple[float, int]] = []
        self._lag_at = 0.0
        self.metrics.identities.set(self.matcher.gallery_size())

    def _import_legacy_prototypes(self) -> None:
        """A gallery that only Qdrant held (written before SQL kept the prototypes) is copied into SQL once."""
        imported = getattr(self.vectors, "imported", None)
        if not imported:
            return
        batch = BatchWrite()
        for p in imported:
            batch.prototypes[p.point_id] = prototype_row(p.point_id, p.global_id, self.embedder.model_id, p.vector,
                                                         p.payload, int(p.payload.get("rev", 0)))
        self.store.write(batch)
        log.info("imported the Qdrant gallery into the analytics store", extra={"points": len(imported)})
        imported.clear()

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def output_waiting_since(self) -> float | None:
        """Since when the batch being committed waits for the broker (health shows it), else None."""
        return self._writer.waiting_since if self._writer is not None else self.sink.waiting_since  # type: ignore[union-attr]

    def health(self) -> dict[str, Any]:
        stalled = time.monotonic() - self.last_loop_at > self.cfg.kafka.max_poll_interval_ms / 1000 / 2
        waiting = self.output_waiting_since
        degraded = [f"kafka: results waiting for the broker for {time.monotonic() - waiting:.0f} s"] \
            if waiting is not None else []
        mirror = getattr(self.vectors, "mirror", None)
        if mirror is not None and not mirror.is_alive():
            degraded.append("vectors: the Qdrant mirror is not running; the consumer restarts with its next batch "
                            "and reconciles Qdrant from the analytics store")
        return {"ok": not stalled, "batches": self.batches, "gallery_identities": self.matcher.gallery_size(),
                "degraded": degraded,
                "partitions": [tp.partition for tp in self._assigned], "embedder": self.embedder.model_id,
                "matcher": dict(self.matcher.stats)}

    def _on_assign(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        self._assigned = list(parts)
        log.info("partitions assigned", extra={"partitions": [p.partition for p in parts]})

    def _on_revoke(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        log.info("partitions revoked", extra={"partitions": [p.partition for p in parts]})
        self.await_commit()  # store the in-flight batches' offsets while the partitions are still ours
        # Messages of revoked partitions not yet processed belong to their next owner now.
        revoked = {(p.topic, p.partition) for p in parts}
        self._revocations += 1
        for tp in revoked:
            self._revoked_in[tp] = self._revocations
        self._pending = collections.deque(it for it in self._pending
                                          if (it.msg.topic(), it.msg.partition()) not in revoked)
        self._assigned = []

    def run(self) -> None:
        """Consume until the stop event is set; always closes the consumer (committing stored offsets)."""
        # Everything alive now (the models, torch/OpenVINO modules, the loaded gallery) lives as long as the
        # process: out of the cyclic collector's reach, each full collection no longer walks it. The per-batch
        # objects are still collected. (Host-side benchmark here: one run +25 %, repeated runs within the
        # +-10 % noise of this box; it costs nothing.)
        gc.freeze()
        set_os_name("reid-consumer")
        switch_was = sys.getswitchinterval()  # process-wide: put back when this consumer stops
        if self.cfg.batch.switch_interval_ms is not None:
            sys.setswitchinterval(self.cfg.batch.switch_interval_ms / 1000)
        self.consumer.subscribe([self.cfg.kafka.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            if self.cfg.batch.overlap:
                self._run_overlapped()
            else:
                while not self.stop.is_set():
                    since = self._revocations
                    items = self._still_ours(self._collect(), since)
                    if items:
                        self.process(items)
                    self._reap_commit()
                    self._update_lag()
        finally:
            try:
                self.close()
            finally:
                sys.setswitchinterval(switch_was)

    def _run_overlapped(self) -> None:
        """Two-stage pipeline: the next batches are decoded and embedded in one worker thread while batch k is
        matched, stored and produced here. Up to ``batch.prepare_ahead`` batches are collected and queued for the
        worker beyond the one being finished, and batches are finished strictly in order on this thread, so
        offsets are still stored in order and only after their batch's SQL commit. Why: on a GPU box decode+embed
        and match+SQL each cost about as much as the other; overlapping them hides the smaller one (cv2 and torch
        drop the GIL). With one batch ahead the worker idles whenever a finish outlasts the next prepare (a batch
        that founds many identities); with two it always has the next batch queued."""
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare", initializer=set_os_name,
                                    initargs=("reid-prepare",))
        inflight: collections.deque[tuple[list[Item], Future[Prepared], int]] = collections.deque()
        ahead = self.cfg.batch.prepare_ahead
        try:
            while not self.stop.is_set():
                since = self._revocations
                items = self._still_ours(self._collect(), since)
                if items:
                    inflight.append((items, worker.submit(self.prepare, items), since))
                # Finish the oldest once more than ``ahead`` wait; when nothing new came (idle), finish them all.
                while inflight and (len(inflight) > ahead or not items):
                    batch, fut, fetched = inflight[0]
                    t0 = time.perf_counter()
                    prepared = fut.result()
                    self.metrics.stage.labels("wait_prepared").observe(time.perf_counter() - t0)
                    self._finish_if_ours(batch, prepared, fetched)
                    inflight.popleft()
                self._reap_commit()
                self._update_lag()
            while inflight:  # stopping: finish what was already taken (or it is simply redelivered)
                batch, fut, fetched = inflight[0]
                self._finish_if_ours(batch, fut.result(), fetched)
                inflight.popleft()
        finally:
            for _batch, fut, _fetched in inflight:  # an error in finish: let the prepares end; redelivered
                fut.exception()
            worker.shutdown(wait=True)

    def _still_ours(self, items: list[Item], since: int) -> list[Item]:
        """``items`` less those of partitions revoked after revocation count ``since`` (when they were fetched).
        Why: after a revoke the partition's next owner (another consumer, or this one after an eager rebalance)
        fetches from the committed offsets, so finishing such a message here would match and publish it twice,
        and store an offset for a partition this consumer may no longer own."""
        if self._revocations == since or not items:
            return items
        gone = {tp for tp, n in self._revoked_in.items() if n > since}
        kept = [it for it in items if (it.msg.topic(), it.msg.partition()) not in gone]
        if len(kept) < len(items):
            log.info("messages of revoked partitions left to their next owner",
                     extra={"dropped": len(items) - len(kept), "kept": len(kept)})
        return kept

    def _finish_if_ours(self, items: list[Item], prep: Prepared, since: int) -> None:
        """:meth:`finish` for the part of a prepared batch whose partitions were not revoked since its fetch."""
        kept = self._still_ours(items, since)
        if len(kept) == len(items):
            self.finish(items, prep)
        elif kept:
            self.finish(kept, prep.only(kept))

    def close(self) -> None:
        try:
            self.await_commit()  # the last batches' offsets, if their commits succeed
        except Exception as exc:  # its batch is simply redelivered
            log.warning("last batch did not commit, it will be redelivered: %s", exc)
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close failed: %s", exc)
        if self._writer is not None:
            self._writer.close()
        else:
            self.sink.close()  # type: ignore[union-attr]
        self.pool.shutdown(wait=True)
        self.vectors.close()
        self.store.close()

    # --- batching --------------------------------------------------------------------------
    def _collect(self) -> list[Item]:
        b = self.cfg.batch
        items: list[Item] = []
        n_crops = 0
        deadline: float | None = None
        fetch_s = 0.0
        while not self.stop.is_set():
            self.last_loop_at = time.monotonic()
            want = 0
            if self._pending:
                parsed, msgs = list(self._pending), []
                self._pending.clear()
            else:
                want = min(500, b.max_messages - len(items))
                t_fetch = time.perf_counter()
                if deadline is None:
                    # consume() waits until ``want`` messages or the timeout: waiting for the FIRST message of a
                    # batch that way added up to 0.5 s to every quiet stream's latency. poll() returns with the
                    # first one; what is already fetched comes with it, then the batch deadline runs. While a
                    # batch is being committed the wait is short, so the caller takes its offsets as soon as
                    # it is durable instead of after up to 0.5 s of an idle stream.
                    first = self.consumer.poll(_REAP_POLL_S if self._inflight else 0.5)
                    msgs = [first] if first is not None else []
                    if first is not None and want > 1:
                        msgs += self.consumer.consume(num_messages=want - 1, timeout=0)
                else:
                    msgs = self.consumer.consume(num_messages=want, timeout=max(0.0, deadline - time.monotonic()))
                now_s = time.time()  # one clock read per fetch, not per message
                t0 = time.perf_counter()
                fetch_s += t0 - t_fetch
                arrive = self._arrived if self.remote_intake else self._parse
                parsed = [arrive(m, now_s) for m in msgs if self._usable(m)]
                if parsed and not self.remote_intake:  # else the embedder's processes parse, and time it
                    self.metrics.stage.labels("parse").observe(time.perf_counter() - t0)
            for i, item in enumerate(parsed):
                if items and (n_crops >= b.max_crops or len(items) >= b.max_messages):
                    # Batch full: keep the rest, in order, for the next batch (its offsets are not stored yet).
                    self._pending.extend(parsed[i:])
                    self.metrics.stage.labels("fetch").observe(fetch_s)
                    return items
                items.append(item)
                if item.record is not None:
                    n_crops += len(item.record["crops"])
                elif self.remote_intake:  # not decoded yet: its crops estimated from its size
                    n_crops += len(item.msg.value() or b"") / self._bytes_per_crop
                if deadline is None:
                    deadline = time.monotonic() + _batch_wait_s(item.msg, b.max_wait_ms / 1000)
            # Past the deadline, keep taking what the client already holds (no waiting) until it runs dry.
            drained = not msgs or len(msgs) < want
            if items and (n_crops >= b.max_crops or len(items) >= b.max_messages
                          or (deadline is not None and time.monotonic() >= deadline and drained)):
                break
            if not items and not parsed:
                break  # idle: let the caller refresh lag and check the stop event
        if items:
            self.metrics.stage.labels("fetch").observe(fetch_s)
        return items

    def _usable(self, m: Message) -> bool:
        err = m.error()
        if err is None:
            return True
        if err.fatal():
            raise KafkaException(err)
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", err)
        return False

    def _arrived(self, m: Message, now_s: float) -> Item:
        """A message taken into a batch (decoded later: by the embedder's processes with remote intake)."""
        ts_type, ts_ms = m.timestamp()
        if ts_type != TIMESTAMP_NOT_AVAILABLE and ts_ms > 0:
            self.metrics.input_delay.observe(max(0.0, now_s - ts_ms / 1000))
        return Item(m)

    def _parse(self, m: Message, now_s: float) -> Item:
        item = self._arrived(m, now_s)
        item.parsed(parse_frame(self.codec, m.value(), self.cfg.validation))
        return item

    # --- one batch -------------------------------------------------------------------------
    def process(self, items: Sequence[Item]) -> None:
        """One batch, start to end (the overlapped loop calls the two halves on two threads)."""
        self.finish(items, self.prepare(items))

    def prepare(self, items: Sequence[Item]) -> Prepared:
        """Decode, embed and gender of one batch: touches no matcher, store or consumer state, so it may run
        on a worker thread while the previous batch is finished."""
        if self.remote_intake:
            return self._prepare_remote(items)
        if self.gpu_jpeg:
            try:
                return _finite(self._prepare_gpu(items))
            except CropError as exc:  # a crop nvJPEG cannot take: the CPU path decodes or dead-letters it
                log.warning("GPU JPEG decode failed, batch redone on the CPU path: %s", exc)
                self.metrics.gpu_decode_fallbacks.inc()
                for it in items:
                    it.crops = []
        return _finite(self._prepare_cpu(items))

    def _prepare_cpu(self, items: Sequence[Item]) -> Prepared:
        m = self.metrics
        t0 = time.perf_counter()
        ok = [it for it in items if it.record is not None]
        for it, res in zip(ok, self.pool.map(self._decode_crops, ok), strict=True):
            if isinstance(res, InvalidFrame):
                it.error, it.record = (res.error_type, res.reason), None
            else:
                it.crops = res
        ok = [it for it in items if it.record is not None]
        t1 = time.perf_counter()
        m.stage.labels("decode").observe(t1 - t0)

        todo = self._todo(ok)
        images: list[np.ndarray] = [c.image_bgr for _, c in todo]  # type: ignore[misc]
        embs = self.embedder.embed(images) if images else np.zeros((0, self.embedder.dim), np.float32)
        t2 = time.perf_counter()
        m.stage.labels("embed").observe(t2 - t1)
        males = self.gender.male_probability(images) if (self.gender is not None and images) else None
        t3 = time.perf_counter()
        m.stage.labels("gender").observe(t3 - t2)
        return Prepared(ok, todo, embs, males)

    def _prepare_gpu(self, items: Sequence[Item]) -> Prepared:
        """JPEG headers checked here, pixels decoded and resized by nvJPEG on the GPU inside the embedder:
        the host never touches a pixel, and one batched call replaces thousands of GIL round trips of a
        CPU decode pool (measured on an H100 box: the pool decoded ~8k crops/s beside the matcher)."""
        m = self.metrics
        t0 = time.perf_counter()
        for it in items:
            if it.record is None:
                continue
            try:
                it.crops = undecoded_crops(it.record, self.cfg.validation)
            except InvalidFrame as exc:
                it.error, it.record = (exc.error_type, exc.reason), None
        ok = [it for it in items if it.record is not None]
        todo = self._todo(ok)
        t1 = time.perf_counter()
        m.stage.labels("decode").observe(t1 - t0)
        embs = self.embedder.embed_jpegs([c.jpeg for _, c in todo]) if todo else \
            np.zeros((0, self.embedder.dim), np.float32)
        m.stage.labels("embed").observe(time.perf_counter() - t1)
        m.stage.labels("gender").observe(0.0)
        return Prepared(ok, todo, embs, None)

    def _prepare_remote(self, items: Sequence[Item]) -> Prepared:
        """Decode, checks and embedding all in the embedder's processes (server/intake.py); here each message
        gets its record (crops without their JPEG bytes) or its refusal."""
        m = self.metrics
        values = [it.msg.value() for it in items]
        res: IntakeBatch = self.embedder.intake(values, self.cfg.validation, self.cfg.identity.min_crop_quality)
        for it, rec in zip(items, res.records, strict=True):
            it.parsed(rec)
        ok = [it for it in items if it.record is not None]
        q = self.cfg.identity.min_crop_quality
        todo = [(i, crop_of(c)) for i, it in enumerate(ok) for c in embeddable(it.record, q)]  # type: ignore[arg-type]
        if len(todo) != len(res.embs):
            raise RuntimeError(f"embedder processes returned {len(res.embs)} vectors for {len(todo)} crops")
        if res.fallback:
            log.warning("GPU JPEG decode failed, batch redone on the CPU path in the embedder processes")
            m.gpu_decode_fallbacks.inc()
        n_crops = sum(len(it.record["crops"]) for it in ok)  # type: ignore[index]
        if n_crops:  # the next batches' size estimate: bytes per crop of this batch's good messages, smoothed
            n_bytes = sum(len(v or b"") for v, it in zip(values, items, strict=True) if it.record is not None)
            seen, old = n_bytes / n_crops, self._bytes_per_crop
            self._bytes_per_crop = max(256.0, 0.5 * (old + seen) if 0.5 < seen / old < 2 else seen)
        m.stage.labels("parse").observe(res.parse_s)
        m.stage.labels("decode").observe(0.0)
        m.stage.labels("embed").observe(res.embed_s)
        m.stage.labels("gender").observe(0.0)
        return Prepared(ok, todo, res.embs, None)

    def _todo(self, ok: list[Item]) -> list[tuple[int, DecodedCrop]]:
        """(item index, crop) of every crop good enough to embed."""
        q = self.cfg.identity.min_crop_quality
        return [(i, c) for i, it in enumerate(ok) for c in it.crops if c.quality >= q]

    def finish(self, items: Sequence[Item], prep: Prepared) -> None:
        """Match, store, produce, then store offsets: always on the consumer's own thread, batch after batch."""
        m = self.metrics
        ok, todo, embs, males = prep.ok, prep.todo, prep.embs, prep.males
        t3 = time.perf_counter()
        self.matcher.prefetch({(it.record["device_id"], it.record["camera_id"], int(tid))  # type: ignore[index]
                               for it in ok for tid in _track_ids(it.record)})
        crops_of: dict[int, list[int]] = {}
        for j, (i, _c) in enumerate(todo):
            crops_of.setdefault(i, []).append(j)
        batch = BatchWrite()
        before = dict(self.matcher.stats)
        # 1. In frame order: every box and crop to its track, ended tracks closed.
        frames = [self._resolve_frame(it.record, [todo[j][1] for j in crops_of.get(i, ())],  # type: ignore[arg-type]
                                      batch) for i, it in enumerate(ok)]
        # 2. Each track's crops of the batch folded together, then one batched match for all tracks.
        index: dict[str, int] = {}
        tracks: list[TrackState] = []  # in order of their first crop
        owner = np.empty(len(todo), np.int64)
        for i, (_rec, crop_tracks, _boxes) in enumerate(frames):
            for j, t in zip(crops_of.get(i, ()), crop_tracks, strict=True):
                k = index.get(t.track_uid)
                if k is None:
                    k = index[t.track_uid] = len(tracks)
                    tracks.append(t)
                owner[j] = k
        self.matcher.fold_crops(tracks, owner, embs, males, np.array([c.quality for _, c in todo], np.float32))
        latest_us = max((it.record["captured_at_us"] for it in ok), default=0)  # type: ignore[index]
        self.matcher.match_batch(tracks, latest_us, batch)
        for kind in ("matched", "new", "merged"):
            if self.matcher.stats[kind] != before[kind]:
                self.metrics.assignments.labels(kind).inc(self.matcher.stats[kind] - before[kind])
        # 3. Sightings and one reid_output message per frame, with the batch's final ids.
        now_us = time.time_ns() // 1000
        outputs = [(rec["device_id"].encode(), self._frame_result(rec, boxes, batch, now_us))
                   for rec, _crop_tracks, boxes in frames]
        if latest_us:
            self.matcher.expire(latest_us, batch)
        self.matcher.write_rows(batch)
        t4 = time.perf_counter()
        m.stage.labels("match").observe(t4 - t3)
        work = Commit(items, ok, len(todo), batch, outputs, [it for it in items if it.error is not None],
                      self.vectors.take_changes())
        if self._writer is None and self._committer is None:
            self._commit(work)
            self._store_offsets(items)
            return
        # Pipelined: this batch's SQL commit, mirror hand-off and produce run in the commit process (or on the
        # commit thread) while the next batches are collected and matched here. Up to ``batch.commit_queue``
        # batches wait there, committed strictly in order; offsets are stored here only once their batch is
        # durable, and a batch after a failed one is never committed (see :meth:`await_commit`).
        while len(self._inflight) >= self.cfg.batch.commit_queue:
            self._await_oldest()
        if self._writer is not None:
            self._writer.submit(work.batch, work.outputs, self._dead_letters(work.dead))
            self._inflight.append((items, work))
        else:
            self._inflight.append((items, self._committer.submit(self._commit_in_order, work)))  # type: ignore[union-attr]
        m.stage.labels("handoff").observe(time.perf_counter() - t4)

    def _reap_commit(self) -> None:
        """Account for the batches being committed and store their offsets as soon as they are durable, instead
        of when the next batch needs room (a quiet stream's last batch would otherwise wait for traffic)."""
        while self._inflight:
            pending = self._inflight[0][1]
            if not (self._writer.ready() if isinstance(pending, Commit) else pending.done()):
                return
            self._await_oldest()

    def await_commit(self) -> None:
        """Wait for every batch being committed, oldest first, storing each one's offsets once it is durable. A
        failed commit raises here and neither its offsets nor any later batch's are stored: they are redelivered
        and rewritten idempotently. (The later batches are not committed either: their rows may build on the
        failed batch's, e.g. an identity it created.)"""
        while self._inflight:
            self._await_oldest()

    def _await_oldest(self) -> None:
        items, pending = self._inflight.popleft()
        try:
            if isinstance(pending, Commit):  # in the commit process
                sql_s, produce_s = self._writer.result(self.stop.is_set)
                self.vectors.submit_changes(pending.vector_changes)  # SQL committed: the mirror may follow
                self.metrics.stage.labels("vectors_store").observe(sql_s)
                self.metrics.stage.labels("produce").observe(produce_s)
                self._account(pending)
            else:
                pending.result()
        except BaseException:
            self._inflight.clear()  # abandoned: never their offsets (the consumer restarts from the committed ones)
            raise
        self._store_offsets(items)

    def _commit_in_order(self, c: Commit) -> None:
        """The commit thread's job: :meth:`_commit`, unless an earlier batch's commit failed (this batch's rows
        may build on that one's, so it waits for the redelivery of both)."""
        if self._commit_failed is not None:
            raise RuntimeError(f"not committed: an earlier batch's commit failed ({self._commit_failed})")
        try:
            self._commit(c)
        except BaseException as exc:
            self._commit_failed = f"{type(exc).__name__}: {exc}"[:300]
            raise

    def _commit(self, c: Commit) -> None:
        """Store, mirror, produce (then the caller stores offsets): the durable half of a batch."""
        m = self.metrics
        t4 = time.perf_counter()
        self.store.write(c.batch)  # analytics rows and the gallery's durable copy: one transaction
        self.vectors.submit_changes(c.vector_changes)  # then the Qdrant mirror (asynchronous: may lag, never lead)
        t5 = time.perf_counter()
        m.stage.labels("vectors_store").observe(t5 - t4)
        self.sink.deliver(c.outputs, self._dead_letters(c.dead))  # type: ignore[union-attr]
        m.stage.labels("produce").observe(time.perf_counter() - t5)
        self._account(c)

    def _account(self, c: Commit) -> None:
        """Metrics of a batch that is now durable."""
        m = self.metrics
        done_us = time.time_ns() // 1000
        for it in c.ok:
            m.e2e.observe(max(0.0, (done_us - it.record["captured_at_us"]) / 1e6))  # type: ignore[index]
        m.messages.labels("ok").inc(len(c.ok))
        m.messages.labels("dlq").inc(len(c.dead))
        for it in c.dead:
            m.dlq.labels(it.error[0]).inc()  # type: ignore[index]
        m.crops.inc(c.n_crops)
        m.batch_crops.observe(c.n_crops)
        m.batch_messages.observe(len(c.items))
        m.identities.set(self.matcher.gallery_size())
        m.mirror_lag.set(getattr(self.vectors, "mirror_lag", lambda: 0)())
        for kind in ("matched", "new", "merged"):
            m.assignments.labels(kind)  # make the series exist
        self._tick_rate(c.n_crops)
        self.batches += 1
        self.last_batch_at = time.monotonic()

    def _decode_crops(self, it: Item) -> list[DecodedCrop] | InvalidFrame:
        try:
            return decode_crops(it.record, self.cfg.validation)  # type: ignore[arg-type]
        except InvalidFrame as exc:
            return exc

    def _resolve_frame(self, rec: dict[str, Any], crops: list[DecodedCrop], batch: BatchWrite
                       ) -> tuple[dict[str, Any], list[TrackState], list[tuple[dict[str, Any], TrackState | None]]]:
        """The track of each embedded crop and of each person box of one frame; its ended tracks closed."""
        dev, cam, at_us, fi = rec["device_id"], rec["camera_id"], rec["captured_at_us"], rec["frame_index"]
        batch.merge_row(batch.cameras, (dev, cam), {
            "device_id": dev, "camera_id": cam, "frame_width": rec["frame_width"],
            "frame_height": rec["frame_height"], "first_frame_at_us": at_us, "last_frame_at_us": at_us,
            "last_frame_index": fi})
        track_for = self.matcher.track_for
        # A crop's track is also one of the frame's boxes: resolved once per frame (the same answer twice).
        mine = {c.track_id: track_for(dev, cam, c.track_id, at_us, fi, batch) for c in crops}
        crop_tracks = [mine[c.track_id] for c in crops]
        boxes = []
        for d in rec["detections"]:
            if d["class_id"] != 0:
                continue
            tid = d["track_id"]
            t = mine.get(tid) if tid >= 0 else None
            boxes.append((d, t if t is not None or tid < 0 else track_for(dev, cam, tid, at_us, fi, batch)))
        for tid in rec["ended_track_ids"]:
            self.matcher.end_track(dev, cam, tid, at_us, batch)
        return rec, crop_tracks, boxes

    def _frame_result(self, rec: dict[str, Any], boxes: list[tuple[dict[str, Any], TrackState | None]],
                      batch: BatchWrite, now_us: int) -> dict[str, Any]:
        """Every box becomes a sighting (per track and time bucket) and a person in the output message."""
        dev, cam, at_us = rec["device_id"], rec["camera_id"], rec["captured_at_us"]
        people = []
        bucket = at_us - at_us % self.bucket_us
        for d, t in boxes:
            xyxy = (d["x1"], d["y1"], d["x2"], d["y2"])
            if t is None:
                people.append(results.person(-1, xyxy, None, 0.0, False, None))
                continue
            batch.add_sighting(t.track_uid, bucket, dev, cam, t.global_id, at_us)
            people.append(results.person(d["track_id"], xyxy, t.global_id, t.similarity or 0.0, t.founded,
                                         t.male_probability))
        return results.reid_result(rec, people, self.embedder.model_id, now_us)

    # --- output and offsets ----------------------------------------------------------------
    def _dead_letters(self, dead: Sequence[Item]) -> list[Record]:
        """Each undecodable or invalid message as a dead-letter record (key, value), logged with its reason."""
        out: list[Record] = []
        for it in dead:
            assert it.error is not None
            msg = it.msg
            log.warning("dead letter", extra={"error_type": it.error[0], "reason": it.error[1],
                                              "partition": msg.partition(), "offset": msg.offset()})
            out.append((msg.key(), self.dlq_codec.encode({
                "source_topic": msg.topic(), "source_partition": msg.partition(), "source_offset": msg.offset(),
                "key": msg.key(), "value": msg.value(), "reason": it.error[1], "error_type": it.error[0],
                "consumer": self.instance, "failed_at_us": time.time_ns() // 1000})))
        return out

    def _store_offsets(self, items: Sequence[Item]) -> None:
        last: dict[tuple[str, int], int] = {}
        for it in items:
            key = (it.msg.topic(), it.msg.partition())
            last[key] = max(last.get(key, -1), it.msg.offset())
        tps = [TopicPartition(t, p, off + 1) for (t, p), off in last.items()]
        try:
            self.consumer.store_offsets(offsets=tps)
        except KafkaException as exc:  # partition revoked meanwhile: its new owner replays, idempotently
            log.warning("could not store offsets: %s", exc)

    def commit(self) -> None:
        """Synchronously commit stored offsets (tests and shutdown)."""
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                raise

    # --- metrics ---------------------------------------------------------------------------
    def _tick_rate(self, n: int) -> None:
        now = time.monotonic()
        self._rate.append((now, n))
        self._rate = [(t, k) for t, k in self._rate if now - t <= 10.0]
        span = max(now - self._rate[0][0], 1.0)
        self.metrics.crops_per_s.set(sum(k for _, k in self._rate) / span)

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_at < 5.0 or not self._assigned:
            return
        self._lag_at = now
        try:
            positions = self.consumer.position(self._assigned)
            for tp in positions:
                # Cached: the high watermark of the last fetch response, no broker round trip. Asking the broker
                # (up to 1 s per partition) stalled the loop for seconds at a time when the broker was busy.
                _lo, hi = self.consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and hi >= 0:
                    self.metrics.lag.labels(str(tp.partition)).set(max(0, hi - tp.offset))
        except KafkaException as exc:
            log.debug("lag refresh failed: %s", exc)


def _finite(prep: Prepared) -> Prepared:
    """A non-finite vector (:func:`server.intake.check_finite`) on the GPU JPEG path redoes the batch on the CPU
    decode path; on that path the batch fails and is redelivered (nothing stored, offsets not committed)."""
    check_finite(prep.embs)
    return prep


def _batch_wait_s(first: Message, max_wait_s: float) -> float:
    """How long a batch may still wait for more messages after its first one: ``max_wait_s`` counted from
    when that message was produced, not from when this consumer got it. Under a backlog the first message
    is already old, so the batch takes what is queued and closes at once instead of adding the full wait
    to every message's latency. Never longer than ``max_wait_s`` (a producer clock running ahead)."""
    ts_type, ts_ms = first.timestamp()
    if ts_type == TIMESTAMP_NOT_AVAILABLE or ts_ms <= 0:
        return max_wait_s
    age = time.time() - ts_ms / 1000
    return min(max_wait_s, max(0.0, max_wait_s - age))


def _track_ids(rec: dict[str, Any] | None) -> set[int]:
    """Every local track id a frame mentions (boxes, crops, ended tracks)."""
    assert rec is not None
    ids = {d["track_id"] for d in rec["detections"] if d["track_id"] >= 0 and d["class_id"] == 0}
    ids.update(c["track_id"] for c in rec["crops"])
    ids.update(rec["ended_track_ids"])
    return ids


def run_forever(cfg: ServerConfig, stop: StopSignal, on_ready: Callable[[ReidConsumer], None] | None = None,
                consumer: ReidConsumer | None = None) -> None:
    """Run consumers until ``stop``: after a :class:`DeliveryFailed`, a fatal Kafka error or a dead vector mirror
    process (:class:`MirrorDied`: its queued changes are reconciled from SQL by the next start) a fresh consumer
    (matcher state reloaded from the analytics store, the models and metrics kept) takes over from the
    committed offsets after a backoff, as a process restart would, minus the model load. ``on_ready`` sees
    each consumer before it runs."""
    backoff = 1.0
    prev: ReidConsumer | None = None
    while not stop.is_set():
        if consumer is None:
            consumer = ReidConsumer(cfg, stop=stop, embedder=prev.embedder if prev else None,
                                    gender=prev.gender if prev else None, metrics=prev.metrics if prev else None)
        if on_ready:
            on_ready(consumer)
        started = time.monotonic()
        try:
            consumer.run()
            return
        except (DeliveryFailed, KafkaException, MirrorDied) as exc:
            if stop.is_set():
                return
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran a while: a new fault, not the same one again
            log.error("consumer failed, restarting from the committed offsets", extra={
                "error": str(exc)[:500], "backoff_s": backoff})
            prev, consumer = consumer, None
            stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)
