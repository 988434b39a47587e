"""Rounds of every scenario against ours and the peers, interleaved, and the table of medians.

Each round runs every scenario on every server, the servers' order rotated from one round to
the next (ours and MLServer alternate), then the in-process floor, then the two pipelines
(their order rotated too), and prints the machine's load as it starts. The table gives the
median of the rounds and their [min..max]; ratios are MLServer ÷ ours, taken per round.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import joblib
import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from bench.peers import pipelines
from bench.peers.load import LoadResult, Target, generator, run_load
from bench.peers.servers import Server, floor_server, mlserver, our_server

__all__ = ["SCENARIOS", "Plan", "Report", "Scenario", "Served", "compare"]

T = TypeVar("T")
Print = Callable[[str], None]
MAX_PROBABILITY_DIFFERENCE = 1e-9


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: int
    concurrency: int


C1 = "1 row, concurrency 1"  # the scenario of the concurrency-1 goal
SCENARIOS = (
    Scenario(C1, 1, 1),
    Scenario("1 row, concurrency 8", 1, 8),
    Scenario("1 row, concurrency 32", 1, 32),
    Scenario("1,000-row requests, concurrency 4", 1000, 4),
    Scenario("10,000-row requests, concurrency 1", 10000, 1),
)


@dataclass(frozen=True)
class Plan:
    """How much to run: rounds, seconds per measurement, and which parts."""

    rounds: int = 3
    seconds: float = 5.0
    max_requests: int = 200_000
    warmup_seconds: float = 1.0
    load: str = "auto"  # auto | wrk | python
    workers: int = 1  # our server's worker processes (--workers only if > 1)
    with_mlserver: bool = True
    with_pipelines: bool = True
    with_serving: bool = True
    kfp_venv: bool = False  # the peer pipeline under SubprocessRunner(use_venv=True)
    profile_dir: Path | None = None  # py-spy profiles of the servers, after the rounds
    scenarios: tuple[Scenario, ...] = SCENARIOS

    @classmethod
    def quick(cls, **changes: Any) -> Plan:
        """One short round: a handful of requests per scenario (the smoke test's)."""
        return cls(**{"rounds": 1, "seconds": 1.0, "max_requests": 20, "warmup_seconds": 0.0}
                   | changes)  # fmt: skip


@dataclass(frozen=True)
class Served:
    """What our server serves: its config, the emulators' env, the model and its file."""

    config: Path
    env: dict[str, str]
    model: str
    endpoint: str  # /v1/projects/{project}/locations/{region}
    model_file: Path
    features: list[str]


@dataclass(frozen=True)
class PipelineJob:
    """The rows both pipelines train on: a CSV file (the peer's) and its gs:// copy (ours)."""

    stack: Any
    model: str
    uri: str
    csv: Path
    window: int = 3000
    max_iter: int = 200


@dataclass
class Report:
    tool: str
    loads: list[str] = field(default_factory=list)
    http: dict[tuple[str, str], list[LoadResult]] = field(default_factory=lambda: defaultdict(list))
    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    inprocess: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    # The in-process 1-row predict measured just before and just after ours at concurrency 1
    # (their mean, one per round): this machine's speed drifts by 2x within seconds.
    beside_ours_c1: list[float] = field(default_factory=list)
    pipelines: dict[str, list[pipelines.PipelineTimes]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def failed_requests(self) -> int:
        return sum(r.errors for results in self.http.values() for r in results)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])


def rotated(items: Sequence[T], by: int) -> list[T]:
    by %= len(items)
    return [*items[by:], *items[:by]]


def _post(server: Server, body: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", server.path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _estimator(model_file: Path) -> Any:
    return joblib.load(model_file)


def _proba(estimator: Any, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fitted with names, asked with an array
        return np.asarray(estimator.predict_proba(x)[:, 1], dtype=np.float64)


def check_answers(
    servers: Sequence[Server], estimator: Any, matrices: dict[int, npt.NDArray[np.float64]],
    report: Report, scenarios: Sequence[Scenario], out: Print,
) -> None:  # fmt: skip
    """Each server answers each request size once (a refusal is recorded, not raised), and
    every answer with probabilities matches predict_proba in this process."""
    for server in servers:
        for rows, x in matrices.items():
            status, answer = _post(server, server.body(x))
            if status != 200:
                reason = f"HTTP {status}: {answer[:200].decode(errors='replace')}"
                for scenario in scenarios:
                    if scenario.rows == rows:
                        report.refused[(scenario.name, server.name)] = reason
                out(f"  {server.name} refuses {rows:,}-row requests: {reason}")
                continue
            got = server.probabilities(answer)
            if not got:
                continue  # the HTTP floor answers a fixed body
            want = _proba(estimator, x)
            difference = float(np.max(np.abs(np.asarray(got) - want))) if len(got) == rows else 1
            if difference > MAX_PROBABILITY_DIFFERENCE:
                raise RuntimeError(
                    f"{server.name} answers {rows:,} rows with other probabilities than "
                    f"predict_proba here (max difference {difference:g}, {len(got)} answers)"
                )
        out(f"  {server.name}: same probabilities as predict_proba for "
            f"{', '.join(f'{r:,}' for r in matrices)} rows (where answered)")  # fmt: skip


def inprocess_seconds(estimator: Any, x: npt.NDArray[np.float64], budget: float) -> float:
    """Median seconds of predict_proba on ``x`` in this process, one OpenMP thread, repeated
    for about ``budget`` seconds (at least 3, at most 2,000 times)."""
    times: list[float] = []
    deadline = time.perf_counter() + budget
    with threadpool_limits(limits=1, user_api="openmp"):
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 2000):
            started = time.perf_counter()
            _proba(estimator, x)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def compare(
    plan: Plan, served: Served, workdir: Path, job: PipelineJob | None = None,
    out: Print = print,
) -> Report:  # fmt: skip
    """Start the servers, check their answers, run ``plan.rounds`` rounds; the report."""
    tool = generator(plan.load)
    report = Report(tool)
    sizes = sorted({s.rows for s in plan.scenarios})
    matrices = {rows: _matrix(served, rows) for rows in sizes}
    estimator = _estimator(served.model_file)
    out(f"load generator: {tool}; OMP_NUM_THREADS=1 for every server; our workers: "
        f"{plan.workers}; MLServer: {'yes' if plan.with_mlserver else 'not run'}")  # fmt: skip
    with ExitStack() as started:
        ours = our_server(
            served.config, served.env, served.model, served.endpoint, workdir, plan.workers
        )
        servers = [started.enter_context(ours)]
        if plan.with_mlserver:
            servers.append(started.enter_context(mlserver(served.model_file, workdir)))
        servers.append(started.enter_context(floor_server(workdir)))
        check_answers(servers, estimator, matrices, report, plan.scenarios, out)
        bodies = {(s.name, rows): s.body(x) for s in servers for rows, x in matrices.items()}
        if job is not None and plan.with_pipelines:
            out("  warming the in-process compute of both pipelines")
            pipelines.ours_compute(job.stack, job.model, job.uri, workdir / "warm-ours")
            pipelines.kfp_peer_compute(job.csv, workdir / "warm-peer", job.window, job.max_iter)
        for round_ in range(plan.rounds):
            order = rotated(servers, round_)
            report.loads.append(loadavg())
            out(f"round {round_ + 1}/{plan.rounds}: load average {report.loads[-1]}; order "
                f"{', '.join(s.name for s in order)}")  # fmt: skip
            for scenario in plan.scenarios if plan.with_serving else ():
                for server in order:
                    key = (scenario.name, server.name)
                    if key in report.refused:
                        continue
                    target = Target(server.port, server.path, bodies[(server.name,
                                                                      scenario.rows)])  # fmt: skip
                    if plan.warmup_seconds > 0:
                        run_load(target, scenario.concurrency, plan.warmup_seconds,
                                 plan.max_requests, tool)  # fmt: skip
                    c1 = key == (C1, "ours")
                    if c1:
                        before = inprocess_seconds(estimator, matrices[1], min(plan.seconds, 1.0))
                    result = run_load(target, scenario.concurrency, plan.seconds,
                                      plan.max_requests, tool)  # fmt: skip
                    report.http[key].append(result)
                    if c1:
                        after = inprocess_seconds(estimator, matrices[1], min(plan.seconds, 1.0))
                        report.beside_ours_c1.append((before + after) / 2)
                    out(f"  {scenario.name:<36} {server.name:<10} p50 {result.p50_ms:8.2f} ms "
                        f"p99 {result.p99_ms:8.2f} ms {result.rate:8.1f} req/s "
                        f"{result.rate * scenario.rows:10,.0f} rows/s"
                        + (f"  {result.errors} FAILED" if result.errors else ""))  # fmt: skip
            for rows, x in matrices.items() if plan.with_serving else ():
                seconds = inprocess_seconds(estimator, x, min(plan.seconds, 2.0))
                report.inprocess[rows].append(seconds)
                out(f"  in-process predict_proba, {rows:,} rows: {seconds * 1000:.3f} ms")
            if job is not None and plan.with_pipelines:
                _pipelines_round(job, workdir / f"round-{round_ + 1}", round_, report, out,
                                 plan.kfp_venv)  # fmt: skip
        if plan.profile_dir is not None:
            _profiles(servers, matrices, plan, tool, out)
    return report


def _profiles(servers: Sequence[Server], matrices: dict[int, npt.NDArray[np.float64]],
              plan: Plan, tool: str, out: Print) -> None:  # fmt: skip
    """py-spy on ours at 1 row x concurrency 8, and on ours and MLServer at 10,000-row
    requests (values to 6 decimals: a full-precision body is over our limit today)."""
    from bench.peers.profiles import profile_load  # noqa: PLC0415

    assert plan.profile_dir is not None
    big = np.round(matrices[max(matrices)], 6)
    cases = [(s, f"{s.name}-1row-c8", matrices[1], 8) for s in servers if s.name == "ours"]
    cases += [(s, f"{s.name}-{len(big)}rows-c1", big, 1) for s in servers
              if s.name in ("ours", "MLServer")]  # fmt: skip
    for server, name, x, concurrency in cases:
        target = Target(server.port, server.path, server.body(x))
        found = profile_load(server.pid, target, concurrency, max(plan.seconds, 5),
                             plan.profile_dir / name.replace(" ", "").lower(), tool)  # fmt: skip
        out(f"  profile {name} (py-spy, {plan.profile_dir}):")
        for line in found.top():
            out(line)


def _matrix(served: Served, rows: int) -> npt.NDArray[np.float64]:
    from bench.peers.model import feature_matrix  # noqa: PLC0415

    return feature_matrix(rows, served.features)


def _pipelines_round(
    job: PipelineJob, workdir: Path, round_: int, report: Report, out: Print, kfp_venv: bool
) -> None:
    def ours() -> None:
        wall = pipelines.run_ours(job.stack, job.model, job.uri)
        compute = pipelines.ours_compute(job.stack, job.model, job.uri, workdir / "ours")
        report.pipelines["retrain run (ours)"].append(pipelines.PipelineTimes(wall, compute))

    def peer() -> None:
        wall = pipelines.run_kfp_peer(
            job.csv, workdir / "peer", job.window, job.max_iter, use_venv=kfp_venv
        )
        compute = pipelines.kfp_peer_compute(job.csv, workdir / "peer-compute", job.window,
                                             job.max_iter)  # fmt: skip
        name = f"plain kfp.local (use_venv={kfp_venv})"
        report.pipelines[name].append(pipelines.PipelineTimes(wall, compute))

    for run in rotated([ours, peer], round_):
        run()
    for name, times in report.pipelines.items():
        last = times[-1]
        out(f"  pipeline {name:<20} wall {last.wall:6.2f} s, compute "
            f"{sum(last.compute.values()):5.2f} s, overhead per step "
            f"{last.overhead_per_step:5.2f} s")  # fmt: skip


# -- the table ------------------------------------------------------------------------------


def spread(values: Sequence[float], digits: int = 1) -> str:
    """``median [min..max]``."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return (f"{statistics.median(values):,.{digits}f} "
            f"[{min(values):,.{digits}f}..{max(values):,.{digits}f}]")  # fmt: skip


def _ratios(report: Report, scenario: str, figure: Callable[[LoadResult], float]) -> list[float]:
    ours, peer = (
        report.http.get((scenario, "ours"), []),
        report.http.get((scenario, "MLServer"), []),
    )
    return [figure(p) / figure(o) for o, p in zip(ours, peer, strict=False) if figure(o) > 0]


def tables(report: Report, plan: Plan) -> Iterator[str]:
    """Markdown tables of the report: each server's figures, ratios and floors, pipelines."""
    rounds = f"medians of {plan.rounds} round{'s' * (plan.rounds > 1)} [min..max]"
    yield f"Load average (1, 5, 15 min) as each round started: {'; '.join(report.loads)}"
    yield ""
    if plan.with_serving:
        yield from _serving_tables(report, plan, rounds)
    if report.pipelines:
        yield from _pipeline_table(report, rounds)


def _serving_tables(report: Report, plan: Plan, rounds: str) -> Iterator[str]:
    yield f"Per server ({rounds}; load generator {report.tool}):"
    yield ""
    yield "| scenario | server | p50 ms | p99 ms | req/s | rows/s |"
    yield "|---|---|---|---|---|---|"
    for scenario in plan.scenarios:
        for (name, server), results in report.http.items():
            if name == scenario.name:
                yield (f"| {name} | {server} | {spread([r.p50_ms for r in results], 2)} | "
                       f"{spread([r.p99_ms for r in results], 2)} | "
                       f"{spread([r.rate for r in results])} | "
                       f"{spread([r.rate * scenario.rows for r in results], 0)} |")  # fmt: skip
        for (name, server), reason in report.refused.items():
            if name == scenario.name:
                yield f"| {name} | {server} | refused: {reason[:120]} | | | |"
    yield ""
    yield "MLServer ÷ ours (per round, then the median [min..max]), and the floors:"
    yield ""
    yield ("| scenario | MLServer ÷ ours, req/s | MLServer ÷ ours, p99 | HTTP floor req/s | "
           "in-process predict_proba |")  # fmt: skip
    yield "|---|---|---|---|---|"
    for scenario in plan.scenarios:
        floor = report.http.get((scenario.name, "HTTP floor"), [])
        inproc = report.inprocess.get(scenario.rows, [])
        yield (f"| {scenario.name} | {spread(_ratios(report, scenario.name, lambda r: r.rate), 2)} "
               f"| {spread(_ratios(report, scenario.name, lambda r: r.p99_ms), 2)} "
               f"| {spread([r.rate for r in floor])} "
               f"| {spread([s * 1000 for s in inproc], 3)} ms, "
               f"{spread([scenario.rows / s for s in inproc], 0)} rows/s |")  # fmt: skip
    yield ""
    yield from _goals(report)


def _pipeline_table(report: Report, rounds: str) -> Iterator[str]:
    yield ""
    yield f"Pipelines on the same rows ({rounds}; overhead = (wall - compute) / 3 steps):"
    yield ""
    yield "| pipeline | wall s | compute s | preprocess | train | evaluate | overhead/step s |"
    yield "|---|---|---|---|---|---|---|"
    for name, times in report.pipelines.items():
        steps = " | ".join(spread([t.compute[s] for t in times], 2) for s in pipelines.STEPS)
        yield (f"| {name} | {spread([t.wall for t in times], 2)} | "
               f"{spread([sum(t.compute.values()) for t in times], 2)} | {steps} | "
               f"{spread([t.overhead_per_step for t in times], 2)} |")  # fmt: skip


def _goals(report: Report) -> Iterator[str]:
    """The issue's serving goals, read from this run (informative: nothing is asserted)."""
    c8 = "1 row, concurrency 8"
    rate = _ratios(report, c8, lambda r: r.rate)
    p99 = _ratios(report, c8, lambda r: r.p99_ms)
    if rate:
        ours_over = 1 / statistics.median(rate)
        yield (f"goal, 1 row at concurrency 8: ours ÷ MLServer req/s {ours_over:.2f} (want >= 2), "
               f"MLServer p99 ÷ ours {statistics.median(p99):.2f} (want >= 1)")  # fmt: skip
    big = _ratios(report, "1,000-row requests, concurrency 4", lambda r: r.rate)
    if big:
        ours_over = 1 / statistics.median(big)
        yield f"goal, 1,000-row requests: ours ÷ MLServer rows/s {ours_over:.2f} (want >= 1.5)"
    ours1 = report.http.get((C1, "ours"), [])
    floor1 = report.http.get((C1, "HTTP floor"), [])
    beside = report.beside_ours_c1
    if ours1 and floor1 and beside:
        # Per round: ours' p50 over the in-process predict measured around it (the same
        # seconds' machine) plus that round's HTTP floor.
        bounds = [s * 1000 + f.p50_ms for s, f in zip(beside, floor1, strict=False)]
        ratios = [o.p50_ms / b for o, b in zip(ours1, bounds, strict=False)]
        yield (f"goal, concurrency 1: ours p50 ÷ (in-process predict measured just before and "
               f"after it + HTTP floor p50), per round {spread(ratios, 2)} (want <= 1.5); "
               f"bound {spread(bounds, 2)} ms, ours {spread([o.p50_ms for o in ours1], 2)} "
               f"ms")  # fmt: skip


def summary(report: Report, plan: Plan) -> str:
    return "\n".join(tables(report, plan))


def as_json(report: Report) -> str:
    """The raw figures, for comparing two runs."""
    return json.dumps(
        {
            "tool": report.tool,
            "loads": report.loads,
            "http": {f"{s} | {n}": [r.__dict__ for r in v] for (s, n), v in report.http.items()},
            "refused": {f"{s} | {n}": v for (s, n), v in report.refused.items()},
            "inprocess_seconds": {str(k): v for k, v in report.inprocess.items()},
            "inprocess_seconds_beside_ours_c1": report.beside_ours_c1,
            "pipelines": {k: [t.__dict__ for t in v] for k, v in report.pipelines.items()},
        },
        indent=1,
    )
