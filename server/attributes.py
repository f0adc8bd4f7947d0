"""Gender per person crop, as a probability, plus the per-track/identity aggregation helper.

The Intel OMZ person-attributes-recognition-crossroad-0230 IR is the only gender model the
project can ship (no separate labelled training data exists here, so no head is trained on the
evaluation identities). Single crops are weak evidence (about 81 % per image on the Market subset),
so the consumer should aggregate over a track or identity with :func:`aggregate_male_probability`
and use gender as a soft score, not a hard filter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from common.configfile import ConfigError, StrictModel, format_validation_error
from server.embed.base import load_backend
from server.embed.preprocess import batches, resize_stack
from server.embed.weights import omz_ir

log = logging.getLogger(__name__)


@runtime_checkable
class GenderClassifier(Protocol):
    model_id: str

    def male_probability(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) float32 in [0, 1]: the model's probability that each crop shows a man."""
        ...


class IntelGenderConfig(StrictModel):
    """person-attributes-recognition-crossroad-0230 (input 160×80 BGR 0–255, output 453[0] = is_male)."""

    type: Literal["intel_0230"] = "intel_0230"
    precision: Literal["FP32", "FP16", "FP16-INT8"] | None = Field(None, description="None = best present.")
    flip_average: bool = Field(False, description="Average the score of the crop and its mirror image (2× compute; "
                               "measured: +0.3 pt per image, −4 pt per identity, so off; docs/server-models.md).")
    device: str = "CPU"
    batch_size: int = Field(64, ge=1, le=4096)
    threads: int = Field(0, ge=0, le=256)


GenderConfig = Annotated[IntelGenderConfig, Field(discriminator="type")]
GENDER_CLASSIFIERS: dict[str, str] = {"intel_0230": "server.attributes:IntelGenderClassifier"}
_ADAPTER: TypeAdapter[Any] = TypeAdapter(GenderConfig)


def build_gender(cfg: Any, assets: str | None = None) -> GenderClassifier:
    """Build the classifier a config (model or mapping with ``type``) names; unknown types list known ones."""
    if not isinstance(cfg, StrictModel):
        kind = cfg.get("type", "intel_0230")
        if kind not in GENDER_CLASSIFIERS:
            raise ConfigError("gender", [f"type: unknown gender classifier {kind!r}; "
                                         f"known: {', '.join(sorted(GENDER_CLASSIFIERS))}"])
        try:
            cfg = _ADAPTER.validate_python(dict(cfg))
        except ValidationError as exc:
            raise ConfigError("gender", format_validation_error(exc)) from None
    cls = load_backend(GENDER_CLASSIFIERS, cfg.type, "gender classifier")
    return cls(cfg, assets=assets)


class IntelGenderClassifier:
    """OpenVINO runner for 0230 with a dynamic batch dimension (the IR is exported for batch 1)."""

    NAME = "person-attributes-recognition-crossroad-0230"
    HEIGHT, WIDTH = 160, 80

    def __init__(self, cfg: IntelGenderConfig, assets: str | None = None) -> None:
        import openvino as ov

        self.cfg = cfg
        xml, precision = omz_ir(self.NAME, cfg.precision, assets)
        core = ov.Core()
        model = core.read_model(xml)
        model.reshape({model.inputs[0].any_name: [-1, 3, self.HEIGHT, self.WIDTH]})
        props: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT"}
        if cfg.threads:
            props["INFERENCE_NUM_THREADS"] = cfg.threads
        self._compiled = core.compile_model(model, cfg.device, props)
        self._out = self._compiled.output("453")
        self._request = self._compiled.create_infer_request()
        self.model_id = f"intel_0230_{precision.lower()}_160x80" + ("_flip" if cfg.flip_average else "")
        log.info("gender classifier ready", extra={"model_id": self.model_id, "xml": str(xml)})

    def _infer(self, nchw: np.ndarray) -> np.ndarray:
        out = self._request.infer({0: nchw})[self._out]
        return np.asarray(out, dtype=np.float32).reshape(len(nchw), 8)[:, 0]

    def male_probability(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        stack = resize_stack(crops_bgr, self.HEIGHT, self.WIDTH)
        result = np.empty(len(stack), dtype=np.float32)
        for s in batches(len(stack), self.cfg.batch_size):
            nchw = stack[s].transpose(0, 3, 1, 2).astype(np.float32)
            p = self._infer(nchw)
            if self.cfg.flip_average:
                p = 0.5 * (p + self._infer(np.ascontiguousarray(nchw[..., ::-1])))
            result[s] = p
        return np.clip(result, 0.0, 1.0)


def logit(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p / (1.0 - p))


def aggregate_male_probability(probs: Sequence[float] | np.ndarray, method: Literal["mean", "logodds"] = "mean",
                               ) -> float:
    """One probability for a track or identity from its crops' probabilities.

    ``mean`` (default) averages probabilities: robust to one confidently wrong crop, and it is what
    the per-identity accuracy in docs/server-models.md was measured with. ``logodds`` averages
    log-odds (a geometric-style pool that lets confident crops dominate). Empty input returns 0.5
    (no evidence).
    """
    arr = np.asarray(probs, dtype=np.float64)
    if arr.size == 0:
        return 0.5
    if method == "mean":
        return float(arr.mean())
    if method == "logodds":
        return float(1.0 / (1.0 + np.exp(-logit(arr).mean())))
    raise ValueError(f"unknown aggregation {method!r}; known: mean, logodds")


# w in ``cosine + w * gender_agreement`` for OSNet x0_25 MSMT17 with 0230 (no flip): chosen on the Market subset
# (best Rank-1 and mAP at 0.015; 2-fold CV over identities chose 0.005 and 0.02, all give Rank-1 68.4 vs 65.3 off).
# Re-measure with `just eval-reid` when the embedder or gender model changes.
DEFAULT_GENDER_WEIGHT = 0.015


def gender_agreement(p_query: np.ndarray | float, p_gallery: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Soft gender score for ranking: log-odds that query and candidate have the same gender.

    P(same) = pq·pg + (1−pq)(1−pg); the score is logit(P(same)), 0 when either side is 0.5.
    Rank by ``cosine + w * gender_agreement(...)``; w is chosen in docs/server-models.md.
    """
    pq = np.asarray(p_query, dtype=np.float64)
    pg = np.asarray(p_gallery, dtype=np.float64)
    same = pq * pg + (1.0 - pq) * (1.0 - pg)
    return logit(same, eps).astype(np.float32)
