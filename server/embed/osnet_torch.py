"""OSNet x0_25 embedder in PyTorch: the GPU serving path (fp16, channels_last, folded BatchNorm), CPU fallback.

Crops are resized to 256×128 on the CPU with OpenCV (bilinear, like torchreid's transforms), shipped
to the device as uint8 (4× fewer bytes than float32), and turned into normalised RGB there.
:meth:`OsnetTorchEmbedder.embed_jpegs` skips the CPU entirely when torchvision's nvJPEG decoder is
available: JPEG bytes → GPU decode → GPU resize → network.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from server.embed.base import OsnetTorchConfig
from server.embed.gpu_resize import resize_packed_bilinear
from server.embed.jpeg_gpu import NvImageCodecDecoder, decode_resize_jpegs_gpu, torchvision_available
from server.embed.osnet_model import (
    INPUT_HEIGHT,
    INPUT_WIDTH,
    OSNet,
    StateDictMismatch,
    fold_batchnorm,
    load_torchreid_state_dict,
)
from server.embed.preprocess import CropError, batches, check_crop, resize_stack
from server.embed.weights import WeightsError, shared_model_file, verify_sha256

log = logging.getLogger(__name__)

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
GRAPH_BUCKET = 64


def resolve_osnet_weights(weights: str, weights_path: str | None, sha256: str | None, assets: str | None) -> Path:
    if weights_path:
        return verify_sha256(Path(weights_path).expanduser(), sha256)
    return shared_model_file(f"osnet_x0_25_{weights}.pth", assets)


def load_osnet(path: Path) -> OSNet:
    """OSNet x0_25 with the checkpoint at ``path`` loaded strictly, in eval mode, on the CPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/garbled pickles and zips
        raise WeightsError(f"{path}: cannot read as a PyTorch state dict ({type(exc).__name__}: {exc})") from exc
    model = OSNet("osnet_x0_25")
    try:
        n = load_torchreid_state_dict(model, state)
    except StateDictMismatch as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    log.info("osnet weights loaded", extra={"path": str(path), "tensors": n})
    return model.eval()


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embedder device 'cuda' requested but torch sees no CUDA GPU (use device: auto or cpu)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class OsnetTorchEmbedder:
    def __init__(self, cfg: OsnetTorchConfig, assets: str | None = None) -> None:
        self.cfg = cfg
        path = resolve_osnet_weights(cfg.weights, cfg.weights_path, cfg.sha256, assets)
        self.device = pick_device(cfg.device)
        on_gpu = self.device.type == "cuda"
        if cfg.threads and not on_gpu:
            torch.set_num_threads(cfg.threads)
        self.dtype = torch.float16 if (on_gpu and cfg.fp16) else torch.float32
        self.memory_format = torch.channels_last if (on_gpu and cfg.channels_last) else torch.contiguous_format
        model = fold_batchnorm(load_osnet(path))
        self.model = model.to(self.device, dtype=self.dtype, memory_format=self.memory_format)
        self.dim = self.model.feature_dim
        self.model_id = f"osnet_x0_25_{cfg.weights if not cfg.weights_path else 'custom'}_256x128"
        # Normalisation on the device, on RGB input scaled 0..255: x = (p - 255·mean) / (255·std).
        self._mean = torch.tensor(IMAGENET_MEAN_RGB, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(IMAGENET_STD_RGB, device=self.device).view(1, 3, 1, 1) * 255.0
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] | None = (
            {} if on_gpu and cfg.cuda_graphs else None)
        self._pool: Any = None
        self._pool_exec: ThreadPoolExecutor | None = None
        # Built here, not on first use, so a missing nvImageCodec is a start-up error rather than a failed batch.
        self._nvimgcodec = (NvImageCodecDecoder(self.device, cfg.nvimgcodec_backends)
                            if on_gpu and cfg.jpeg_decoder == "nvimgcodec" else None)
        # Settled once: intake and embed_jpegs ask every batch, and a failed torchvision import is not cheap to retry.
        self._gpu_decode = on_gpu and (self._nvimgcodec is not None
                                       or (cfg.jpeg_decoder == "nvjpeg" and torchvision_available()))
        if self._graphs is not None:
            self._capture_graphs()
        log.info("osnet embedder ready", extra={"model_id": self.model_id, "device": str(self.device),
                                                "dtype": str(self.dtype)})

    def _capture_graphs(self) -> None:
        """Capture the CUDA graph of every batch bucket now. Why: captured on first use, each new bucket cost a
        warm-up and a capture in the middle of the stream; batch sizes vary with the traffic (and a batch split
        between worker processes by messages leaves parts of every size), so the first minutes of a stream
        paid them one by one, on the GPU's critical path."""
        t0 = time.perf_counter()
        cap = max(self.cfg.batch_size, GRAPH_BUCKET)
        with torch.inference_mode():
            for n in range(GRAPH_BUCKET, cap + GRAPH_BUCKET, GRAPH_BUCKET):
                x = torch.zeros((min(n, cap), 3, INPUT_HEIGHT, INPUT_WIDTH), dtype=self.dtype, device=self.device)
                self._graphed(x.contiguous(memory_format=self.memory_format))
        torch.cuda.synchronize(self.device)
        log.info("CUDA graphs captured", extra={"buckets": len(self._graphs),  # type: ignore[arg-type]
                                                "seconds": round(time.perf_counter() - t0, 2)})

    def _forward_rgb(self, rgb_nchw: torch.Tensor) -> np.ndarray:
        """uint8/float RGB 0–255 (N,3,256,128) → (N, dim) unit float32 rows on the host."""
        return self._forward_on_device(rgb_nchw).cpu().numpy()

    @torch.inference_mode()
    def _forward_on_device(self, rgb_nchw: torch.Tensor) -> torch.Tensor:
        """:meth:`_forward_rgb` without the copy to the host: the result is queued on the GPU, so the caller
        can pack the next part of a batch on the CPU while this one runs."""
        x = (rgb_nchw.to(self.device).float() - self._mean) / self._std
        x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        feats = self._graphed(x) if self._graphs is not None else self.model(x)
        return F.normalize(feats.float(), dim=1)

    def _graphed(self, x: torch.Tensor) -> torch.Tensor:
        """Replay a CUDA graph captured for this batch's bucket (next multiple of 64): one launch per forward.

        The rows past ``n`` hold stale inputs; in eval mode (BatchNorm folded) rows never interact, so
        they only cost compute and are cut off. Measured on an H100: +37 % at batch 256, +4 % at 1024.
        """
        n = x.shape[0]
        bucket = min(-(-n // GRAPH_BUCKET) * GRAPH_BUCKET, max(self.cfg.batch_size, GRAPH_BUCKET))
        entry = self._graphs.get(bucket)  # type: ignore[union-attr]
        if entry is None:
            static_in = torch.zeros((bucket, *x.shape[1:]), dtype=x.dtype, device=self.device).contiguous(
                memory_format=self.memory_format)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self.model(static_in)
            self._pool = graph.pool()
            entry = self._graphs[bucket] = (graph, static_in, static_out)  # type: ignore[index]
        graph, static_in, static_out = entry
        static_in[:n].copy_(x)
        graph.replay()
        return static_out[:n].clone()

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(crops_bgr), self.dim), dtype=np.float32)
        if self.device.type == "cuda":
            # Raw crops up in one copy per part, resized on the GPU (BGR→RGB on the way). Every part is queued
            # before any result is read back, so part k+1 is packed on the CPU while part k runs on the GPU.
            queued = [(s, self._forward_on_device(self._upload_resize(crops_bgr[s], s.start)))
                      for s in batches(len(crops_bgr), self.cfg.batch_size)]
            for s, feats in queued:
                out[s] = feats.cpu().numpy()
            return out
        for s in batches(len(crops_bgr), self.cfg.batch_size):
            stack = resize_stack(crops_bgr[s], INPUT_HEIGHT, INPUT_WIDTH)  # (n,H,W,3) BGR uint8
            out[s] = self._forward_rgb(torch.from_numpy(stack).permute(0, 3, 1, 2).flip(1))
        return out

    def _upload_resize(self, crops: Sequence[np.ndarray], first_index: int) -> torch.Tensor:
        for i, c in enumerate(crops):
            check_crop(first_index + i, c)
        sizes = np.array([c.size for c in crops], dtype=np.int64)
        flat = torch.empty(int(sizes.sum()), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        np.concatenate([np.ascontiguousarray(c).reshape(-1) for c in crops], out=flat.numpy())
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        hw = torch.tensor([c.shape[:2] for c in crops], dtype=torch.int64)
        return resize_packed_bilinear(flat.to(self.device, non_blocking=True), offsets, hw[:, 0], hw[:, 1],
                                      planar=False, out_h=INPUT_HEIGHT, out_w=INPUT_WIDTH, channel_order=(2, 1, 0))

    @property
    def decodes_jpegs(self) -> bool:
        """Whether :meth:`embed_jpegs` decodes on the GPU (the consumer then skips its CPU decode)."""
        return self._gpu_decode

    def _decode_resize_gpu(self, jpegs: Sequence[bytes], first_index: int) -> torch.Tensor:
        if self._nvimgcodec is not None:
            return self._nvimgcodec.decode_resize(jpegs, first_index)
        return decode_resize_jpegs_gpu(jpegs, self.device, first_index)

    def embed_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
        """Embed JPEG-encoded crops, decoded on the GPU (nvJPEG by default on CUDA, or nvImageCodec's hardware
        engines) or by a CPU thread pool.

        Measured on an H100 box (16 vCPUs), batch 1024 of 96×192 crops: nvJPEG path 11.4k crops/s end to
        end, OpenCV thread pool 5.8k (docs/server-models.md). Without CUDA or torchvision: the CPU path.
        """
        if self.decodes_jpegs:
            # Part by part, each read back before the next is decoded: queued like :meth:`embed`, nvJPEG's batched
            # decode of part k+1 overlapped part k and returned NaN vectors on the H200 (torchvision 0.26).
            out = np.empty((len(jpegs), self.dim), dtype=np.float32)
            share = self.cfg.cpu_decode_share
            for s in batches(len(jpegs), self.cfg.batch_size):
                k = min(round((s.stop - s.start) * share), s.stop - s.start - 1)  # nvJPEG gets >= 1 crop
                if not k:
                    out[s] = self._forward_rgb(self._decode_resize_gpu(jpegs[s], s.start))
                    continue
                # The part's first k crops go to OpenCV threads (they drop the GIL) while nvJPEG decodes the rest
                # here (the op drops it too); then one forward over both.
                on_cpu_jpegs = jpegs[s.start:s.start + k]
                decoding = self._decode_pool(4).map(_decode_one, on_cpu_jpegs, chunksize=32)  # submitted now
                on_gpu = self._decode_resize_gpu(jpegs[s.start + k:s.stop], s.start + k)
                on_cpu = self._upload_resize(_decoded(list(decoding), on_cpu_jpegs, s.start), s.start)
                out[s] = self._forward_rgb(torch.cat([on_cpu, on_gpu]))
            return out
        return self.embed(decode_jpegs_cpu(jpegs, self._decode_pool(min(16, os.cpu_count() or 1))))

    def _decode_pool(self, default_threads: int) -> ThreadPoolExecutor:
        if self._pool_exec is None:
            self._pool_exec = ThreadPoolExecutor(self.cfg.decode_threads or default_threads, thread_name_prefix="jpeg")
        return self._pool_exec


def _decode_one(data: bytes) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None


def _decoded(images: list[np.ndarray | None], jpegs: Sequence[bytes], first_index: int = 0) -> list[np.ndarray]:
    """``images`` once every one decoded; else :class:`CropError` naming the first crop that did not."""
    for i, img in enumerate(images):
        if img is None:
            raise CropError(f"crop {first_index + i}: not a decodable image ({len(jpegs[i])} bytes)")
    return images  # type: ignore[return-value]


def decode_jpegs_cpu(jpegs: Sequence[bytes], pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
    """BGR crops from encoded bytes; OpenCV releases the GIL, so a thread pool decodes in parallel."""
    return _decoded(list(pool.map(_decode_one, jpegs, chunksize=32)) if pool else [_decode_one(d) for d in jpegs],
                    jpegs)
