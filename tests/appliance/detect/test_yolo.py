"""Letterbox, decode and NMS on synthetic arrays (no model, no files)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.detect.yolo import PAD_VALUE, Letterbox, decode, letterbox_into, nms


def test_letterbox_geometry_matches_ultralytics_rounding() -> None:
    box = Letterbox.fit((1920, 1080), (640, 640))
    assert box.resized_wh == (640, 360)
    assert (box.pad_x, box.pad_y) == (0, 140)
    tall = Letterbox.fit((480, 640), (640, 640))
    assert tall.resized_wh == (480, 640)
    assert (tall.pad_x, tall.pad_y) == (80, 0)
    odd = Letterbox.fit((641, 500), (640, 640))  # padding 70.5 -> top 70 (rounded with -0.1)
    assert odd.pad_y == round((640 - odd.resized_wh[1]) / 2 - 0.1)


def test_letterbox_writes_into_canvas_and_pads() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    img[..., 0] = 10  # B
    img[..., 2] = 250  # R
    canvas = np.zeros((640, 640, 3), np.uint8)
    box = letterbox_into(img, canvas)
    assert box.resized_wh == (640, 320) and box.pad_y == 160
    assert (canvas[:160] == PAD_VALUE).all() and (canvas[480:] == PAD_VALUE).all()
    inner = canvas[160:480]
    assert (inner[..., 0] == 10).all() and (inner[..., 2] == 250).all()  # stays BGR: the graph converts
    # same geometry again: padding is not rewritten, content is
    canvas[0, 0] = 0
    img[..., 0] = 20
    letterbox_into(img, canvas, box)
    assert canvas[0, 0, 0] == 0 and (canvas[160:480, :, 0] == 20).all()


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 10, 3), np.uint8),
    ],
)
def test_letterbox_rejects_bad_images(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image"):
        letterbox_into(bad, np.zeros((640, 640, 3), np.uint8))


def test_nms_matches_bruteforce_reference() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (200, 2))
    wh = rng.uniform(10, 80, (200, 2))
    xyxy = np.hstack([xy, xy + wh]).astype(np.float32)
    scores = rng.uniform(0, 1, 200).astype(np.float32)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    ref: list[int] = []
    for i in np.argsort(-scores):
        if all(iou(xyxy[i], xyxy[j]) <= 0.45 for j in ref):
            ref.append(int(i))
    assert nms(xyxy, scores, 0.45).tolist() == ref


def _head(boxes_cxcywh: list[tuple[float, float, float, float]], scores: dict[int, list[float]], n: int = 8400):
    out = np.zeros((1, 84, n), np.float32)
    for a, (cx, cy, w, h) in enumerate(boxes_cxcywh):
        out[0, :4, a] = (cx, cy, w, h)
    for cls, vals in scores.items():
        out[0, 4 + cls, : len(vals)] = vals
    return out


def test_decode_maps_back_to_source_pixels_and_filters() -> None:
    box = Letterbox.fit((1920, 1080), (640, 640))  # scale 1/3, pad_y 140
    # anchor 0: person 0.9 at input (100..200, 240..440); anchor 1: duplicate 0.8; anchor 2: weak 0.2;
    # anchor 3: a strong "car" (class 2) that person-only decoding must ignore
    head = _head(
        [(150, 340, 100, 200), (152, 342, 100, 200), (500, 300, 40, 80), (400, 400, 50, 50)],
        {0: [0.9, 0.8, 0.2, 0.0], 2: [0.0, 0.0, 0.0, 0.95]},
    )
    d = decode(head, box, conf_threshold=0.25, iou_threshold=0.45)
    assert len(d) == 1
    np.testing.assert_allclose(d.xyxy[0], [300, 300, 600, 900], atol=1e-3)
    assert d.confidence[0] == pytest.approx(0.9) and d.class_id[0] == 0 and d.tracker_id[0] == -1
    both = decode(head, box, conf_threshold=0.25, iou_threshold=0.45, classes=(0, 2))
    assert sorted(both.class_id.tolist()) == [0, 2]
    assert len(decode(head, box, conf_threshold=0.1, iou_threshold=0.45)) == 2  # the weak one too
    assert len(decode(head, box, conf_threshold=0.1, iou_threshold=0.99)) == 3  # duplicate survives


def test_decode_clips_to_image_and_handles_empty() -> None:
    box = Letterbox.fit((640, 640), (640, 640))
    d = decode(_head([(5, 5, 40, 40)], {0: [0.7]}), box, conf_threshold=0.25, iou_threshold=0.45)
    assert d.xyxy[0, 0] == 0 and d.xyxy[0, 1] == 0
    assert len(decode(_head([], {}), box, conf_threshold=0.25, iou_threshold=0.45)) == 0
    with pytest.raises(ValueError, match="outside"):
        decode(_head([], {}), box, conf_threshold=0.25, iou_threshold=0.45, classes=(80,))
    with pytest.raises(ValueError, match="YOLO head"):
        decode(np.zeros((84, 8400), np.float32), box, conf_threshold=0.25, iou_threshold=0.45)


def test_rect_input_is_the_square_scale_padded_to_the_stride() -> None:
    from appliance.detect.rect import anchor_points, rect_input_hw

    assert rect_input_hw((1920, 1080), (640, 640)) == (384, 640)  # 16:9: 640x360 -> 384
    assert rect_input_hw((768, 576), (640, 640)) == (480, 640)  # 4:3
    assert rect_input_hw((1080, 1920), (640, 640)) == (640, 384)  # portrait
    assert rect_input_hw((640, 640), (640, 640)) == (640, 640)
    assert rect_input_hw((3000, 100), (640, 640)) == (32, 640)
    with pytest.raises(ValueError):
        rect_input_hw((0, 10), (640, 640))
    pts, strides = anchor_points((384, 640))
    assert pts.shape == (1, 2, 48 * 80 + 24 * 40 + 12 * 20) and strides.shape == (1, 1, pts.shape[2])
    assert pts[0, :, 0].tolist() == [0.5, 0.5] and pts[0, :, 80].tolist() == [0.5, 1.5]  # row-major, x first
    assert strides[0, 0, 0] == 8 and strides[0, 0, -1] == 32
