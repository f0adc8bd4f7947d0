"""Writes the appliance image's test clip: a synthetic camera scene the project makes itself.

The boot test points the appliance at this file (looped in real time, like a camera) so the whole
path (decode -> detect -> track -> Avro -> Kafka) runs inside the VM without any third-party video.
Figures walk across a textured floor; they are drawn, not filmed, so the detector may or may not call
them people: the appliance sends a message per frame either way (boxes every frame).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np


def render(path: Path, width: int = 640, height: int = 360, fps: int = 10, seconds: int = 20) -> int:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write mp4v video to {path}")
    rng = np.random.default_rng(6)
    floor = rng.integers(90, 150, size=(height, width, 3), dtype=np.uint8)
    floor = cv2.GaussianBlur(floor, (0, 0), 3)
    walkers = [(-60, 1.2 * height / 3, 6.0, (40, 40, 160)), (width + 40, 2.0 * height / 3, -4.5, (150, 60, 30))]
    n = fps * seconds
    for i in range(n):
        frame = floor.copy()
        for x0, y, vx, colour in walkers:
            x = int(x0 + vx * i) % (width + 120) - 60
            h = int(height * 0.45)
            top = int(y - h / 2)
            cv2.circle(frame, (x, top + h // 10), h // 10, (120, 160, 200), -1)  # head
            cv2.rectangle(frame, (x - h // 8, top + h // 5), (x + h // 8, top + int(h * 0.6)), colour, -1)  # torso
            swing = int(h / 10 * np.sin(i / 2))
            cv2.line(frame, (x - h // 16, top + int(h * 0.6)), (x - h // 16 + swing, top + h), (40, 40, 40), h // 14)
            cv2.line(frame, (x + h // 16, top + int(h * 0.6)), (x + h // 16 - swing, top + h), (40, 40, 40), h // 14)
        cv2.putText(frame, f"reidfleet test clip  frame {i:04d}", (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (255, 255, 255), 1, cv2.LINE_AA)
        writer.write(frame)
    writer.release()
    return n


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "testclip.mp4")
    frames = render(out)
    print(f"    test clip: {out.name}, {frames} frames, {out.stat().st_size // 1024} KiB")
