"""How many OpenMP and BLAS threads a step may use.

Each step's numeric work (a fit, a prediction over the evaluation rows) runs inside
:func:`thread_limit`. The limit is the model's ``threads`` setting, or by default the CPUs
that this process may run on (its affinity mask, not the machine's core count): a step on a
machine it shares, or in a container given fewer CPUs than the host has, does not start a
thread per host core. Oversubscribed OpenMP threads spin against each other: on a busy
machine that made one fit many times slower (see ``make bench``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["available_cpus", "thread_limit", "threadpools"]

_FOUND: list[tuple[int, Any]] = []  # (len(sys.modules) when found, the controller)


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def thread_limit(threads: int | None) -> Iterator[int]:
    """OpenMP and BLAS pools limited to ``threads`` (default :func:`available_cpus`) inside;
    yields the limit."""
    limit = threads or available_cpus()
    with threadpools().limit(limits=limit):
        yield limit


def threadpools() -> Any:
    """threadpoolctl's ``ThreadpoolController`` of the OpenMP and BLAS libraries loaded now.

    Finding them scans every loaded library (0.1 s and more in a process that has loaded
    scikit-learn, pyarrow and the Google clients, more on a busy machine), so the controller
    is kept and found again only once modules were imported since (a native library comes
    with an import). The task zygote finds it before it forks (pipelines.zygote)."""
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415 (loads the native libraries)

    if not _FOUND or _FOUND[0][0] != len(sys.modules):
        controller = ThreadpoolController()
        _FOUND[:] = [(len(sys.modules), controller)]
    return _FOUND[0][1]
