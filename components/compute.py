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
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["available_cpus", "thread_limit"]


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
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 (loads the native libraries)

    limit = threads or available_cpus()
    with threadpool_limits(limits=limit):
        yield limit
