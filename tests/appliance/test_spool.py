"""The on-disk spool: order, restart replay, acknowledgement cursor, torn writes, size cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import SpoolConfig
from appliance.publish import Spool, SpoolError

KB = 1024


def _spool(path: Path, **kw: object) -> Spool:
    cfg = SpoolConfig(dir=path, **{"max_bytes": 1024 * KB, "segment_bytes": 64 * KB, **kw})
    return Spool(cfg).open()


def _drain(sp: Spool) -> list[int]:
    out = []
    while (rec := sp.read_next()) is not None:
        out.append(rec.seq)
    return out


def test_order_and_ack_across_segments(tmp_path: Path) -> None:
    sp = _spool(tmp_path)
    payload = b"x" * 1000
    for i in range(300):  # ~300 KB: several 64 KB segments
        sp.append(i, b"dev", payload + i.to_bytes(4, "little"))
    assert len(list(tmp_path.glob("*.seg"))) >= 4
    assert sp.pending_messages == 300
    recs = []
    while (rec := sp.read_next()) is not None:
        recs.append(rec)
    assert [r.seq for r in recs] == list(range(300))
    assert recs[7].value[-4:] == (7).to_bytes(4, "little") and recs[7].key == b"dev"
    for r in recs[:150]:
        assert sp.ack(r.segment, r.end)
    assert not sp.ack(recs[3].segment, recs[3].end)  # stale ack is ignored
    assert sp.pending_messages == 150
    assert sp.caught_up() and not sp.empty
    sp.rewind()
    assert _drain(sp) == list(range(150, 300))
    for r in recs[150:]:
        sp.ack(r.segment, r.end)
    assert sp.empty and sp.reset_if_drained()
    assert not list(tmp_path.glob("*.seg"))
    sp.close()


def test_restart_replays_unacknowledged_only(tmp_path: Path) -> None:
    sp = _spool(tmp_path)
    for i in range(100):
        sp.append(i, b"k", b"v" * 2000)
    recs = [sp.read_next() for _ in range(40)]
    for r in recs:
        assert r is not None
        sp.ack(r.segment, r.end)
    sp.close()  # process stops (cursor persisted)

    sp2 = _spool(tmp_path)
    assert sp2.pending_messages == 60
    assert sp2.max_seq == 99
    assert _drain(sp2) == list(range(40, 100))
    sp2.close()


def test_torn_tail_is_cut_and_appends_continue(tmp_path: Path) -> None:
    sp = _spool(tmp_path)
    for i in range(10):
        sp.append(i, b"k", b"payload-%d" % i)
    sp.close()
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    with open(seg, "ab") as f:  # a crash in the middle of a write: half a header
        f.write(b"RS\x0b\x00\x00")
    sp2 = _spool(tmp_path)
    assert sp2.corrupt_bytes == 5
    assert sp2.pending_messages == 10
    sp2.append(10, b"k", b"after")
    assert _drain(sp2) == list(range(11))
    sp2.close()


def test_corrupt_record_is_reported_not_silently_replayed(tmp_path: Path) -> None:
    sp = _spool(tmp_path)
    for i in range(5):
        sp.append(i, b"k", b"A" * 100)
    sp.close()
    seg = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(seg.read_bytes())
    data[3 * 123 + 50] ^= 0xFF  # flip a byte inside record 3's value (records are 20 + 1 + 100 bytes)
    seg.write_bytes(bytes(data))
    sp2 = _spool(tmp_path)
    assert sp2.corrupt_bytes > 0
    assert _drain(sp2) == [0, 1, 2]  # records after the damage are cut and counted, never mis-read
    sp2.close()


def test_cap_drops_oldest_segment_and_counts(tmp_path: Path) -> None:
    sp = _spool(tmp_path, max_bytes=1024 * KB, segment_bytes=128 * KB)
    value = b"z" * 4000
    for i in range(600):  # ~2.4 MB into a 1 MB spool
        sp.append(i, b"k", value)
    assert sp.total_bytes <= 1024 * KB
    assert sp.dropped_messages > 0
    kept = _drain(sp)
    assert kept == list(range(600 - len(kept), 600))  # the newest survive, still in order
    assert sp.dropped_messages + len(kept) == 600
    assert sp.pending_messages == len(kept)
    sp.close()


def test_unusable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SpoolError, match="cannot create spool folder"):
        _spool(blocker / "spool")
