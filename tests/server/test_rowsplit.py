"""Row chunks on threads: every row once, results in row order, the caller's thread working too."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from server import rowsplit


def test_chunks_cover_every_row_in_order_on_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rowsplit, "WORKERS", 4)
    monkeypatch.setattr(rowsplit, "MIN_ROWS", 10)
    x = np.random.default_rng(0).standard_normal((103, 50))
    seen: list[str] = []

    def rank(a: int, b: int) -> np.ndarray:
        seen.append(threading.current_thread().name)
        return np.argsort(-x[a:b], axis=1, kind="stable")

    parts = rowsplit.map_row_chunks(rank, len(x))
    assert len(parts) == 4 and sum(len(p) for p in parts) == len(x)
    np.testing.assert_array_equal(np.concatenate(parts), np.argsort(-x, axis=1, kind="stable"))
    assert threading.current_thread().name in seen and len(set(seen)) > 1


def test_small_work_or_a_small_box_stays_on_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rowsplit, "MIN_ROWS", 128)
    for workers, rows in ((8, 200), (1, 10_000)):  # too few rows for two chunks; one worker allowed
        monkeypatch.setattr(rowsplit, "WORKERS", workers)
        names: list[str] = []
        out = rowsplit.map_row_chunks(lambda a, b, names=names: names.append(threading.current_thread().name)
                                      or (a, b), rows)
        assert out == [(0, rows)] and names == [threading.current_thread().name]
