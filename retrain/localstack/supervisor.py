"""The local stack heals itself: restart a part that dies, and keep Firestore's data.

``retrain up`` starts this as its own process (``python -m retrain.localstack.supervisor``)
and records it in the state file, in the foreground as with ``--detach``; ``retrain down``
stops it before anything else, so that it restarts nothing that ``down`` stops.

Every round (half a second) it looks at each recorded part: one whose process died is
restarted (:meth:`Stack.restart <retrain.localstack.stack.Stack.restart>`) after a delay
that starts at 1 s and doubles with each restart up to 30 s, and starts again at 1 s once
the part lived a minute. Every :data:`EXPORT_SECONDS` it exports the Firestore emulator's
data, which lives in memory only: a restarted emulator imports the newest export, so a
``kill -9`` of it loses the writes of the last interval at most.

It restarts a part whose process is gone, not one that runs but does not answer (a busy
machine makes a healthy emulator slow to answer; ``retrain restart PART`` is for a hung one).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import typer

from retrain import jsonlog
from retrain.config import load_settings
from retrain.localstack.processes import ProcessRecord
from retrain.localstack.stack import Stack
from retrain.options import ConfigOption

__all__ = ["EXPORT_SECONDS", "Backoff", "Supervisor"]

# An export of the emulator's data took 0.02-0.04 s with a few documents and 0.03-0.15 s with
# a thousand (docs/reliability.md): every 10 s costs little, and bounds what a kill -9 loses.
EXPORT_SECONDS = 10.0
ROUND_SECONDS = 0.5

log = logging.getLogger("retrain.supervisor")


@dataclass
class Backoff:
    """When to restart a part that died: ``first`` seconds after its death, doubling with
    each restart in a row up to ``cap``; a part that lived ``reset_after`` seconds since its
    last restart starts again at ``first``."""

    first: float = 1.0
    cap: float = 30.0
    reset_after: float = 60.0
    streak: int = 0  # restarts in a row, each within reset_after of the one before
    last_restart: float = -math.inf

    def delay(self, now: float) -> float:
        """How long after its death (seen at ``now``) the part is restarted."""
        streak = self.streak if now - self.last_restart < self.reset_after else 0
        return float(min(self.cap, self.first * 2**streak))

    def restarted(self, now: float) -> None:
        recent = now - self.last_restart < self.reset_after
        self.streak = self.streak + 1 if recent else 1
        self.last_restart = now


@dataclass
class Supervisor:
    """Restarts the dead parts of ``stack`` and exports its Firestore data, round by round."""

    stack: Stack
    clock: Callable[[], float] = time.monotonic
    export_seconds: float = EXPORT_SECONDS
    stopping: threading.Event = field(default_factory=threading.Event)
    backoff: dict[str, Backoff] = field(default_factory=dict)
    dead_since: dict[str, float] = field(default_factory=dict)
    next_export: float = 0.0

    def run(self) -> None:
        """Round after round until :attr:`stopping` is set."""
        self.next_export = self.clock() + self.export_seconds
        while not self.stopping.wait(ROUND_SECONDS):
            self.round()

    def round(self) -> list[str]:
        """One look at every part; the parts restarted."""
        done = []
        for name, record in self.stack.records().items():
            if self.stopping.is_set():
                break
            if self._heal(name, record):
                done.append(name)
        if self.clock() >= self.next_export and not self.stopping.is_set():
            self._export()
        return done

    def _heal(self, name: str, record: ProcessRecord) -> bool:
        """Restart ``name`` if its process died and its backoff delay passed."""
        now = self.clock()
        if record.alive():
            self.dead_since.pop(name, None)
            return False
        backoff = self.backoff.setdefault(name, Backoff())
        if name not in self.dead_since:
            self.dead_since[name] = now
            log.warning("%s died; restarting it in %.0f s", name, backoff.delay(now))
        if now - self.dead_since[name] < backoff.delay(now):
            return False
        backoff.restarted(now)
        self.dead_since.pop(name)
        try:
            restarted = self.stack.restart(name, only_if_dead=True, abort=self.stopping.is_set)
        except Exception:  # it stays dead: the next round tries again, later
            log.exception("restarting %s failed", name)
            return False
        if restarted:
            log.warning("%s restarted in %.1f s", name, self.clock() - now)
        return restarted

    def _export(self) -> None:
        started = self.clock()
        folder = self.stack.export_firestore()
        took = self.clock() - started
        self.next_export = self.clock() + self.export_seconds
        if folder is None:
            log.warning("exporting Firestore failed (the emulator did not answer)")
        elif took > self.export_seconds / 4:
            log.warning("exporting Firestore took %.2f s", took)


def main(config: ConfigOption = Path("retrain.yaml")) -> None:
    """Supervise the local stack that ``retrain up`` started from this config."""
    jsonlog.configure()
    supervisor = Supervisor(Stack(load_settings(config), config))
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stopping.set())
    log.info("supervising the local stack from %s", supervisor.stack.state_dir)
    supervisor.run()


if __name__ == "__main__":
    typer.run(main)
