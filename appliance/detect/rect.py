"""Rectangular inference for a YOLO11 IR exported at a fixed square size.

Why: a camera's frame is 16:9 or 4:3, and letterboxing it into the IR's 640×640 spends 40 % (16:9)
or 25 % (4:3) of every inference on grey padding. YOLO's own video inference pads only to the next
multiple of the stride (640×384 for 16:9, 640×480 for 4:3) at the same scale, so boxes are the same
and the network does proportionally less work. An IR exported with ``dynamic=False`` cannot simply be
reshaped: tracing baked the grid into a few constants (the attention block's reshapes, the head's
anchor points and strides, the DFL reshapes). :func:`reshape_yolo_ir` rewrites exactly those, after
checking each holds the value a square export implies, and refuses (``RectUnsupported``) any graph
it does not recognise, so the caller falls back to the square input instead of computing wrong boxes.
"""

from __future__ import annotations

import math

import numpy as np
import openvino as ov
import openvino.opset13 as ops

STRIDES = (8, 16, 32)


class RectUnsupported(ValueError):
    """The IR's grid-dependent constants are not the ones a YOLO11 square export has."""


def rect_input_hw(source_wh: tuple[int, int], model_hw: tuple[int, int], stride: int = STRIDES[-1]) -> tuple[int, int]:
    """Network (height, width) for a frame: the frame at the square model's scale, each side padded
    up to a multiple of ``stride`` (never larger than the model's own side)."""
    sw, sh = source_wh
    mh, mw = model_hw
    if sw <= 0 or sh <= 0:
        raise ValueError(f"image has no pixels: {sw}x{sh}")
    scale = min(mw / sw, mh / sh)
    h = min(mh, math.ceil(round(sh * scale) / stride) * stride)
    w = min(mw, math.ceil(round(sw * scale) / stride) * stride)
    return h, w


def anchor_points(hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The head's constants for an input of ``hw``: points ``[1, 2, A]`` (x, y cell centres, row-major
    per level) and strides ``[1, 1, A]``, as Ultralytics' ``make_anchors`` builds them."""
    pts, strides = [], []
    for s in STRIDES:
        gh, gw = hw[0] // s, hw[1] // s
        ys, xs = np.meshgrid(np.arange(gh, dtype=np.float32) + 0.5, np.arange(gw, dtype=np.float32) + 0.5,
                             indexing="ij")
        pts.append(np.stack([xs.reshape(-1), ys.reshape(-1)]))
        strides.append(np.full(gh * gw, s, np.float32))
    return np.concatenate(pts, axis=1)[None], np.concatenate(strides)[None, None]


def _anchors(hw: tuple[int, int]) -> int:
    return sum((hw[0] // s) * (hw[1] // s) for s in STRIDES)


def reshape_yolo_ir(model: ov.Model, hw: tuple[int, int]) -> ov.Model:
    """A copy of ``model`` (a square YOLO11 IR, before pre-/post-processing is added) taking
    ``[1, 3, h, w]``. Raises :class:`RectUnsupported` for any graph this does not recognise."""
    h, w = hw
    if h % STRIDES[-1] or w % STRIDES[-1] or h <= 0 or w <= 0:
        raise RectUnsupported(f"input {h}x{w} is not a positive multiple of {STRIDES[-1]}")
    shape = model.inputs[0].get_partial_shape()
    if shape.is_dynamic or len(shape) != 4:
        raise RectUnsupported(f"expected a static [1,3,H,W] input, got {shape}")
    old = (shape[2].get_length(), shape[3].get_length())
    if old == (h, w):
        return model.clone()
    if old[0] != old[1]:
        raise RectUnsupported(f"the IR's input {old[0]}x{old[1]} is not square")
    m = model.clone()
    n_old, n_new = _anchors(old), _anchors((h, w))
    top = STRIDES[-1]  # the coarsest grid, where the attention block works
    g_old, g_new = (old[0] // top, old[1] // top), (h // top, w // top)
    pts_old, str_old = anchor_points(old)
    pts_new, str_new = anchor_points((h, w))
    replaced = {"anchor_points": 0, "strides": 0, "reshapes": 0}
    for op in m.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Constant" and list(op.get_output_shape(0)) in ([1, 2, n_old], [1, 1, n_old]):
            data = op.get_data()
            if data.shape[1] == 2 and np.array_equal(data, pts_old):
                new, key = pts_new, "anchor_points"
            elif data.shape[1] == 1 and np.array_equal(data, str_old):
                new, key = str_new, "strides"
            else:
                raise RectUnsupported(f"constant {op.get_friendly_name()} of shape {data.shape} is not the head's "
                                      "anchor points or strides")
            const = ops.constant(new.astype(data.dtype))
            for target in list(op.output(0).get_target_inputs()):
                target.replace_source_output(const.output(0))
            replaced[key] += 1
        elif kind == "Reshape":
            src = op.input_value(1).get_node()
            if src.get_type_name() != "Constant":
                continue
            target = [int(v) for v in src.get_vector()]
            new_target = list(target)
            if len(target) == 4 and target[-2:] == list(g_old):
                new_target[-2:] = list(g_new)  # attention output back to the coarsest grid
            for i, v in enumerate(target):
                if v == n_old:
                    new_target[i] = n_new  # all anchors (DFL)
                elif v == g_old[0] * g_old[1] and i == len(target) - 1:
                    new_target[i] = g_new[0] * g_new[1]  # attention over the coarsest grid's cells
            if new_target != target:
                const = ops.constant(np.array(new_target, dtype=src.get_output_element_type(0).to_dtype()))
                op.input(1).replace_source_output(const.output(0))
                replaced["reshapes"] += 1
    if replaced["anchor_points"] != 1 or replaced["strides"] != 1:
        raise RectUnsupported(f"expected one anchor-point and one stride constant, rewrote {replaced}")
    try:
        # Model.reshape() re-validates against the old input shape on the way and trips over the new
        # constants; setting the parameter and re-inferring once sees only the final state.
        m.get_parameters()[0].set_partial_shape(ov.PartialShape([1, 3, h, w]))
        m.validate_nodes_and_infer_types()
    except RuntimeError as exc:
        raise RectUnsupported(f"the graph does not reshape to {h}x{w}: {str(exc).splitlines()[-1][:200]}") from exc
    out = m.outputs[0].get_partial_shape()
    if out.is_dynamic or out[2].get_length() != n_new:
        raise RectUnsupported(f"reshaped output is {out}, expected {n_new} anchors")
    return m
