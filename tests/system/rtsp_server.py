"""A live RTSP camera for fault tests: GStreamer's RTSP server (Debian gir1.2-gst-rtsp-server-1.0).

Runs under the system Python (``/usr/bin/python3``, which has PyGObject from python3-gi), not the
project venv. Serves a moving test pattern as MJPEG over RTP at ``rtsp://127.0.0.1:PORT/cam``.
Stopping this process is "the camera died"; starting it again on the same port is "it came back".
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width={w},height={h},"
            "framerate={fps}/1 ! jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26 )")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    a = p.parse_args()
    Gst.init(None)
    srv = GstRtspServer.RTSPServer()
    srv.set_address("127.0.0.1")
    srv.set_service(str(a.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE.format(w=a.width, h=a.height, fps=a.fps))
    factory.set_shared(True)
    srv.get_mount_points().add_factory("/cam", factory)
    if srv.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{a.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"rtsp://127.0.0.1:{a.port}/cam ready", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
