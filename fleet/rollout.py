"""Rollout campaigns: a canary wave, then growing waves, each only after the last was healthy.

Everything is in SQLite and every step is idempotent, so ``fleet serve`` can be killed and
restarted mid-campaign and carries on where it was (jobs already sent are re-published with the
same job id; agents answer a finished job id from their journal instead of running it again).

A wave is done when each of its devices reported a final state (or timed out); after an optional
soak the devices must still be online and healthy. The campaign aborts when the failure ratio over
finished devices crosses ``max_failure_ratio`` (like AWS IoT Jobs' abort threshold; a failed
canary alone aborts at the default 10 %). Aborting reverts the devices this campaign upgraded to
the model they ran before, which is still in their inactive A/B slot, so no download is needed.

Device states: pending -> sent -> succeeded | failed | rolled_back | timed_out;
on abort: pending -> skipped, succeeded -> reverting -> reverted | revert_failed.
Campaign states: running, paused, succeeded, aborting, aborted.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from fleet.db import FleetDB
from fleet.inventory import Inventory
from schemas.mqtt import ArtifactRef, HealthCheckSpec, ModelRef, OtaJob, OtaProgress

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    campaign_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    state TEXT NOT NULL,
    target TEXT NOT NULL,
    artifact TEXT NOT NULL,
    health TEXT NOT NULL,
    waves TEXT NOT NULL,
    current_wave INTEGER NOT NULL DEFAULT -1,
    wave_done_at REAL,
    max_failure_ratio REAL NOT NULL,
    min_finished INTEGER NOT NULL,
    device_timeout_s REAL NOT NULL,
    soak_s REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS campaign_devices (
    campaign_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    step TEXT NOT NULL DEFAULT '',
    job_id TEXT NOT NULL DEFAULT '',
    previous_model_id TEXT NOT NULL DEFAULT '',
    previous_version TEXT NOT NULL DEFAULT '',
    sent_at REAL,
    finished_at REAL,
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (campaign_id, device_id)
);
CREATE INDEX IF NOT EXISTS campaign_devices_job ON campaign_devices(job_id);
"""

ACTIVE = ("running", "paused", "aborting")
FAILED_STATES = ("failed", "rolled_back", "timed_out")
FINAL_INSTALL = ("succeeded", *FAILED_STATES)

Publish = Callable[[str, OtaJob], None]


class RolloutError(ValueError):
    pass


def plan_waves(n: int, canary_percent: float = 5.0, growth: float = 2.0) -> list[int]:
    """Wave sizes: a canary of ``canary_percent`` (at least one device), then each wave ``growth`` x the last.

    20 devices at 5 % / x2 -> [1, 2, 4, 8, 5].
    """
    if n <= 0:
        return []
    sizes = [max(1, math.ceil(n * canary_percent / 100))]
    while sum(sizes) < n:
        sizes.append(min(n - sum(sizes), max(1, math.ceil(sizes[-1] * growth))))
    return sizes


class RolloutEngine:
    def __init__(self, db: FleetDB, inventory: Inventory, publish: Publish, clock: Callable[[], float] = time.time):
        self.db = db
        self.inventory = inventory
        self.publish = publish
        self.clock = clock
        db.executescript(SCHEMA)

    # --- admin commands (CLI) --------------------------------------------------------------------
    def start(self, artifact: ArtifactRef, *, group: str | None = None, devices: list[str] | None = None,
              canary_percent: float = 5.0, growth: float = 2.0, max_failure_percent: float = 10.0,
              min_finished: int = 1, device_timeout_s: float = 900.0, soak_s: float = 0.0,
              health: HealthCheckSpec | None = None) -> str:
        if not artifact.url:
            raise RolloutError("the artifact has no download URL")
        pool = self.inventory.list(group=group)
        if devices:
            known = {d["device_id"] for d in pool}
            missing = sorted(set(devices) - known)
            if missing:
                raise RolloutError(f"unknown or revoked devices: {', '.join(missing)}")
            pool = [d for d in pool if d["device_id"] in set(devices)]
        if not pool:
            raise RolloutError(f"no devices to update (group {group!r})" if group else "no devices registered")
        busy = self.db.query(
            f"SELECT cd.device_id, c.campaign_id FROM campaign_devices cd JOIN campaigns c USING(campaign_id) "
            f"WHERE c.state IN ({','.join('?' * len(ACTIVE))})", ACTIVE)
        clash = sorted({r["device_id"] for r in busy} & {d["device_id"] for d in pool})
        if clash:
            raise RolloutError(f"devices already in an active campaign ({busy[0]['campaign_id']}): "
                               f"{', '.join(clash[:10])}; pause/abort it first")
        # online, healthy devices first: the canary should tell about the model, not about a dead box
        pool.sort(key=lambda d: (d["state"] != "online", d["health"] not in ("ok", ""), d["device_id"]))
        waves = plan_waves(len(pool), canary_percent, growth)
        campaign_id = time.strftime("r%Y%m%d-%H%M%S-", time.gmtime(self.clock())) + uuid.uuid4().hex[:6]
        now = self.clock()
        with self.db.tx() as c:
            c.execute("INSERT INTO campaigns(campaign_id, created_at, updated_at, state, target, artifact, health, "
                      "waves, max_failure_ratio, min_finished, device_timeout_s, soak_s) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (campaign_id, now, now, "running", group or ("devices" if devices else "all"),
                       artifact.model_dump_json(), (health or HealthCheckSpec()).model_dump_json(), json.dumps(waves),
                       max_failure_percent / 100, min_finished, device_timeout_s, soak_s))
            i = 0
            for wave, size in enumerate(waves):
                for d in pool[i:i + size]:
                    c.execute("INSERT INTO campaign_devices(campaign_id, device_id, wave, previous_model_id, "
                              "previous_version) VALUES (?,?,?,?,?)",
                              (campaign_id, d["device_id"], wave, d["model_id"], d["model_version"]))
                i += size
        log.info("campaign %s: %s %s to %d devices in waves %s", campaign_id, artifact.model_id, artifact.version,
                 len(pool), waves)
        return campaign_id

    def _set_state(self, campaign_id: str, allowed: tuple[str, ...], new: str, reason: str = "",
                   verb: str = "") -> None:
        with self.db.tx() as c:
            row = c.execute("SELECT state FROM campaigns WHERE campaign_id=?", (campaign_id,)).fetchone()
            if row is None:
                raise RolloutError(f"no campaign {campaign_id!r}")
            if row["state"] not in allowed:
                raise RolloutError(f"cannot {verb or new} campaign {campaign_id}: it is {row['state']}, "
                                   f"{verb or new} needs {' or '.join(allowed)}")
            c.execute("UPDATE campaigns SET state=?, reason=CASE WHEN ?='' THEN reason ELSE ? END, updated_at=? "
                      "WHERE campaign_id=?", (new, reason, reason, self.clock(), campaign_id))

    def pause(self, campaign_id: str) -> None:
        self._set_state(campaign_id, ("running",), "paused", verb="pause")

    def resume(self, campaign_id: str) -> None:
        self._set_state(campaign_id, ("paused",), "running", verb="resume")

    def abort(self, campaign_id: str, reason: str = "aborted by admin") -> None:
        self._set_state(campaign_id, ("running", "paused"), "aborting", reason, verb="abort")

    # --- device reports --------------------------------------------------------------------------
    def on_progress(self, device_id: str, p: OtaProgress) -> None:
        rows = self.db.query("SELECT campaign_id, state, job_id FROM campaign_devices WHERE device_id=? AND "
                             "(job_id=? OR job_id=?)", (device_id, p.job_id, p.job_id.removesuffix("-revert")))
        if not rows:
            return
        row = rows[0]
        revert = p.job_id.endswith("-revert")
        now = self.clock()
        with self.db.tx() as c:
            if not p.terminal:
                c.execute("UPDATE campaign_devices SET step=? WHERE campaign_id=? AND device_id=?",
                          (p.state, row["campaign_id"], device_id))
                return
            if revert:
                if row["state"] != "reverting":
                    return
                new = "reverted" if p.state == "succeeded" else "revert_failed"
            else:
                if row["state"] not in ("sent", "timed_out"):
                    return
                new = p.state
            c.execute("UPDATE campaign_devices SET state=?, step=?, error=?, finished_at=? WHERE campaign_id=? AND "
                      "device_id=?", (new, p.state, p.error, now, row["campaign_id"], device_id))
            c.execute("UPDATE campaigns SET updated_at=? WHERE campaign_id=?", (now, row["campaign_id"]))
        log.info("campaign %s: %s %s", row["campaign_id"], device_id, new,
                 extra={"error": p.error} if p.error else None)

    # --- the state machine -----------------------------------------------------------------------
    def _job(self, camp: dict[str, Any], device_id: str) -> OtaJob:
        return OtaJob(job_id=f"{camp['campaign_id']}-{device_id}", campaign_id=camp["campaign_id"],
                      artifact=ArtifactRef.model_validate_json(camp["artifact"]),
                      health=HealthCheckSpec.model_validate_json(camp["health"]))

    def _revert_job(self, camp: dict[str, Any], dev: dict[str, Any]) -> OtaJob:
        return OtaJob(job_id=f"{camp['campaign_id']}-{dev['device_id']}-revert", campaign_id=camp["campaign_id"],
                      action="revert", revert_to=ModelRef(model_id=dev["previous_model_id"],
                                                          version=dev["previous_version"]),
                      health=HealthCheckSpec.model_validate_json(camp["health"]))

    def republish_in_flight(self) -> int:
        """After a manager restart: publish again every job that may not have reached the broker."""
        n = 0
        for camp in self._campaigns(ACTIVE):
            for dev in self._devices(camp["campaign_id"]):
                if dev["state"] == "sent":
                    self.publish(dev["device_id"], self._job(camp, dev["device_id"]))
                    n += 1
                elif dev["state"] == "reverting":
                    self.publish(dev["device_id"], self._revert_job(camp, dev))
                    n += 1
        return n

    def _campaigns(self, states: tuple[str, ...]) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query(
            f"SELECT * FROM campaigns WHERE state IN ({','.join('?' * len(states))}) ORDER BY created_at", states)]

    def _devices(self, campaign_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query(
            "SELECT * FROM campaign_devices WHERE campaign_id=? ORDER BY wave, device_id", (campaign_id,))]

    def _update_device(self, campaign_id: str, device_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.db.tx() as c:
            c.execute(f"UPDATE campaign_devices SET {cols} WHERE campaign_id=? AND device_id=?",
                      (*fields.values(), campaign_id, device_id))

    def _update_campaign(self, campaign_id: str, **fields: Any) -> None:
        fields["updated_at"] = self.clock()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.db.tx() as c:
            c.execute(f"UPDATE campaigns SET {cols} WHERE campaign_id=?", (*fields.values(), campaign_id))

    def tick(self) -> None:
        for camp in self._campaigns(ACTIVE):
            try:
                if camp["state"] == "aborting":
                    self._tick_abort(camp)
                else:
                    self._tick_running(camp)
            except Exception:
                log.exception("campaign %s: tick failed", camp["campaign_id"])

    def _send(self, camp: dict[str, Any], dev: dict[str, Any]) -> None:
        # durable first, then publish: a crash in between is healed by republish_in_flight()
        self._update_device(camp["campaign_id"], dev["device_id"], state="sent", step="sent",
                            job_id=f"{camp['campaign_id']}-{dev['device_id']}", sent_at=self.clock())
        self.publish(dev["device_id"], self._job(camp, dev["device_id"]))

    def _tick_running(self, camp: dict[str, Any]) -> None:
        cid, now = camp["campaign_id"], self.clock()
        devices = self._devices(cid)
        for dev in devices:  # time-outs
            if dev["state"] == "sent" and dev["sent_at"] and now - dev["sent_at"] > camp["device_timeout_s"]:
                self._update_device(cid, dev["device_id"], state="timed_out", finished_at=now,
                                    error=f"no final report within {camp['device_timeout_s']:.0f} s")
                dev["state"] = "timed_out"
        finished = [d for d in devices if d["state"] in FINAL_INSTALL]
        failed = [d for d in finished if d["state"] in FAILED_STATES]
        if len(finished) >= camp["min_finished"] and finished and \
                len(failed) / len(finished) > camp["max_failure_ratio"]:
            reason = (f"{len(failed)} of {len(finished)} finished devices failed (threshold "
                      f"{camp['max_failure_ratio']:.0%}): " + "; ".join(f"{d['device_id']}: {d['error'] or d['state']}"
                                                                        for d in failed[:3]))
            log.warning("campaign %s aborting: %s", cid, reason)
            self._update_campaign(cid, state="aborting", reason=reason)
            return
        if camp["state"] == "paused":
            return
        wave = camp["current_wave"]
        in_wave = [d for d in devices if d["wave"] == wave]
        if wave >= 0 and any(d["state"] not in FINAL_INSTALL for d in in_wave):
            return  # wave still running
        if wave >= 0 and camp["soak_s"] > 0:
            if camp["wave_done_at"] is None:
                self._update_campaign(cid, wave_done_at=now)
                return
            if now - camp["wave_done_at"] < camp["soak_s"]:
                return
            unhealthy = False
            for d in in_wave:
                if d["state"] != "succeeded":
                    continue
                inv = self.inventory.get(d["device_id"]) or {}
                if inv.get("state") != "online" or inv.get("health") == "error":
                    self._update_device(cid, d["device_id"], state="failed",
                                        error=f"unhealthy after the update: {inv.get('state')} {inv.get('health')} "
                                              f"{inv.get('health_detail', '')}".strip())
                    unhealthy = True
            if unhealthy:
                self._update_campaign(cid, wave_done_at=None)
                return  # re-evaluated (threshold) on the next tick
        nxt = wave + 1
        waves = json.loads(camp["waves"])
        if nxt >= len(waves):
            self._update_campaign(cid, state="succeeded", finished_at=now,
                                  reason=f"{len([d for d in devices if d['state'] == 'succeeded'])} of "
                                         f"{len(devices)} devices updated")
            log.info("campaign %s succeeded", cid)
            return
        self._update_campaign(cid, current_wave=nxt, wave_done_at=None)
        log.info("campaign %s: starting wave %d of %d (%d devices)", cid, nxt + 1, len(waves), waves[nxt])
        for d in devices:
            if d["wave"] == nxt and d["state"] == "pending":
                self._send(camp, d)

    def _tick_abort(self, camp: dict[str, Any]) -> None:
        cid, now = camp["campaign_id"], self.clock()
        waiting = False
        for d in self._devices(cid):
            if d["state"] == "pending":
                self._update_device(cid, d["device_id"], state="skipped")
            elif d["state"] == "sent":
                if d["sent_at"] and now - d["sent_at"] > camp["device_timeout_s"]:
                    self._update_device(cid, d["device_id"], state="timed_out", finished_at=now)
                else:
                    waiting = True  # let the running install finish, then revert it
            elif d["state"] == "succeeded":
                art = ArtifactRef.model_validate_json(camp["artifact"])
                same = (d["previous_model_id"], d["previous_version"]) == (art.model_id, art.version)
                if not d["previous_model_id"] or same:
                    self._update_device(cid, d["device_id"], state="kept",
                                        error="nothing to revert to" if not same else "")
                    continue
                self._update_device(cid, d["device_id"], state="reverting", step="sent", sent_at=now)
                self.publish(d["device_id"], self._revert_job(camp, d))
                waiting = True
            elif d["state"] == "reverting":
                if d["sent_at"] and now - d["sent_at"] > camp["device_timeout_s"]:
                    self._update_device(cid, d["device_id"], state="revert_failed", error="revert timed out")
                else:
                    waiting = True
        if not waiting:
            self._update_campaign(cid, state="aborted", finished_at=now)
            log.warning("campaign %s aborted", cid)

    # --- reading ---------------------------------------------------------------------------------
    def status(self, campaign_id: str | None = None) -> dict[str, Any]:
        if campaign_id is None:
            rows = self.db.query("SELECT campaign_id FROM campaigns ORDER BY created_at DESC LIMIT 1")
            if not rows:
                raise RolloutError("no campaigns yet")
            campaign_id = rows[0]["campaign_id"]
        rows = self.db.query("SELECT * FROM campaigns WHERE campaign_id=?", (campaign_id,))
        if not rows:
            raise RolloutError(f"no campaign {campaign_id!r}")
        camp = dict(rows[0])
        camp["artifact"] = json.loads(camp["artifact"])
        camp["health"] = json.loads(camp["health"])
        camp["waves"] = json.loads(camp["waves"])
        devices = self._devices(campaign_id)
        counts: dict[str, int] = {}
        for d in devices:
            counts[d["state"]] = counts.get(d["state"], 0) + 1
        camp["counts"] = counts
        camp["devices"] = devices
        return camp

    def list(self) -> list[dict[str, Any]]:
        return [self.status(r["campaign_id"]) for r in
                self.db.query("SELECT campaign_id FROM campaigns ORDER BY created_at DESC")]
