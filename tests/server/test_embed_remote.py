"""The embedder in its own process: same vectors as in-process, errors by kind, a dead child replaced."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from server.embed.base import build_embedder
from server.embed.preprocess import CropError
from server.embed.remote import EmbedderProcessDied, RemoteEmbedder
from tests.server.conftest import Market

CFG = {"type": "osnet_openvino"}


def test_same_vectors_as_in_process_and_errors_by_kind(market: Market) -> None:
    import cv2

    crops = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in market.crops("0001", 0)[:4]]
    local = build_embedder(CFG)
    remote = RemoteEmbedder(CFG)
    try:
        assert (remote.model_id, remote.dim) == (local.model_id, local.dim)
        assert remote.pid is not None and remote.pid != os.getpid()
        np.testing.assert_allclose(remote.embed(crops), local.embed(crops), atol=1e-5)
        assert remote.embed([]).shape == (0, local.dim)
        with pytest.raises(CropError, match="crop 1"):
            remote.embed([crops[0], np.zeros((0, 5, 3), np.uint8)])
        # the child survives a bad batch
        np.testing.assert_allclose(remote.embed(crops[:1]), local.embed(crops[:1]), atol=1e-5)

        os.kill(remote.pid, signal.SIGKILL)  # a crash (OOM, driver reset): this batch fails and is redelivered
        with pytest.raises(EmbedderProcessDied):
            for _ in range(50):  # the kill lands asynchronously
                remote.embed(crops[:1])
        np.testing.assert_allclose(remote.embed(crops), local.embed(crops), atol=1e-5)  # a fresh child
    finally:
        remote.close()
    assert remote.pid is None


def test_a_bad_config_fails_at_start_with_the_reason() -> None:
    with pytest.raises(RuntimeError, match=r"FileNotFoundError: model file not found at /nonexistent/osnet\.pth"):
        RemoteEmbedder({"type": "osnet_openvino", "weights_path": "/nonexistent/osnet.pth"})


def test_workers_split_a_batch_and_put_it_back_in_order(market: Market) -> None:
    import cv2

    crops = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in market.crops("0001", 0)[:5]]
    local = build_embedder(CFG)
    remote = RemoteEmbedder(CFG, workers=2, min_part=2)
    try:
        pids = remote.pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
        np.testing.assert_allclose(remote.embed(crops), local.embed(crops), atol=1e-5)  # parts of 2 and 3
        np.testing.assert_allclose(remote.embed(crops[:1]), local.embed(crops[:1]), atol=1e-5)  # one part
        # a bad crop in the second part is named by its index in the whole batch
        with pytest.raises(CropError, match="crop 3"):
            remote.embed([*crops[:3], np.zeros((0, 5, 3), np.uint8)])
        np.testing.assert_allclose(remote.embed(crops), local.embed(crops), atol=1e-5)  # both still in step

        os.kill(pids[1], signal.SIGKILL)
        worker = remote._workers[1]
        assert worker is not None
        for _ in range(200):  # the kill lands asynchronously
            if not worker.alive():
                break
            time.sleep(0.05)
        # Found dead before the call: replaced, and the call succeeds.
        np.testing.assert_allclose(remote.embed(crops), local.embed(crops), atol=1e-5)  # a fresh second worker
        assert remote.pids[0] == pids[0] and remote.pids[1] not in pids
    finally:
        remote.close()
    assert remote.pids == [None, None]


def test_an_answer_larger_than_the_socket_buffer_arrives_whole_beside_a_busy_thread(market: Market) -> None:
    """600 crops: a ~1.2 MB answer, several socket buffers, read in one blocking read while another thread keeps
    the interpreter busy (the matcher's situation); the vectors are exactly the in-process ones."""
    import threading

    import cv2

    crops = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in market.crops("0001", 0)] * 200
    local = build_embedder(CFG).embed(crops)
    remote = RemoteEmbedder(CFG)
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            x = (x + 1) % 1_000_003

    th = threading.Thread(target=busy, daemon=True)
    th.start()
    try:
        assert remote._workers[0] is not None and remote._workers[0]._sock is not None, "the one-read path is used"
        got = remote.embed(crops)
    finally:
        stop.set()
        th.join()
        remote.close()
    assert got.shape == local.shape and got.nbytes > 1_000_000
    np.testing.assert_allclose(got, local, atol=1e-5)
