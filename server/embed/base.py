"""The embedder contract the server's consumer codes against, and how a config picks a backend.

Every backend takes BGR ``uint8`` person crops of any size (as decoded by OpenCV from the
appliance's JPEGs) and returns L2-normalised float32 rows, so the identity matcher can use a
plain dot product as cosine similarity regardless of which model produced the vectors. Backends
are registered by dotted path and imported only when chosen: the OpenVINO-only server install
never imports torch, and the torch backend never imports OpenVINO.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from common.configfile import ConfigError, StrictModel, format_validation_error


@runtime_checkable
class Embedder(Protocol):
    """Turns person crops into unit-length appearance vectors (cosine = dot product)."""

    model_id: str  # names data and input, e.g. "osnet_x0_25_msmt17_256x128"
    dim: int

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """(N, dim) float32, each row L2-normalised; N may be 0 (returns shape (0, dim))."""
        ...


OsnetWeights = Literal["msmt17", "market1501"]


class OsnetTorchConfig(StrictModel):
    """OSNet x0_25 (torchreid architecture) in PyTorch: CUDA fp16 + channels_last on a GPU, CPU otherwise."""

    type: Literal["osnet_torch"] = "osnet_torch"
    weights: OsnetWeights = Field("msmt17", description="Which shared torchreid state dict to load.")
    weights_path: str | None = Field(None, description="Override the state dict path (sha256 is then not checked "
                                     "against the manifest unless `sha256` is set).")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Expected sha256 of weights_path.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    fp16: bool = Field(True, description="Half precision on CUDA (ignored on CPU).")
    channels_last: bool = Field(True, description="NHWC memory format on CUDA (ignored on CPU).")
    cuda_graphs: bool = Field(True, description="Replay CUDA graphs per batch bucket of 64 on CUDA (ignored on CPU).")
    batch_size: int = Field(512, ge=1, le=8192, description="Crops per forward pass.")
    jpeg_decoder: Literal["cpu", "nvjpeg", "nvimgcodec"] = Field(
        "nvjpeg", description="embed_jpegs decoder on CUDA: torchvision nvJPEG (falls back to cpu without "
        "torchvision), nvimgcodec (NVIDIA nvImageCodec: the GPU's hardware JPEG engines where the card has them, "
        "its CUDA decoder otherwise; pip install '.[nvimgcodec]', a start-up error without it) or OpenCV threads. "
        "Ignored on CPU.")
    nvimgcodec_backends: Literal["hw", "cuda", "auto"] = Field(
        "hw", description="With nvimgcodec: hw = hardware engines, CUDA decoder for what they refuse; cuda = the "
        "CUDA decoder alone; auto = nvImageCodec's own choice.")
    decode_threads: int = Field(0, ge=0, le=256, description="CPU JPEG decode threads (0 = min(16, cores); with "
                                "cpu_decode_share: 4).")
    cpu_decode_share: float = Field(0.0, ge=0.0, le=0.9, description="With a GPU decoder: the share of each batch's "
                                    "crops decoded by OpenCV threads while the GPU decodes the rest, so the CPU adds "
                                    "its decode rate to the GPU's (nvJPEG stays at ~15k small crops/s per GPU however "
                                    "many processes share it). 0 = the GPU alone.")
    threads: int = Field(0, ge=0, le=256, description="CPU threads for torch (0 = torch default).")


class OsnetOpenVinoConfig(StrictModel):
    """The same OSNet x0_25 weights converted in-process to OpenVINO (CPU serving without torch at inference)."""

    type: Literal["osnet_openvino"] = "osnet_openvino"
    weights: OsnetWeights = "msmt17"
    weights_path: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    device: str = Field("CPU", description="OpenVINO device name.")
    cache_dir: str | None = Field(None, description="Where the converted IR is kept, keyed by weights sha256 and "
                                  "OpenVINO version (default $REIDFLEET_CACHE or ~/.cache/reidfleet).")
    batch_size: int = Field(64, ge=1, le=4096)
    threads: int = Field(0, ge=0, le=256, description="OpenVINO inference threads (0 = runtime default).")


IntelReidModel = Literal["0277", "0286", "0287", "0288"]


class IntelReidConfig(StrictModel):
    """Intel Open Model Zoo person-reidentification-retail-02xx IR (BGR 0–255, 256×128, 256-d)."""

    type: Literal["intel_reid"] = "intel_reid"
    model: IntelReidModel = Field("0277", description="OMZ model number.")
    precision: Literal["FP32", "FP16", "FP16-INT8"] | None = Field(
        None, description="IR precision folder; None = the best one present in the shared assets.")
    device: str = "CPU"
    batch_size: int = Field(64, ge=1, le=4096)
    threads: int = Field(0, ge=0, le=256)


EmbedderConfig = Annotated[OsnetTorchConfig | OsnetOpenVinoConfig | IntelReidConfig, Field(discriminator="type")]

# type -> "module:Class"; the class is constructed as Class(cfg, assets=...).
EMBEDDERS: dict[str, str] = {
    "osnet_torch": "server.embed.osnet_torch:OsnetTorchEmbedder",
    "osnet_openvino": "server.embed.osnet_openvino:OsnetOpenVinoEmbedder",
    "intel_reid": "server.embed.intel_reid:IntelReidEmbedder",
}

_ADAPTER: TypeAdapter[Any] = TypeAdapter(EmbedderConfig)


def parse_embedder_config(data: Mapping[str, Any] | StrictModel) -> StrictModel:
    """Validate a mapping into one of the embedder configs; an unknown ``type`` lists the known ones."""
    if isinstance(data, StrictModel):
        return data
    kind = data.get("type")
    if kind not in EMBEDDERS:
        raise ConfigError("embedder", [f"type: unknown embedder {kind!r}; known: {', '.join(sorted(EMBEDDERS))}"])
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        raise ConfigError("embedder", format_validation_error(exc)) from None


def load_backend(registry: Mapping[str, str], kind: str, what: str) -> type:
    """Import ``module:Class`` for ``kind`` only now, so unused backends cost no import."""
    if kind not in registry:
        raise ValueError(f"unknown {what} {kind!r}; known: {', '.join(sorted(registry))}")
    module_name, _, cls_name = registry[kind].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_embedder(cfg: Any, assets: str | None = None) -> Embedder:
    """Build the backend a config names (a config model or a plain mapping with ``type``)."""
    cfg = parse_embedder_config(cfg)
    cls = load_backend(EMBEDDERS, cfg.type, "embedder")  # type: ignore[attr-defined]
    return cls(cfg, assets=assets)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise unit length in float32; all-zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
