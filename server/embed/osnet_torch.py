"""OSNet x0_25 embedder in PyTorch: the GPU serving path (fp16, channels_last, folded BatchNorm), CPU fallback.

Crops are resized to 256×128 on the CPU with OpenCV (bilinear, like torchreid's transforms), shipped
to the device as uint8 (4× fewer bytes than float32), and turned into normalised RGB there.
:meth:`OsnetTorchEmbedder.embed_jpegs` skips the CPU entirely when torchvision's nvJPEG decoder is
available: JPEG bytes → GPU decode → GPU resize → network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from server.embed.base import OsnetTorchConfig
from server.embed.osnet_model import OSNet, StateDictMismatch, fold_batchnorm, load_torchreid_state_dict
from server.embed.preprocess import CropError, batches, resize_stack
from server.embed.weights import WeightsError, shared_model_file, verify_sha256

log = logging.getLogger(__name__)

HEIGHT, WIDTH = 256, 128
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


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
        log.info("osnet embedder ready", extra={"model_id": self.model_id, "device": str(self.device),
                                                "dtype": str(self.dtype)})

    @torch.inference_mode()
    def _forward_rgb(self, rgb_nchw: torch.Tensor) -> np.ndarray:
        """uint8/float RGB (N,3,256,128) on the device → (N, dim) unit float32 rows on the host."""
        x = (rgb_nchw.float() - self._mean) / self._std
        x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        feats = self.model(x).float()
        return F.normalize(feats, dim=1).cpu().numpy()

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(crops_bgr), self.dim), dtype=np.float32)
        for s in batches(len(crops_bgr), self.cfg.batch_size):
            stack = resize_stack(crops_bgr[s], HEIGHT, WIDTH)  # (n,H,W,3) BGR uint8
            t = torch.from_numpy(stack).to(self.device, non_blocking=True)
            out[s] = self._forward_rgb(t.permute(0, 3, 1, 2).flip(1))
        return out

    def embed_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
        """Embed JPEG-encoded crops; decodes on the GPU (nvJPEG via torchvision) when it can."""
        if self.device.type == "cuda" and _gpu_jpeg_available():
            out = np.empty((len(jpegs), self.dim), dtype=np.float32)
            for s in batches(len(jpegs), self.cfg.batch_size):
                out[s] = self._forward_rgb(decode_resize_jpegs_gpu(jpegs[s], self.device, s.start))
            return out
        return self.embed(decode_jpegs_cpu(jpegs))


def decode_jpegs_cpu(jpegs: Sequence[bytes]) -> list[np.ndarray]:
    crops = []
    for i, data in enumerate(jpegs):
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            raise CropError(f"crop {i}: not a decodable image ({len(data)} bytes)")
        crops.append(img)
    return crops


def _gpu_jpeg_available() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except Exception:
        return False
    return True


def decode_resize_jpegs_gpu(jpegs: Sequence[bytes], device: torch.device, first_index: int = 0) -> torch.Tensor:
    """(N,3,256,128) uint8 RGB on ``device``: batched nvJPEG decode, then a bilinear resize per crop."""
    from torchvision.io import ImageReadMode, decode_jpeg

    for i, data in enumerate(jpegs):
        if len(data) < 4 or data[:2] != b"\xff\xd8":
            raise CropError(f"crop {first_index + i}: not a JPEG (no SOI marker, {len(data)} bytes)")
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        for i, t in enumerate(tensors):  # find the culprit so the error names it
            try:
                decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as exc:
                raise CropError(f"crop {first_index + i}: JPEG does not decode ({exc})") from exc
        raise
    out = torch.empty((len(images), 3, HEIGHT, WIDTH), dtype=torch.uint8, device=device)
    for i, img in enumerate(images):
        if img.shape[1] == HEIGHT and img.shape[2] == WIDTH:
            out[i] = img
        else:
            out[i] = F.interpolate(img.unsqueeze(0).float(), size=(HEIGHT, WIDTH), mode="bilinear",
                                   align_corners=False, antialias=False).round_().clamp_(0, 255).to(torch.uint8)[0]
    return out
