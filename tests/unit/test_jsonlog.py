"""The log lines of the servers and functions: one JSON object per line, under any
concurrency (threads, processes sharing the output, a server that swaps sys.stdout per
request), tracebacks too."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

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


# Threads of several processes write to one file opened for appending (as the local stack
# gives every part's output), while sys.stdout is swapped per "request" as
# functions-framework does with LOG_EXECUTION_ID (a process-wide wrapper that wrote a
# record and its newline apart: lines came out joined, {...}{...}).
SHARED = """
import contextlib, logging, sys, threading
from functions_framework import execution_id
from retrain import jsonlog
jsonlog.configure()
log = logging.getLogger("retrain.test")
process = sys.argv[1]
def request(n):
    for i in range(150):
        execution_id._set_current_context(execution_id.ExecutionContext(f"x-{n}", "s"))
        with contextlib.redirect_stdout(execution_id.LoggingHandlerAddExecutionId(sys.stdout)):
            if i % 2:
                jsonlog.write_line({"process": process, "thread": n, "i": i, "pad": "y" * 3000})
            else:
                log.info("process %s thread %d line %d %s", process, n, i, "x" * 3000)
threads = [threading.Thread(target=request, args=(n,)) for n in range(6)]
for t in threads: t.start()
for t in threads: t.join()
"""


def test_threads_of_processes_sharing_one_output_write_whole_lines(tmp_path: Path) -> None:
    out = tmp_path / "shared.log"
    with out.open("ab") as shared:  # O_APPEND, one file for all, as retrain up does
        argv = [sys.executable, "-c", SHARED]
        children = [
            subprocess.Popen([*argv, str(p)], stdout=shared, stderr=subprocess.PIPE)
            for p in range(3)
        ]
        for child in children:
            _, err = child.communicate(timeout=120)
            assert child.returncode == 0, err.decode()
            assert not err

    lines = out.read_bytes().split(b"\n")
    assert lines.pop() == b""  # the last line ends too
    entries = [json.loads(line) for line in lines]  # each line is one whole object
    assert len(entries) == 3 * 6 * 150
    direct = [e for e in entries if "pad" in e]
    assert len(direct) == 3 * 6 * 75
    assert {(e["process"], e["thread"]) for e in direct} == {
        (str(p), n) for p in range(3) for n in range(6)
    }
