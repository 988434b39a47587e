"""One JSON object per line: the log format of the servers (scheduler, prediction server,
Vertex AI container, supervisor), as the functions write theirs (``triggers/main.py``).

Cloud Logging turns each such line into one structured entry (``severity``, ``message``).
A logging handler writes a record and its newline in one call under its lock, so lines of
concurrent requests are never joined; a traceback stays inside its line (``exception``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "configure"]


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


def configure(level: int = logging.INFO) -> None:
    """Every logger of this process, and every warning, writes JSON lines to stdout
    (replacing other setups)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
