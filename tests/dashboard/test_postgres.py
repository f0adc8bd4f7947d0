"""The same queries on PostgreSQL: a throwaway cluster (Debian's postgresql binaries) on a loopback port,
filled by the server's store with the hand-made shop hour, must give the numbers SQLite gives."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dashboard import queries
from tests.dashboard.conftest import NOW, NOW_US, TINY_TRACKS, US, at, gid, write_tracks

pytestmark = pytest.mark.integration
BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _as_db_user(cmd: list[str]) -> list[str]:
    """initdb refuses root: run the cluster as the Debian 'postgres' user when we are root."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="PostgreSQL driver not installed (pip install .[postgres])")
    if not BIN or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    from common.tansu import free_port

    root = Path(tempfile.mkdtemp(prefix="reidfleet-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    subprocess.run(_as_db_user([f"{BIN[-1]}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True, cwd=root)
    subprocess.run(_as_db_user([f"{BIN[-1]}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                                f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True, cwd=root)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_db_user([f"{BIN[-1]}/pg_ctl", "-D", str(data), "-m", "fast", "stop"]),
                       capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def test_queries_on_postgresql(pg_url: str) -> None:
    write_tracks(pg_url, TINY_TRACKS, NOW_US)
    engine = queries.open_store(pg_url)
    try:
        assert queries.presence_now(engine, NOW_US).set_index("camera_id")["people"].to_dict() == {
            "aisle": 1, "checkout": 1, "entrance": 1}
        start, _ = queries.local_day_bounds(NOW.date(), "UTC")
        assert queries.unique_people(engine, start, NOW_US + 1) == 3
        cmp = queries.footfall_vs_yesterday(engine, NOW_US, "UTC")
        assert (cmp.this_hour, cmp.same_hour_yesterday) == (3, 1)
        hourly = queries.hourly_people(engine, start - 24 * 3600 * US, NOW_US + 1, "UTC")
        assert hourly["visitors"].tolist() == [2, 3]
        moves = queries.transition_counts(engine, at(0, 0, days_ago=1), NOW_US + 1)
        assert sorted(map(tuple, moves[["source", "target", "people"]].values.tolist())) == [
            ("aisle", "checkout", 1), ("entrance", "aisle", 1)]
        tracks = queries.tracks_between(engine, at(0, 0, days_ago=1), NOW_US + 1)
        assert queries.gender_split(tracks).set_index("gender")["people"].to_dict() == {
            "female": 1, "male": 1, "unknown": 2}
        assert queries.identity_sightings(engine, [gid("A")], "UTC")["camera_id"].tolist() == [
            "checkout", "aisle", "entrance"]
        report = queries.purge_before(engine, NOW_US + 1)  # everything is older than "now + 1 us"
        assert report.identities == 4 and queries.tracks_between(engine, 0, NOW_US * 2).empty
    finally:
        engine.dispose()
