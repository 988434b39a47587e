"""Where our server's time goes: py-spy (from .venv-peers) samples ``python -m serving``
while the load generator drives one scenario, and the samples are summed by function.

``python -m bench.peers --profile DIR`` writes, per scenario, py-spy's raw collapsed stacks
(``*.txt``, for flame graph tools) and a speedscope file, and prints the functions with the
largest share of the samples, inclusive (the function and what it calls) and self."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.peers.load import Target, run_load
from bench.peers.servers import PEERS_VENV

__all__ = ["Profile", "profile_load", "read_collapsed"]

_FRAME = re.compile(r"^(?P<function>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")
# Frames under which everything runs (the interpreter's entry, the CLI, the event loop, the
# threads' and processes' bootstrap): in every stack, they would top the inclusive list.
_PLUMBING = ("<frozen runpy>", "<string>", "__main__.py", "_compat.py", "base_events.py",
             "core.py", "events.py", "main.py", "process.py", "runners.py", "spawn.py",
             "thread.py", "threading.py", "_asyncio.py")  # fmt: skip


@dataclass(frozen=True)
class Profile:
    samples: int
    inclusive: Counter[str]
    self_: Counter[str]

    def top(self, count: int = 12) -> Iterator[str]:
        """The functions with the most samples, inclusive (less the plumbing) and self."""
        inclusive = Counter(
            {k: n for k, n in self.inclusive.items() if not k.startswith(_PLUMBING)}
        )
        for title, counter in (("inclusive", inclusive), ("self", self.self_)):
            yield f"    top {count} by {title} share of {self.samples} samples:"
            for name, n in counter.most_common(count):
                yield f"      {100 * n / max(self.samples, 1):5.1f} %  {name}"


def _name(frame: str) -> str:
    """``function (path/to/module.py:12)`` -> ``module.py:function``."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{Path(match['file']).name}:{match['function']}"


def read_collapsed(path: Path) -> Profile:
    """py-spy's raw output: one ``frame;frame;... count`` line per distinct stack."""
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        names = [_name(f) for f in stack.split(";") if not f.startswith("process ")]
        names = [f for f in names if not f.startswith(("thread (", "spawn_main("))]
        samples += n
        for name in set(names):
            inclusive[name] += n
        if names:
            self_[names[-1]] += n
    return Profile(samples, inclusive, self_)


def profile_load(
    pid: int, target: Target, concurrency: int, seconds: float, out: Path, tool: str
) -> Profile:
    """Sample ``pid`` (and its subprocesses: --workers) while ``concurrency`` connections
    send ``target.body`` for ``seconds``; the samples are also kept as ``out``.txt."""
    py_spy = PEERS_VENV / "bin" / "py-spy"
    if not py_spy.exists():
        raise RuntimeError(f"{py_spy} is missing: run `make bench-peers` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    raw, speedscope = out.with_suffix(".txt"), out.with_suffix(".speedscope.json")
    duration = max(2, round(seconds))
    argv = [str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--rate", "250",
            "--duration", str(duration), "--nonblocking"]  # fmt: skip
    with subprocess.Popen([*argv, "--format", "raw", "--output", str(raw)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as spy:  # fmt: skip
        run_load(target, concurrency, duration, 1_000_000, tool)
        _, errors = spy.communicate(timeout=duration + 60)
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {errors.decode(errors='replace')}")
    # The same samples as a speedscope file, for a flame graph in the browser: one more pass.
    with subprocess.Popen([*argv, "--format", "speedscope", "--output", str(speedscope)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as spy:  # fmt: skip
        run_load(target, concurrency, duration, 1_000_000, tool)
        spy.wait(timeout=duration + 60)
    return read_collapsed(raw)
