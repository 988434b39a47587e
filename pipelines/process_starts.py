"""When a process started, as records keep it: ``{"pid", "create_time", "boot_time"}``.

psutil's ``create_time`` is the start counted from boot plus the boot time as the wall clock
says *now*, so a clock step (NTP, a resumed VM) moves it. A record also keeps the boot time
of the moment it was made, and a process is recognised by its start counted from boot. A
record without ``boot_time`` (written before it was kept) is compared as before.

(psutil directly, not retrain.localstack: the cloud functions' source holds this module,
through the launchers, and no local-stack code.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["record_of", "same_start", "since_boot", "started_since_boot"]

_SAME = 0.5  # seconds: psutil's create time is in clock ticks (10 ms) plus float rounding


def record_of(proc: Any) -> dict[str, float]:
    """The record of a ``psutil.Process``."""
    import psutil  # noqa: PLC0415

    return {"pid": proc.pid, "create_time": proc.create_time(), "boot_time": psutil.boot_time()}


def since_boot(record: Mapping[str, Any]) -> float:
    """The recorded start, in seconds since boot (or since the epoch, for an old record)."""
    boot = record.get("boot_time")
    return float(record["create_time"]) - (float(boot) if boot is not None else 0.0)


def started_since_boot(proc: Any, record: Mapping[str, Any]) -> float:
    """``proc``'s start in the frame of :func:`since_boot` of ``record``."""
    import psutil  # noqa: PLC0415

    now: float = proc.create_time()
    return now - psutil.boot_time() if record.get("boot_time") is not None else now


def same_start(proc: Any, record: Mapping[str, Any]) -> bool:
    """Whether ``proc`` is the process ``record`` was made of (not a recycled pid)."""
    return abs(started_since_boot(proc, record) - since_boot(record)) <= _SAME
