"""One OpenVINO runner for every CPU embedder: uint8 NHWC BGR in, unit-length float32 rows out.

Colour order, scaling and layout are folded into the compiled graph with OpenVINO's
PrePostProcessor, so the Python side only resizes and stacks crops (no float conversion, no
transpose, no per-pixel arithmetic in NumPy). The batch dimension is made dynamic because the
OMZ IRs are exported for batch 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from server.embed.base import l2_normalise
from server.embed.preprocess import batches, resize_stack


class OpenVinoEmbedRunner:
    def __init__(self, model: Any, *, height: int, width: int, rgb: bool, mean: Sequence[float] | None,
                 scale: Sequence[float] | None, device: str, threads: int, batch_size: int) -> None:
        import openvino as ov
        from openvino.preprocess import ColorFormat, PrePostProcessor

        core = ov.Core()
        name = model.inputs[0].any_name
        model.reshape({name: [-1, 3, height, width]})
        ppp = PrePostProcessor(model)
        inp = ppp.input()
        inp.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
        inp.model().set_layout(ov.Layout("NCHW"))
        steps = inp.preprocess().convert_element_type(ov.Type.f32)
        if rgb:
            steps.convert_color(ColorFormat.RGB)
        if mean is not None:
            steps.mean(list(mean))
        if scale is not None:
            steps.scale(list(scale))
        model = ppp.build()
        props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, device, props)
        self.request = self.compiled.create_infer_request()
        self.height, self.width, self.batch_size = height, width, batch_size
        self.dim = int(self.compiled.outputs[0].partial_shape[1].get_length())

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        stack = resize_stack(crops_bgr, self.height, self.width)
        out = np.empty((len(stack), self.dim), dtype=np.float32)
        for s in batches(len(stack), self.batch_size):
            res = self.request.infer({0: stack[s]})
            out[s] = np.asarray(res[self.compiled.outputs[0]], dtype=np.float32).reshape(s.stop - s.start, -1)
        return l2_normalise(out)
