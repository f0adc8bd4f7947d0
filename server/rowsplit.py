"""Row-wise numpy work of one batch, split over threads.

Why: each batch the matcher ranks every query's similarities twice (against the gallery and against the
batch's own tracks, ~1,000 x 1,000 each): partial sorts, sorts and gathers that numpy runs on one core,
on the consumer's thread, which is the whole consumer's limit on a GPU box. Those kernels release the
GIL, and a query's ranking reads only its own row, so row chunks ranked on a few threads give the same
arrays (each row's result does not depend on how the rows are chunked) in a fraction of the time when
the box has idle cores (the GPU server: 16 cores and one busy Python thread). With fewer than 4 allowed
CPUs, or small batches, the work stays on the calling thread.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from common.service import allowed_cpus

T = TypeVar("T")

#: Fewest rows worth a chunk of their own (a thread hand-off costs ~50 us; a row of 1,000 ranks in ~10 us).
MIN_ROWS = 128
#: Threads to use; None = half the allowed CPUs, at most 8 (the rest stay with the embedder workers,
#: the commit process and the consumer thread).
WORKERS: int | None = None

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def workers() -> int:
    return WORKERS if WORKERS is not None else min(8, allowed_cpus() // 2)


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="rank"), n
        return _pool


def map_row_chunks(fn: Callable[[int, int], T], n_rows: int) -> list[T]:
    """``[fn(a, b) for each chunk [a, b) of range(n_rows)]`` in row order, the chunks run on threads when
    that pays (see the module docstring). ``fn`` must only read shared arrays and return new ones."""
    p = min(workers(), n_rows // MIN_ROWS)
    if p <= 1:
        return [fn(0, n_rows)]
    bounds = np.linspace(0, n_rows, p + 1).astype(int).tolist()
    spans = list(itertools.pairwise(bounds))
    pool = _executor(p)
    futures = [pool.submit(fn, a, b) for a, b in spans[1:]]
    first = fn(*spans[0])  # the calling thread takes a chunk too instead of only waiting
    return [first, *(f.result() for f in futures)]
