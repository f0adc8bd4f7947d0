"""Frame sources: video files, RTSP/HTTP streams and USB cameras through one OpenCV reader.

Why it looks like this:
- Decoding runs in its own thread so it overlaps inference (a 1080p H.264 frame costs a few ms
  of CPU that would otherwise sit on the detector's critical path).
- Files are read at full speed by default with a small bounded prefetch queue (blocking: a file
  never drops frames), or paced at their native FPS with ``realtime``.
- Live sources never build a backlog. The grabber keeps only the latest frame (latest wins);
  every frame the consumer never took is counted in the next frame's ``dropped_before`` and its
  ``frame_index`` still advances, so gaps are visible downstream.
- A live source that fails (camera unplugged, RTSP server gone) reconnects with exponential
  backoff; ``state`` and ``last_error`` are reported in telemetry. Bad inputs that retrying cannot
  fix (a path that does not exist, a file that is not video) fail at once with a clear message.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from appliance.config import SourceConfig
from appliance.types import Frame

log = logging.getLogger(__name__)

SourceKind = Literal["file", "stream", "usb"]
_STREAM_RE = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp|srt)://", re.IGNORECASE)
_DEFAULT_FPS = 25.0


class SourceError(RuntimeError):
    """A source that cannot be used (and retrying would not help, or retries are exhausted)."""


def classify(url: str) -> SourceKind:
    """``stream`` for network URLs, ``usb`` for ``/dev/videoN`` or a bare index, else ``file``."""
    if _STREAM_RE.match(url):
        return "stream"
    if url.isdigit() or re.fullmatch(r"/dev/video\d+", url):
        return "usb"
    return "file"


def _redact(url: str) -> str:
    """Hide ``user:password@`` in URLs before they reach logs or telemetry."""
    return re.sub(r"://[^/@]*@", "://***@", url)


class VideoSource:
    """One camera or file. ``start()`` then iterate ``frames()``; ``close()`` stops the reader thread.

    ``frames()`` ends at the end of a file (unless ``loop``) or when ``stop`` is set, and raises
    :class:`SourceError` when the source fails for good.
    """

    def __init__(
        self,
        cfg: SourceConfig,
        camera_id: str,
        stop: threading.Event | None = None,
        on_decode: Callable[[float], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.camera_id = camera_id
        self.kind: SourceKind = classify(cfg.url)
        self.display_url = _redact(cfg.url)
        self._stop = stop or threading.Event()
        self._closed = threading.Event()
        self._on_decode = on_decode
        self.state = "idle"  # idle | connecting | ok | reconnecting | eof | failed | stopped
        self.last_error: str | None = None
        self.reconnects = 0
        self.frames_read = 0
        self.frames_dropped = 0
        self.fps = cfg.fps or _DEFAULT_FPS
        self.resolution_wh: tuple[int, int] | None = None
        self._cap: cv2.VideoCapture | None = None
        self._thread: threading.Thread | None = None
        self._fatal: SourceError | None = None
        # file mode: bounded FIFO; live mode: one latest-frame slot
        self._fifo: queue.Queue[Frame | None] = queue.Queue(maxsize=cfg.prefetch_frames)
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._next_index = 0

    @property
    def is_live(self) -> bool:
        return self.kind != "file"

    # -- opening --------------------------------------------------------------------------
    def _open_capture(self) -> cv2.VideoCapture:
        url = self.cfg.url
        if self.kind == "file":
            path = Path(url)
            if not path.exists():
                raise SourceError(f"video file not found: {path} (set source.url to a file, rtsp:// URL or camera)")
            if not path.is_file():
                raise SourceError(f"source.url {path} is not a file")
            cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
            if not cap.isOpened():
                cap.release()
                raise SourceError(f"{path} is not a video OpenCV/FFmpeg can decode (corrupt or not a video file)")
            return cap
        if self.kind == "usb":
            target: int | str = int(url) if url.isdigit() else url
            cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
        else:
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.cfg.read_timeout_s * 1000),
            ]
            cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise ConnectionError(f"cannot open {self.display_url} (unreachable, refused, or not a video stream)")
        return cap

    def _read(self, cap: cv2.VideoCapture) -> np.ndarray | None:
        t0 = time.perf_counter()
        ok, image = cap.read()
        if not ok or image is None:
            return None
        if self._on_decode is not None:
            self._on_decode(time.perf_counter() - t0)
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        return image

    def _note_fps(self, cap: cv2.VideoCapture) -> None:
        if self.cfg.fps:
            return
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if math.isfinite(fps) and 1.0 <= fps <= 240.0:
            self.fps = fps

    def start(self) -> VideoSource:
        """Open the source (files: also decode the first frame) and start the reader thread.

        Files fail here with :class:`SourceError`; live sources that cannot connect keep retrying in
        the background (``state == "reconnecting"``) unless ``reconnect_max_attempts`` is 0.
        """
        self.state = "connecting"
        first: np.ndarray | None = None
        if self.kind == "file":
            try:
                cap = self._open_capture()
            except SourceError as exc:
                self._fail(exc)
                raise
            first = self._read(cap)
            if first is None:
                cap.release()
                err = SourceError(f"{self.cfg.url} has no decodable video frames (corrupt or not a video file)")
                self._fail(err)
                raise err
            self._cap = cap
            self._note_fps(cap)
            self.state = "ok"
            target = self._file_loop
        else:
            try:
                self._cap = self._open_capture()
                self._note_fps(self._cap)
                self.state = "ok"
            except ConnectionError as exc:
                self.last_error = str(exc)
                if self.cfg.reconnect_max_attempts == 0:
                    err = SourceError(f"{exc}; giving up (source.reconnect_max_attempts=0)")
                    self._fail(err)
                    raise err from None
                log.warning("source not reachable yet, will retry: %s", exc)
                self.state = "reconnecting"
            target = self._live_loop
        self._thread = threading.Thread(target=target, args=(first,), name="source-decode", daemon=True)
        self._thread.start()
        log.info("source started", extra={"source": self.display_url, "kind": self.kind, "fps": self.fps})
        return self

    def _fail(self, err: SourceError) -> None:
        self.state = "failed"
        self.last_error = str(err)
        self._fatal = err

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._closed.is_set()

    def _make_frame(self, image: np.ndarray, dropped: int = 0) -> Frame:
        self.resolution_wh = (int(image.shape[1]), int(image.shape[0]))
        frame = Frame(self.camera_id, self._next_index, time.time_ns(), image, dropped)
        self._next_index += 1
        self.frames_read += 1
        return frame

    # -- file reader ----------------------------------------------------------------------
    def _put(self, item: Frame | None) -> bool:
        while not self._stopping():
            try:
                self._fifo.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _file_loop(self, first: np.ndarray | None) -> None:
        cap = self._cap
        assert cap is not None
        image = first
        t0 = time.monotonic()
        n = 0
        try:
            while not self._stopping():
                if image is None:
                    image = self._read(cap)
                if image is None:  # end of file
                    if not self.cfg.loop:
                        self.state = "eof"
                        break
                    cap.release()
                    self._cap = None
                    reopened = self._reopen_file()
                    if reopened is None:
                        break
                    cap = self._cap = reopened
                    image = self._read(cap)
                    if image is None:
                        self._fail(SourceError(f"{self.cfg.url}: no frames after rewinding"))
                        break
                    continue
                if self.cfg.realtime:
                    wait = t0 + n / self.fps - time.monotonic()
                    if wait > 0 and self._stop.wait(wait):
                        break
                if not self._put(self._make_frame(image)):
                    break
                n += 1
                image = None
        except Exception as exc:  # a decode crash must reach the consumer, not vanish in a thread
            self._fail(SourceError(f"{self.display_url}: reading failed: {exc}"))
        finally:
            self._put(None)

    def _reopen_file(self) -> cv2.VideoCapture | None:
        """Rewind a looping file. A file that is gone or unreadable at that moment (a share that
        dropped, a clip being replaced) is waited for like a live camera: ``reconnecting`` with backoff,
        so the appliance keeps running and reports it; ``reconnect_max_attempts`` bounds the wait."""
        delay, failures = self.cfg.reconnect_initial_s, 0
        while not self._stopping():
            try:
                cap = self._open_capture()
            except SourceError as exc:
                failures += 1
                self.last_error = str(exc)
                limit = self.cfg.reconnect_max_attempts
                if limit is not None and failures >= limit:
                    self._fail(SourceError(f"{exc}; giving up after {failures} attempts"))
                    return None
                if self.state != "reconnecting":
                    self.reconnects += 1
                    log.warning("looping file unavailable, waiting for it: %s", exc)
                self.state = "reconnecting"
                if self._stop.wait(delay) or self._closed.is_set():
                    return None
                delay = min(delay * 2, self.cfg.reconnect_max_s)
                continue
            if self.state == "reconnecting":
                log.info("looping file is back", extra={"source": self.display_url})
            self.state = "ok"
            return cap
        return None

    # -- live grabber ---------------------------------------------------------------------
    def _live_loop(self, _first: np.ndarray | None) -> None:
        delay = self.cfg.reconnect_initial_s
        failures = 0
        while not self._stopping():
            cap = self._cap
            if cap is None:
                try:
                    cap = self._cap = self._open_capture()
                    self._note_fps(cap)
                    log.info("source connected", extra={"source": self.display_url, "reconnects": self.reconnects})
                except ConnectionError as exc:
                    failures += 1
                    self.last_error = str(exc)
                    limit = self.cfg.reconnect_max_attempts
                    if limit is not None and failures >= limit:
                        self._fail(SourceError(f"{exc}; giving up after {failures} attempts"))
                        break
                    self.state = "reconnecting"
                    log.warning("source reconnect in %.1f s: %s", delay, exc)
                    if self._stop.wait(delay) or self._closed.is_set():
                        break
                    delay = min(delay * 2, self.cfg.reconnect_max_s)
                    continue
            image = self._read(cap)
            if image is None:
                self.last_error = f"{self.display_url}: stream ended or read timed out"
                self.state = "reconnecting"
                self.reconnects += 1
                cap.release()
                self._cap = None
                log.warning("source lost, reconnecting: %s", self.last_error)
                continue
            self.state = "ok"
            failures = 0
            delay = self.cfg.reconnect_initial_s
            with self._cond:
                dropped = 0
                if self._latest is not None:  # the consumer never took it: latest wins
                    dropped = 1 + self._latest.dropped_before
                    self.frames_dropped += 1
                self._latest = self._make_frame(image, dropped)
                self._cond.notify_all()
        if self.state != "failed":
            self.state = "stopped"
        with self._cond:
            self._cond.notify_all()

    # -- consumer side --------------------------------------------------------------------
    def frames(self) -> Iterator[Frame]:
        """Frames in order until end of file or stop; raises :class:`SourceError` if the source died."""
        if self._thread is None:
            raise RuntimeError("call start() before frames()")
        if self.kind == "file":
            while True:
                try:
                    item = self._fifo.get(timeout=0.2)
                except queue.Empty:
                    if self._stopping():
                        return
                    continue
                if item is None:
                    if self._fatal is not None:
                        raise self._fatal
                    return
                yield item
        else:
            while True:
                with self._cond:
                    while self._latest is None and not self._stopping() and self._fatal is None:
                        if not self._thread.is_alive():
                            break
                        self._cond.wait(0.2)
                    frame, self._latest = self._latest, None
                if frame is not None:
                    yield frame
                    continue
                if self._fatal is not None:
                    raise self._fatal
                return

    @property
    def queue_depth(self) -> int:
        if self.kind == "file":
            return self._fifo.qsize()
        return 1 if self._latest is not None else 0

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            # drain so a reader blocked on a full queue sees the close
            while True:
                try:
                    self._fifo.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=max(5.0, self.cfg.read_timeout_s + 1))
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        if self.state not in ("failed", "eof"):
            self.state = "stopped"

    def __enter__(self) -> VideoSource:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()
