"""Desired/reported config per device (like AWS IoT shadows), durable in SQLite.

The admin sets desired settings (``python -m fleet config set``); each change gets the next
version and is marked unpublished until the manager has published it retained on
``config/desired``. The device answers on ``config/reported`` with the version it applied, or a
rejection with the reasons; ``in_sync`` says whether the two agree.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fleet.db import FleetDB
from schemas.mqtt import DesiredConfig, ReportedConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS shadows (
    device_id TEXT PRIMARY KEY,
    desired_version INTEGER NOT NULL DEFAULT 0,
    desired TEXT NOT NULL DEFAULT '{}',
    desired_at REAL,
    published INTEGER NOT NULL DEFAULT 1,
    reported_version INTEGER NOT NULL DEFAULT 0,
    reported_status TEXT NOT NULL DEFAULT '',
    applied_version INTEGER NOT NULL DEFAULT 0,
    reported TEXT NOT NULL DEFAULT '{}',
    reported_error TEXT NOT NULL DEFAULT '',
    reported_problems TEXT NOT NULL DEFAULT '[]',
    reported_at REAL
);
"""


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{dotted}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


class Shadows:
    def __init__(self, db: FleetDB) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def set_desired(self, device_id: str, changes: dict[str, Any], *, replace: bool = False) -> DesiredConfig:
        """Merge dotted-key ``changes`` into the device's desired settings (or replace them); bump the version.

        The base is the last desired settings, or what the device last reported in force, so
        keys the admin did not touch keep their values.
        """
        with self.db.tx() as c:
            row = c.execute("SELECT * FROM shadows WHERE device_id=?", (device_id,)).fetchone()
            if row is None:
                c.execute("INSERT INTO shadows(device_id) VALUES (?)", (device_id,))
                row = c.execute("SELECT * FROM shadows WHERE device_id=?", (device_id,)).fetchone()
            base: dict[str, Any] = {}
            if not replace:
                base = json.loads(row["desired"]) if row["desired_version"] else json.loads(row["reported"])
            for key, value in changes.items():
                set_path(base, key, value)
            version = max(row["desired_version"], row["reported_version"]) + 1
            desired = DesiredConfig(version=version, settings=base)
            c.execute("UPDATE shadows SET desired_version=?, desired=?, desired_at=?, published=0 WHERE device_id=?",
                      (version, json.dumps(base), desired.issued_at, device_id))
        return desired

    def unpublished(self) -> list[tuple[str, DesiredConfig]]:
        rows = self.db.query("SELECT device_id, desired_version, desired, desired_at FROM shadows "
                             "WHERE published=0 AND desired_version>0")
        return [(r["device_id"], DesiredConfig(version=r["desired_version"], settings=json.loads(r["desired"]),
                                               issued_at=r["desired_at"] or time.time())) for r in rows]

    def all_desired(self) -> list[tuple[str, DesiredConfig]]:
        rows = self.db.query("SELECT device_id, desired_version, desired, desired_at FROM shadows "
                             "WHERE desired_version>0")
        return [(r["device_id"], DesiredConfig(version=r["desired_version"], settings=json.loads(r["desired"]),
                                               issued_at=r["desired_at"] or time.time())) for r in rows]

    def mark_published(self, device_id: str, version: int) -> None:
        with self.db.tx() as c:
            c.execute("UPDATE shadows SET published=1 WHERE device_id=? AND desired_version=?", (device_id, version))

    def on_reported(self, device_id: str, r: ReportedConfig) -> None:
        with self.db.tx() as c:
            c.execute("INSERT OR IGNORE INTO shadows(device_id) VALUES (?)", (device_id,))
            c.execute("UPDATE shadows SET reported_version=?, reported_status=?, applied_version=?, reported=?, "
                      "reported_error=?, reported_problems=?, reported_at=? WHERE device_id=?",
                      (r.version, r.status, r.applied_version, json.dumps(r.settings), r.error,
                       json.dumps(r.problems), r.ts, device_id))

    def get(self, device_id: str) -> dict[str, Any]:
        rows = self.db.query("SELECT * FROM shadows WHERE device_id=?", (device_id,))
        if not rows:
            return {"device_id": device_id, "desired_version": 0, "desired": {}, "reported_version": 0,
                    "reported_status": "", "applied_version": 0, "reported": {}, "reported_error": "",
                    "reported_problems": [], "in_sync": True, "published": True}
        d = dict(rows[0])
        d["desired"] = json.loads(d["desired"])
        d["reported"] = json.loads(d["reported"])
        d["reported_problems"] = json.loads(d["reported_problems"])
        d["published"] = bool(d["published"])
        d["in_sync"] = d["desired_version"] == 0 or (d["applied_version"] == d["desired_version"])
        return d
