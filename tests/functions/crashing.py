"""``on_data_arrival`` that dies in the middle of its first request, after it claimed the
event (its create-only claim is committed) and before it took the model's lease to launch:
the process exits, as a crashed instance would.

gunicorn (under functions-framework) starts a fresh worker; Pub/Sub redelivers the event
to it, the claim is found still waiting (``pending``), and this time the real handler
runs to the end.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

TRIGGERS = Path(__file__).resolve().parents[2] / "triggers" / "main.py"
MARKER = Path(os.environ["CRASH_MARKER"])

_spec = importlib.util.spec_from_file_location("triggers_main_under_test", TRIGGERS)
assert _spec is not None
assert _spec.loader is not None
_main: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)
_real_kick = _main._SERVICE.kick


def _kick_or_die(*args: Any, **kwargs: Any) -> Any:
    if not MARKER.exists():
        MARKER.write_text("claimed, then died before the launch\n", encoding="utf-8")
        os._exit(1)
    return _real_kick(*args, **kwargs)


_main._SERVICE.kick = _kick_or_die
on_data_arrival = _main.on_data_arrival
