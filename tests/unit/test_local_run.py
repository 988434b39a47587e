"""Following a kfp.local run from its log, the run's identity, and whether its worker lives."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from components.runs import RunContext
from pipelines.local_run import StepEvent, parse_progress, worker_alive

pytestmark = pytest.mark.unit

# As kfp.local 2.17 writes it, colours included.
TASK = "\x1b[96m'{}'\x1b[0m"
LOG = "\n".join(
    [
        "12:27:33.662 - INFO - Running pipeline: \x1b[95m'retrain'\x1b[0m",
        f"12:27:33.665 - INFO - Executing task {TASK.format('preprocess-data')}",
        "12:27:33.665 - INFO - Streamed logs:",
        "    some output of the task",
        f"12:27:34.377 - INFO - Task {TASK.format('preprocess-data')} finished with status "
        "\x1b[92mSUCCESS\x1b[0m",
        f"12:27:34.379 - INFO - Executing task {TASK.format('train-model')}",
        f"12:27:36.296 - ERROR - Task {TASK.format('train-model')} finished with status "
        "\x1b[91mFAILURE\x1b[0m",
    ]
)


def test_progress_is_read_from_the_kfp_log() -> None:
    assert list(parse_progress(LOG)) == [
        StepEvent("preprocess-data", "running"),
        StepEvent("preprocess-data", "SUCCESS"),
        StepEvent("train-model", "running"),
        StepEvent("train-model", "FAILURE"),
    ]


def test_partial_log_gives_what_happened_so_far() -> None:
    assert list(parse_progress(LOG.splitlines()[1])) == [StepEvent("preprocess-data", "running")]


def test_run_context_refuses_an_unknown_reason() -> None:
    assert RunContext.parse("m", "r", "k", "drift").reason == "drift"
    with pytest.raises(ValueError, match="reason 'whim' is not one of data, drift"):
        RunContext.parse("m", "r", "k", "whim")


def test_a_scheduled_job_is_named_after_the_pipeline_job() -> None:
    run = RunContext.parse("m", "", "", "schedule", "retrain-m 2026/11/25 03:00")
    assert (run.run_id, run.request_id) == ("retrain-m-2026-11-25-03-00", run.run_id)
    assert RunContext.parse("m", "r", "k", "data", "job").run_id == "r", "a given run id wins"
    with pytest.raises(ValueError, match="run_id is empty and the pipeline job has no name"):
        RunContext.parse("m", "", "", "schedule", "")


def test_a_worker_is_alive_only_as_the_process_it_recorded() -> None:
    """What the local launcher tells the sweep (running or ended): the pid with the same
    start time; a pid that ended, or that was recycled by another process, is not alive."""
    me = {"pid": os.getpid(), "create_time": psutil.Process().create_time()}
    assert worker_alive(me)
    assert not worker_alive({**me, "create_time": me["create_time"] - 60}), "a recycled pid"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(ended.pid).create_time()
    ended.wait()
    assert not worker_alive({"pid": ended.pid, "create_time": created})
    assert not worker_alive({"pid": os.getpid()})  # a record without its start time
