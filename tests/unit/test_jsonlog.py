"""The servers' log lines: one JSON object per line, under any concurrency, tracebacks too."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

CHILD = """
import logging, threading
from retrain import jsonlog
jsonlog.configure()
log = logging.getLogger("retrain.test")
def spam(n):
    for i in range(300):
        log.info("thread %d line %d %s", n, i, "x" * 500)
threads = [threading.Thread(target=spam, args=(n,)) for n in range(8)]
for t in threads: t.start()
for t in threads: t.join()
try:
    raise ValueError("boom")
except ValueError:
    log.exception("it failed")
"""


def test_concurrent_lines_and_a_traceback_are_one_json_object_each() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip

    lines = done.stdout.splitlines()
    entries = [json.loads(line) for line in lines]  # each line is one whole object
    assert len(entries) == 8 * 300 + 1
    assert {e["severity"] for e in entries} == {"INFO", "ERROR"}
    failed = entries[-1]
    assert failed["message"] == "it failed"
    assert "ValueError: boom" in failed["exception"]
    assert failed["logger"] == "retrain.test"
    assert not done.stderr


def test_the_level_is_kept() -> None:
    from retrain.jsonlog import JsonFormatter  # noqa: PLC0415

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    assert json.loads(JsonFormatter().format(record))["severity"] == "WARNING"
