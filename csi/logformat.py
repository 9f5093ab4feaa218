"""How the driver's processes write their log: text for a terminal, or one JSON object per line for a log
pipeline (chart value logFormat). Secrets never reach here: the interceptor and the runner redact them before
anything is logged, and only the formatted message is written (no record arguments, no extra attributes)."""

from __future__ import annotations

import datetime
import json
import logging
from typing import TextIO

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """{"time": "2026-11-26T04:01:02.345Z", "level": "INFO", "logger": "csi.server", "message": "..."} per line,
    with "exception" (the traceback, as text) when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines: a multi-line message or traceback stays on its line.
        return json.dumps(out, ensure_ascii=False, default=str)


def handler(fmt: str, stream: TextIO) -> logging.Handler:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    h = logging.StreamHandler(stream)
    h.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    return h
