"""Health and Prometheus endpoints on one small HTTP server per process.

``/healthz`` answers 200 with a JSON body while the service's health callable says ok, 503
otherwise (so systemd, Kubernetes or the image's status page can act on it); ``/metrics`` is the
Prometheus text format. Metric names follow ``reidfleet_<component>_<name>_<unit>``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

HealthFn = Callable[[], dict[str, Any]]


class HealthServer:
    """Serves ``/healthz`` and ``/metrics``; ``port=0`` picks a free port (see ``.port``)."""

    def __init__(self, registry: CollectorRegistry, health: HealthFn, host: str = "127.0.0.1",
                 port: int = 0, extra_routes: dict[str, Callable[[], tuple[int, str, bytes]]] | None = None):
        self.registry = registry
        self.health = health
        routes = dict(extra_routes or {})
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/healthz", "/health"):
                    try:
                        body = outer.health()
                    except Exception as exc:  # a broken health fn must read as unhealthy, not crash
                        body = {"ok": False, "error": repr(exc)}
                    self._send(200 if body.get("ok") else 503, "application/json",
                               json.dumps(body, default=str).encode())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(outer.registry))
                elif path in routes:
                    self._send(*routes[path]())
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health and metrics on http://%s:%d/healthz and /metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
