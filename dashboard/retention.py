"""Enforce the data retention an admin sets: delete analytics rows (and vectors) older than it.

Runs inside the dashboard process once at start and then every ``interval_s`` (a daemon thread),
and on demand from the Settings page or ``python -m dashboard retention``. The setting is read
fresh on every run, so a shorter period an admin saves takes effect at the next run (the Settings
page also runs it at once). Vectors: with a Qdrant server the identities deleted here are deleted
there too; a local-mode folder belongs to the running server (one process per folder), so there the
server's own ``identity.retention_s`` (default 24 h, shorter than any retention here) removes them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from dashboard import queries
from dashboard.config import DashboardConfig
from dashboard.privacy import load_settings

log = logging.getLogger(__name__)
DAY_US = 24 * 3600 * 1_000_000


@dataclass(frozen=True)
class RetentionRun:
    at_us: int
    retention_days: int
    report: queries.PurgeReport | None
    vectors: str
    error: str | None = None


def enforce(cfg: DashboardConfig, now_us: int | None = None) -> RetentionRun:
    """One retention pass with the saved settings; never raises (the error is in the result)."""
    now_us = now_us or int(time.time() * 1_000_000)
    try:
        settings = load_settings(cfg.settings_path, cfg.privacy)
    except ValueError as exc:
        return RetentionRun(now_us, cfg.privacy.retention_days, None, "", f"settings unreadable: {exc}")
    cutoff = now_us - settings.retention_days * DAY_US
    try:
        engine = queries.open_store(cfg.store_url)
    except queries.StoreUnavailable as exc:
        return RetentionRun(now_us, settings.retention_days, None, "", str(exc))
    try:
        report = queries.purge_before(engine, cutoff)
    except queries.StoreUnavailable as exc:
        return RetentionRun(now_us, settings.retention_days, None, "", str(exc))
    finally:
        engine.dispose()
    vectors = _delete_vectors(cfg, list(report.identity_ids))
    log.info("retention: deleted rows older than %d days", settings.retention_days,
             extra={"sightings": report.sightings, "tracks": report.tracks, "identities": report.identities,
                    "transitions": report.transitions})
    return RetentionRun(now_us, settings.retention_days, report, vectors)


def _delete_vectors(cfg: DashboardConfig, global_ids: list[str]) -> str:
    if not global_ids:
        return "no identity left the store, so no vector to delete"
    if not cfg.qdrant.url:
        return (f"{len(global_ids)} identities removed with their vectors in the store's prototypes table; the "
                f"server's local Qdrant mirror (locked by the server) drops them at its next start-up "
                f"reconciliation or by its identity retention")
    try:
        from qdrant_client import QdrantClient, models

        key = os.environ.get(cfg.qdrant.api_key_env) if cfg.qdrant.api_key_env else None
        client = QdrantClient(url=cfg.qdrant.url, api_key=key, timeout=10)
        wanted = cfg.qdrant.collection
        names = [c.name for c in client.get_collections().collections
                 if (c.name == wanted if wanted else c.name.startswith("reid_"))]
        for name in names:
            for i in range(0, len(global_ids), 500):
                flt = models.Filter(must=[models.FieldCondition(
                    key="global_id", match=models.MatchAny(any=global_ids[i:i + 500]))])
                client.delete(name, points_selector=models.FilterSelector(filter=flt))
        client.close()
        return f"deleted the vectors of {len(global_ids)} identities from {', '.join(names) or 'no collection'}"
    except Exception as exc:
        return f"could not delete vectors from Qdrant at {cfg.qdrant.url}: {exc}"


class RetentionWorker:
    """Runs :func:`enforce` at start and every ``interval_s`` until stopped; keeps the last result."""

    def __init__(self, cfg: DashboardConfig, interval_s: float = 3600.0) -> None:
        self.cfg = cfg
        self.interval_s = interval_s
        self.last: RetentionRun | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-retention", daemon=True)

    def start(self) -> RetentionWorker:
        self._thread.start()
        return self

    def run_now(self) -> RetentionRun:
        self.last = enforce(self.cfg)
        return self.last

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_now()
            if self.last and self.last.error:
                log.warning("retention run failed: %s", self.last.error)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
