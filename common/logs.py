"""Structured logging: one JSON object per line on stderr, so journald, Loki or `jq` can read it.

Every service calls :func:`setup_logging` once at start. Modules use ``logging.getLogger(__name__)``
with lazy %-args; ``extra={...}`` keys become JSON fields. Payloads are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(service: str, level: str | None = None, *, json_lines: bool | None = None) -> None:
    """Configure the root logger. ``REIDFLEET_LOG_LEVEL`` and ``REIDFLEET_LOG_FORMAT=text`` override."""
    level = (level or os.environ.get("REIDFLEET_LOG_LEVEL", "INFO")).upper()
    if json_lines is None:
        json_lines = os.environ.get("REIDFLEET_LOG_FORMAT", "json") != "text"
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
