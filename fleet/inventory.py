"""Device inventory built from retained status and telemetry: who is alive and what it runs."""

from __future__ import annotations

import json
import time
from typing import Any

from fleet.db import FleetDB
from schemas.mqtt import DeviceStatus, Telemetry, check_device_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    grp TEXT NOT NULL DEFAULT 'default',
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'never',      -- never | online | offline
    state_reason TEXT NOT NULL DEFAULT '',
    status_ts REAL,
    last_seen REAL,
    agent_version TEXT NOT NULL DEFAULT '',
    model_id TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    model_slot TEXT NOT NULL DEFAULT '',
    config_version INTEGER NOT NULL DEFAULT 0,
    health TEXT NOT NULL DEFAULT '',
    health_detail TEXT NOT NULL DEFAULT '',
    telemetry TEXT NOT NULL DEFAULT '{}'
);
"""


class Inventory:
    def __init__(self, db: FleetDB) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def add(self, device_id: str, group: str = "default") -> None:
        check_device_id(device_id)
        with self.db.tx() as c:
            c.execute("INSERT INTO devices(device_id, grp, created_at) VALUES (?,?,?) "
                      "ON CONFLICT(device_id) DO UPDATE SET grp=excluded.grp, revoked=0",
                      (device_id, group, time.time()))

    def revoke(self, device_id: str) -> bool:
        with self.db.tx() as c:
            return c.execute("UPDATE devices SET revoked=1 WHERE device_id=?", (device_id,)).rowcount > 0

    def exists(self, device_id: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM devices WHERE device_id=?", (device_id,)))

    def on_status(self, device_id: str, status: DeviceStatus) -> None:
        now = time.time()
        with self.db.tx() as c:
            c.execute("INSERT OR IGNORE INTO devices(device_id, created_at) VALUES (?,?)", (device_id, now))
            c.execute(
                "UPDATE devices SET state=?, state_reason=?, status_ts=?, last_seen=CASE WHEN ?='online' THEN ? "
                "ELSE last_seen END, agent_version=CASE WHEN ?='' THEN agent_version ELSE ? END, "
                "model_id=CASE WHEN ?='' THEN model_id ELSE ? END, "
                "model_version=CASE WHEN ?='' THEN model_version ELSE ? END WHERE device_id=?",
                (status.state, status.reason, status.ts or now, status.state, now, status.agent_version,
                 status.agent_version, status.model_id, status.model_id, status.model_version, status.model_version,
                 device_id))

    def on_telemetry(self, device_id: str, t: Telemetry) -> None:
        now = time.time()
        with self.db.tx() as c:
            c.execute("INSERT OR IGNORE INTO devices(device_id, created_at) VALUES (?,?)", (device_id, now))
            c.execute(
                "UPDATE devices SET last_seen=?, model_id=?, model_version=?, model_slot=?, config_version=?, "
                "health=?, health_detail=?, telemetry=? WHERE device_id=?",
                (now, t.model_id, t.model_version, t.model_slot, t.config_version, t.health, t.health_detail,
                 t.model_dump_json(), device_id))

    def on_model(self, device_id: str, model_id: str, version: str) -> None:
        with self.db.tx() as c:
            c.execute("UPDATE devices SET model_id=?, model_version=? WHERE device_id=?",
                      (model_id, version, device_id))

    def get(self, device_id: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM devices WHERE device_id=?", (device_id,))
        return self._row(rows[0]) if rows else None

    def list(self, group: str | None = None, include_revoked: bool = False) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM devices WHERE 1=1", []
        if group:
            sql += " AND grp=?"
            args.append(group)
        if not include_revoked:
            sql += " AND revoked=0"
        return [self._row(r) for r in self.db.query(sql + " ORDER BY device_id", tuple(args))]

    @staticmethod
    def _row(r: Any) -> dict[str, Any]:
        d = dict(r)
        d["group"] = d.pop("grp")
        d["telemetry"] = json.loads(d["telemetry"] or "{}")
        d["revoked"] = bool(d["revoked"])
        return d
