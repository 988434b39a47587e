"""One JSON object per line: the log format of the functions (``triggers/main.py``) and of
the servers (scheduler, prediction server, Vertex AI container, supervisor).

Cloud Logging turns each such line into one structured entry (``severity``, ``message``).
Every line goes out as **one** ``write(2)`` of the whole record and its newline, straight
to the process's standard output (file descriptor 1), under a lock:

- threads of one process never interleave (the lock);
- processes that share the output never join or split each other's lines: one write to a
  file opened for appending (the local stack's logs) lands whole, and so does one of at
  most ``PIPE_BUF`` (4 KiB) bytes to a pipe (Cloud Logging's collector);
- nothing in between can split a record: ``sys.stdout`` is not used, because a server may
  swap it per request (functions-framework's ``LOG_EXECUTION_ID`` puts a process-wide
  wrapper there that writes a record and its newline apart, so that concurrent requests'
  lines were joined, ``{...}{...}``), and ``print()`` writes the text and its newline apart.

A traceback stays inside its line (``exception``): JSON escapes every newline.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "JsonLineHandler", "configure", "write_line"]

STDOUT = 1  # the file descriptor, whatever sys.stdout is at the time
_LOCK = threading.Lock()


def write_line(entry: Mapping[str, Any], fd: int = STDOUT) -> None:
    """Write ``entry`` as one JSON line to ``fd`` (standard output by default)."""
    _write(json.dumps(entry, default=str), fd)


def _write(document: str, fd: int) -> None:
    """``document`` (JSON, so free of raw newlines) and its newline in one ``write(2)``,
    continued only if the kernel took part of it."""
    data = memoryview(document.encode() + b"\n")
    with _LOCK:
        while data:
            data = data[os.write(fd, data) :]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": record.levelname,
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class JsonLineHandler(logging.Handler):
    """A logging handler that writes each record as one JSON line (:func:`write_line`)."""

    def __init__(self, fd: int = STDOUT, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.fd = fd
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record), self.fd)
        except Exception:  # noqa: BLE001 (logging's own policy: report, never raise)
            self.handleError(record)


def configure(level: int = logging.INFO) -> None:
    """Every logger of this process, and every warning, writes JSON lines to stdout
    (replacing other setups)."""
    logging.basicConfig(level=level, handlers=[JsonLineHandler()], force=True)
    logging.captureWarnings(True)
