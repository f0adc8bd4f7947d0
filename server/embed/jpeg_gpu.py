"""GPU JPEG decoders for the embedder's JPEG path: bytes in, (N, 3, 256, 128) float RGB 0-255 on the GPU out.

Two decoders, chosen by ``osnet_torch.jpeg_decoder``:

- ``nvjpeg`` (default): torchvision's batched nvJPEG, CUDA kernels on the SMs. The faster of the two on the
  appliance's 64x128 crops (`just bench-jpeg-gpu`, H100: 33k decodes/s with 3 processes sharing the card).
- ``nvimgcodec``: NVIDIA nvImageCodec, which sends baseline JPEGs to the card's hardware JPEG engines
  (A100/H100/H200 class) and what they refuse to its CUDA decoder. 0.93x nvjpeg's decode rate there, but its pixels
  are OpenCV's (embedding cosine 1.0000 against the CPU decode, 0.9980 for nvjpeg), so a GPU server and a CPU
  server give a crop the same vector. Needs the ``nvidia-nvimgcodec-cu13`` and ``nvidia-nvjpeg`` wheels
  (``pip install .[nvimgcodec]``; ``-cu12`` builds for CUDA 12).

Both give the same layout (planar RGB, packed end to end) to one :func:`resize_packed_bilinear`, so the network
sees the same input whichever decoded it, up to the decoders' IDCT and upsampling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from server.embed.gpu_resize import resize_packed_bilinear
from server.embed.osnet_model import INPUT_HEIGHT, INPUT_WIDTH
from server.embed.preprocess import CropError

NVIMGCODEC_HINT = ("jpeg_decoder 'nvimgcodec' needs NVIDIA nvImageCodec and nvJPEG: pip install '.[nvimgcodec]' "
                   "(nvidia-nvimgcodec-cu13 + nvidia-nvjpeg; on CUDA 12: nvidia-nvimgcodec-cu12 + "
                   "nvidia-nvjpeg-cu12)")


def check_soi(jpegs: Sequence[bytes], first_index: int = 0) -> None:
    """Reject what is not a JPEG before the GPU sees it, naming the crop (a GPU decoder's error names none)."""
    for i, data in enumerate(jpegs):
        if len(data) < 4 or data[:2] != b"\xff\xd8":
            raise CropError(f"crop {first_index + i}: not a JPEG (no SOI marker, {len(data)} bytes)")


def _resize_planar(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, h, w) uint8 images on one device → (N, 3, 256, 128) float32, in one packed resize."""
    sizes = torch.tensor([img.numel() for img in images], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    hw = torch.tensor([img.shape[1:] for img in images], dtype=torch.int64)
    flat = torch.cat([img.reshape(-1) for img in images])
    return resize_packed_bilinear(flat, offsets, hw[:, 0], hw[:, 1], planar=True, out_h=INPUT_HEIGHT, out_w=INPUT_WIDTH)


def torchvision_available() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except Exception:
        return False
    return True


def decode_resize_jpegs_gpu(jpegs: Sequence[bytes], device: torch.device, first_index: int = 0) -> torch.Tensor:
    """torchvision's batched nvJPEG decode, then one packed resize."""
    from torchvision.io import ImageReadMode, decode_jpeg

    check_soi(jpegs, first_index)
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
    return _resize_planar(images)


def nvimgcodec_module() -> Any:
    """The ``nvidia.nvimgcodec`` module, or a RuntimeError that says what to install."""
    try:
        from nvidia import nvimgcodec
    except Exception as exc:  # ImportError, or a missing/incompatible shared library
        raise RuntimeError(f"{NVIMGCODEC_HINT} ({exc})") from exc
    return nvimgcodec


class NvImageCodecDecoder:
    """nvImageCodec batch decoder bound to one CUDA device: hardware engines first, its CUDA decoder second.

    ``backends``: ``hw`` = the hardware engines, CUDA for what they refuse (the default); ``cuda`` = the CUDA
    decoder alone (for comparing); ``auto`` = nvImageCodec's own choice. The CPU fallback backend is left out on
    purpose: a JPEG no GPU backend decodes is a bad crop, and the consumer's CPU path already handles those.
    """

    def __init__(self, device: torch.device, backends: str = "hw", cpu_threads: int = 0) -> None:
        nv = nvimgcodec_module()
        self._nv = nv
        self.device = device
        kinds = {"hw": [nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.GPU_ONLY],
                 "cuda": [nv.BackendKind.GPU_ONLY], "auto": None}[backends]
        chosen = None if kinds is None else [nv.Backend(k) for k in kinds]
        index = device.index if device.index is not None else torch.cuda.current_device()
        # CPU threads parse the headers and run the CUDA decoder's Huffman stage; a few per process are plenty
        # beside 2-3 embedder workers on one box.
        threads = cpu_threads or min(4, os.cpu_count() or 1)
        try:
            self._decoder = nv.Decoder(device_id=index, max_num_cpu_threads=threads, backends=chosen)
        except Exception as exc:
            # Seen on an H100: a second nvImageCodec decoder in one process failed with "Could not create decoder.
            # Code: 7"; the consumer builds one per embedder process.
            raise RuntimeError(f"nvImageCodec could not create its decoder on cuda:{index} (backends {backends!r}): "
                               f"{exc}. jpeg_decoder 'nvjpeg' needs no extra package.") from exc
        self._params = nv.DecodeParams(color_spec=nv.ColorSpec.SRGB, sample_format=nv.SampleFormat.P_RGB,
                                       apply_exif_orientation=False)

    def decode_resize(self, jpegs: Sequence[bytes], first_index: int = 0) -> torch.Tensor:
        check_soi(jpegs, first_index)
        stream = torch.cuda.current_stream(self.device)
        images = self._decoder.decode([self._nv.CodeStream(d) for d in jpegs], params=self._params,
                                      cuda_stream=stream.cuda_stream)
        for i, img in enumerate(images):
            if img is None:
                raise CropError(f"crop {first_index + i}: JPEG does not decode on the GPU ({len(jpegs[i])} bytes)")
        # Zero-copy views (__cuda_array_interface__, ordered on ``stream``); each keeps its Image alive until the
        # packed copy in _resize_planar has been queued behind the decode.
        return _resize_planar([torch.as_tensor(img, device=self.device) for img in images])
