"""OpenVINO runtime for YOLO11 IRs: fail-fast loading, zero-copy input, ordered async streaming.

Why it looks like this:
- Colour conversion, layout change and /255 are folded into the graph with OpenVINO's
  ``PrePostProcessor``: the request's input tensor is uint8 NHWC BGR, the letterbox resizes a
  frame straight into it, and nothing else is copied or converted in Python.
- ``stream`` keeps ``inflight_requests`` requests of an ``AsyncInferQueue`` busy. The callback
  decodes a finished request on OpenVINO's thread while the caller letterboxes the next frame,
  and results are handed back strictly in input order.
- Threads, streams and the hint are planned from ``common.service.allowed_cpus()`` (taskset and
  cgroup aware), with the defaults measured in docs/appliance-detector.md.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import yaml
from openvino.preprocess import ColorFormat, PrePostProcessor

from appliance.detect.base import DetectorConfig, ModelLoadError
from appliance.detect.rect import RectUnsupported, rect_input_hw, reshape_yolo_ir
from appliance.detect.yolo import Letterbox, check_image, decode, letterbox_into
from appliance.types import Detections, Frame
from common.service import allowed_cpus

log = logging.getLogger(__name__)

MAX_SHAPES = 8  # compiled input geometries kept per detector (a camera needs one)


@dataclass(frozen=True, slots=True)
class RuntimePlan:
    """How the model is compiled and how many requests ``stream`` keeps in flight."""

    hint: str
    threads: int
    streams: int
    inflight: int

    def properties(self) -> dict[str, Any]:
        return {
            "PERFORMANCE_HINT": self.hint,
            "INFERENCE_NUM_THREADS": self.threads,
            "NUM_STREAMS": self.streams,
        }


def plan_runtime(cfg: DetectorConfig, cpus: int | None = None) -> RuntimePlan:
    """Defaults measured with ``just bench-detector`` (docs/appliance-detector.md).

    One core: one latency stream, two requests in flight (the next frame's letterbox and the last
    frame's decode overlap inference). Two or more: one single-threaded stream per core (at most
    4) and one request more than streams. On the 2-core test box, 2 streams beat one 2-thread
    stream in every interleaved round (+25-40 %), most under load from other processes: a
    2-thread stream waits for its slower thread at every layer, two streams do not.
    """
    cpus = cpus or allowed_cpus()
    if cfg.performance_hint == "auto":
        hint = "LATENCY" if cpus == 1 or cfg.streams == 1 else "THROUGHPUT"
    else:
        hint = cfg.performance_hint
    threads = cfg.threads or cpus
    streams = cfg.streams or (1 if hint == "LATENCY" else max(1, min(cpus, 4)))
    inflight = cfg.inflight_requests or (2 if streams == 1 else streams + 1)
    return RuntimePlan(hint, threads, streams, inflight)


def find_ir(model_dir: Path) -> tuple[Path, Path]:
    """The one ``.xml`` in ``model_dir`` and its ``.bin``; anything else is a clear error."""
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"detector model folder not found: {model_dir} (set detector.model_dir, or REIDFLEET_ASSETS "
            "to the folder holding models/)"
        )
    xmls = sorted(model_dir.glob("*.xml"))
    if len(xmls) != 1:
        raise ModelLoadError(f"{model_dir} must hold exactly one OpenVINO .xml, found {[p.name for p in xmls]}")
    xml = xmls[0]
    weights = xml.with_suffix(".bin")
    if not weights.is_file():
        raise ModelLoadError(f"{xml.name} has no weights file {weights.name} beside it in {model_dir}")
    if weights.stat().st_size == 0:
        raise ModelLoadError(f"weights file {weights} is empty")
    return xml, weights


def describe_model(model_dir: Path, xml: Path, weights: Path, input_hw: tuple[int, int]) -> tuple[str, str]:
    """``(model_id, model_version)``: from ``manifest.json`` when present (verified file by file),
    else derived from Ultralytics' ``metadata.yaml`` and the sha256 of the weights."""
    from schemas.model_manifest import MANIFEST_NAME, ManifestError, verify_model_dir

    if (model_dir / MANIFEST_NAME).is_file():
        try:
            manifest = verify_model_dir(model_dir)
        except ManifestError as exc:
            raise ModelLoadError(str(exc)) from exc
        return manifest.model_id, manifest.version
    version = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    data, precision = "coco", "fp32"
    meta_path = model_dir / "metadata.yaml"
    if meta_path.is_file():
        try:
            meta = yaml.safe_load(meta_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ModelLoadError(f"{meta_path} is not valid YAML: {exc}") from exc
        desc = str(meta.get("description", ""))
        if "trained on" in desc:
            data = Path(desc.split("trained on", 1)[1].strip()).stem or data
        args = meta.get("args") or {}
        precision = "int8" if args.get("int8") else "fp16" if args.get("half") else precision
    if "int8" in model_dir.name.lower():
        precision = "int8"
    return f"{xml.stem}_{data}_{precision}_{input_hw[1]}", version


class OpenVinoDetector:
    """YOLO11 person detector on OpenVINO. Not thread-safe: one caller per instance."""

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        self._classes = tuple(cfg.classes)
        xml, weights = find_ir(Path(cfg.model_dir))
        core = ov.Core()
        try:
            model = core.read_model(xml)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"cannot read OpenVINO IR {xml} (truncated or corrupt .xml/.bin?): {_first_line(exc)}"
            ) from exc
        if len(model.inputs) != 1 or len(model.outputs) < 1:
            raise ModelLoadError(f"{xml.name}: expected 1 input and an output, got {len(model.inputs)} inputs")
        in_shape = model.inputs[0].get_partial_shape()
        out_shape = model.outputs[0].get_partial_shape()
        if in_shape.is_dynamic or len(in_shape) != 4 or in_shape[1].get_length() != 3:
            raise ModelLoadError(f"{xml.name}: expected a static [1,3,H,W] input, got {in_shape}")
        if out_shape.is_dynamic or len(out_shape) != 3 or out_shape[1].get_length() < 5:
            raise ModelLoadError(f"{xml.name}: expected a YOLO head output [1,4+C,A], got {out_shape}")
        n_classes = out_shape[1].get_length() - 4
        if max(self._classes) >= n_classes:
            raise ModelLoadError(f"classes {list(self._classes)} not all in the model's 0..{n_classes - 1}")
        self.input_hw = (in_shape[2].get_length(), in_shape[3].get_length())
        self.model_id, self.model_version = describe_model(Path(cfg.model_dir), xml, weights, self.input_hw)

        self._core, self._raw = core, model.clone()  # PrePostProcessor edits the model it is given
        self.plan = plan_runtime(cfg)
        # Square (the IR as exported) first: every load error surfaces here, not at the first frame.
        self._compiled: dict[tuple[int, int], ov.CompiledModel] = {self.input_hw: self._compile(model)}
        self._rect_ok = cfg.rect_input
        self._requests: dict[tuple[int, int], tuple[ov.InferRequest, list[Letterbox | None]]] = {}
        self._queues: dict[tuple[int, int], tuple[ov.AsyncInferQueue, list[Letterbox | None]]] = {}
        log.info(
            "detector loaded",
            extra={
                "model_id": self.model_id,
                "model_version": self.model_version,
                "device": cfg.device,
                "hint": self.plan.hint,
                "threads": self.plan.threads,
                "streams": self.plan.streams,
                "inflight": self.plan.inflight,
                "rect_input": cfg.rect_input,
            },
        )

    def _compile(self, model: ov.Model) -> ov.CompiledModel:
        """Colour conversion, layout and /255 folded into the graph, then compiled with the planned threads."""
        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(
            ColorFormat.BGR
        )
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).scale(255.0)
        props = self.plan.properties() if self.cfg.device.upper().startswith("CPU") else {
            "PERFORMANCE_HINT": self.plan.hint}
        try:
            return self._core.compile_model(ppp.build(), self.cfg.device, props)
        except RuntimeError as exc:
            raise ModelLoadError(f"cannot compile the detector for {self.cfg.device}: {_first_line(exc)}") from exc

    @property
    def compiled_input_hw(self) -> list[tuple[int, int]]:
        """Network input geometries compiled so far (the IR's square first)."""
        return list(self._compiled)

    def _net_hw(self, image_bgr: np.ndarray) -> tuple[int, int]:
        """Network input size for a frame: rectangular (compiled once per frame geometry, at most
        ``MAX_SHAPES``), or the IR's square when rect input is off, unsupported by this IR or exhausted."""
        check_image(image_bgr)
        if not self._rect_ok:
            return self.input_hw
        hw = rect_input_hw((image_bgr.shape[1], image_bgr.shape[0]), self.input_hw)
        if hw in self._compiled:
            return hw
        if len(self._compiled) >= MAX_SHAPES:
            return self.input_hw  # many geometries (an image folder): no more compiles, nothing evicted
        try:
            self._compiled[hw] = self._compile(reshape_yolo_ir(self._raw, hw))
        except RectUnsupported as exc:
            log.warning("rectangular input not possible with this IR (%s), using its square input", exc)
            self._rect_ok = False
            return self.input_hw
        log.info("detector compiled for the frame geometry", extra={"input_hw": list(hw)})
        return hw

    def _decode(self, output: np.ndarray, box: Letterbox) -> Detections:
        return decode(
            output,
            box,
            conf_threshold=self.cfg.conf_threshold,
            iou_threshold=self.cfg.iou_threshold,
            classes=self._classes,
            max_detections=self.cfg.max_detections,
        )

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """One frame, synchronously (uses its own request, so it never disturbs ``stream``)."""
        hw = self._net_hw(image_bgr)
        if hw not in self._requests:
            self._requests[hw] = (self._compiled[hw].create_infer_request(), [None])
        request, last = self._requests[hw]
        box = letterbox_into(image_bgr, request.get_input_tensor().data[0], last[0])
        last[0] = box
        request.infer()
        return self._decode(request.get_output_tensor(0).data, box)

    def stream(self, frames: Iterable[Frame]) -> Iterator[tuple[Frame, Detections]]:
        """Detect on every frame with up to ``plan.inflight`` requests in flight; yields in input order.

        A frame that cannot be processed (wrong shape or dtype) raises, after the requests in
        flight have finished, so no result of an earlier frame is lost silently. A frame of another
        geometry (a camera reconfigured) first lets the frames in flight finish, then switches to the
        model compiled for it.
        """
        done: dict[int, tuple[Frame, Detections] | BaseException] = {}
        cond = threading.Condition()

        def on_done(request: ov.InferRequest, userdata: tuple[int, Frame, Letterbox]) -> None:
            seq, frame, box = userdata
            try:
                result: tuple[Frame, Detections] | BaseException = (
                    frame,
                    self._decode(request.get_output_tensor(0).data, box),
                )
            except BaseException as exc:  # handed to the caller's thread
                result = exc
            with cond:
                done[seq] = result
                cond.notify_all()

        submitted = 0
        next_out = 0
        active: tuple[int, int] | None = None
        queue: ov.AsyncInferQueue | None = None
        boxes: list[Letterbox | None] = []  # geometry last written into each request's canvas

        def ready(block: bool) -> Iterator[tuple[Frame, Detections]]:
            nonlocal next_out
            while next_out < submitted:
                with cond:
                    if block:
                        while next_out not in done:
                            cond.wait()
                    item = done.pop(next_out, None)
                if item is None:
                    return
                next_out += 1
                if isinstance(item, BaseException):
                    raise item
                yield item

        try:
            for frame in frames:
                hw = self._net_hw(frame.image)
                if hw != active:
                    yield from ready(block=True)  # the other geometry's frames first, in order
                    if hw not in self._queues:
                        self._queues[hw] = (ov.AsyncInferQueue(self._compiled[hw], self.plan.inflight),
                                            [None] * self.plan.inflight)
                    queue, boxes = self._queues[hw]
                    queue.set_callback(on_done)
                    active = hw
                assert queue is not None
                rid = queue.get_idle_request_id()  # blocks while all requests are busy
                canvas = queue[rid].get_input_tensor().data[0]
                boxes[rid] = letterbox_into(frame.image, canvas, boxes[rid])
                queue.start_async(None, (submitted, frame, boxes[rid]))
                submitted += 1
                yield from ready(block=False)
            yield from ready(block=True)
        finally:
            if queue is not None:
                queue.wait_all()

    def close(self) -> None:
        for queue, _ in self._queues.values():
            queue.wait_all()
        self._queues.clear()
        self._requests.clear()
        self._compiled.clear()


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception from")]
    return (useful or lines or [type(exc).__name__])[-1]
