"""Where a batch's results go: reid_output and dead letters, delivered before the batch counts as done.

One class, used by the consumer's commit thread and by the commit process (server/writer.py) alike, so a
broker outage behaves the same in both: messages never time out (``message.timeout.ms: 0``), the caller
waits for the broker with a health entry and a log line every 10 s, and only a delivery the broker
refuses (not merely delays) fails the batch with :class:`DeliveryFailed`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from common.kafka import producer_config
from server import results
from server.config import KafkaSettings

log = logging.getLogger(__name__)

Record = tuple[bytes | None, bytes]  # (key, value)
Result = tuple[bytes, dict[str, Any]]  # (key, reid_result record): encoded here, off the matcher's thread


class DeliveryFailed(RuntimeError):
    """A batch's results or dead letters were refused (not merely delayed) by the broker, or the server was
    stopped while they waited: its offsets were not stored, so the batch is redelivered. :func:`run_forever`
    starts a fresh consumer on it (state reloaded from the analytics store) instead of exiting."""


class ResultSink:
    def __init__(self, k: KafkaSettings, stopped: Callable[[], bool],
                 on_wait: Callable[[float | None], None] | None = None) -> None:
        self.k = k
        self._stopped = stopped
        self._on_wait = on_wait
        self.waiting_since: float | None = None  # results held by a broker outage (health shows it)
        self._errors: list[str] = []
        self.producer = Producer(producer_config(k.bootstrap, k.client_id + "-out", **{
            # Results wait for the broker as long as it is away (the input cannot be fetched meanwhile either):
            # no timeout turns a long outage into a failed batch. Order across retries comes from idempotence
            # (up to 5 requests in flight); a batch that still fails is purged and replayed (DeliveryFailed).
            "message.timeout.ms": 0,
            **k.extra}))

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def _produce_one(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._delivered)
                self.producer.poll(0)
                return
            except BufferError:
                self.producer.poll(0.1)  # local queue full: let deliveries drain

    def _set_waiting(self, since: float | None) -> None:
        if since != self.waiting_since:
            self.waiting_since = since
            if self._on_wait is not None:
                self._on_wait(since)

    def deliver(self, outputs: Sequence[Result], dead: Sequence[Record]) -> None:
        """Encode and produce, then wait until every message is acknowledged; raises :class:`DeliveryFailed`."""
        if self.k.produce_results:
            for key, record in outputs:
                self._produce_one(self.k.output_topic, key, results.encode(record))
        for key, value in dead:
            self._produce_one(self.k.dlq_topic, key, value)
        remaining = self.producer.flush(1.0)
        started = warned = time.monotonic()
        while remaining and not self._errors and not self._stopped():
            # Broker away: wait for it (messages never time out), saying so in health and the log.
            self._set_waiting(started)
            if time.monotonic() - warned >= 10:
                warned = time.monotonic()
                log.warning("results waiting for the broker", extra={"undelivered": remaining,
                                                                     "waiting_s": round(warned - started)})
            remaining = self.producer.flush(1.0)
        self._set_waiting(None)
        if remaining or self._errors:
            errs, self._errors = self._errors[:5], []
            # Offsets are not stored: the batch will be redelivered and rewritten idempotently.
            raise DeliveryFailed(f"could not deliver results/dead letters ({remaining} undelivered): {errs}")

    def close(self) -> None:
        if self.producer.flush(10):
            # Undelivered results of a batch whose offsets were never stored: it is redelivered to whoever
            # consumes next. Dropped here so a late delivery can never land after that replay's results.
            self.producer.purge()
            self.producer.flush(0)
