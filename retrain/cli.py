"""The ``retrain`` command line. Thin: parse arguments, load settings once, call the core."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table

from components.compute import available_cpus
from retrain.config import ConfigError, Gate, Settings, load_settings
from retrain.localstack import PART_NAMES, Stack, StackError, StackRunning
from retrain.options import ConfigOption, OutputOption

if TYPE_CHECKING:
    from retrain.gatekeeper.registry import FirestoreRegistry
    from retrain.ledger import FirestoreLedger
    from retrain.outcomes import RunOutcome

app = typer.Typer(
    help="Event-driven retraining on Kubeflow Pipelines, locally or on Google Cloud.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and validate retrain.yaml.", no_args_is_help=True)
app.add_typer(config_app, name="config")
schedule_app = typer.Typer(
    help="Vertex AI pipeline schedules or KFP recurring runs, from retrain.yaml.",
    no_args_is_help=True,
)
app.add_typer(schedule_app, name="schedule")

# Piped or redirected, standard output is this wide: a table is as wide as its widest row
# (rich never pads a line to the console's width), and no value is cut or wrapped.
PIPED_WIDTH = 100_000
# `retrain runs` and `retrain versions` show why a run ended in this many characters at
# most, on one line; --details prints it whole.
ONE_LINE = 120


class _Stdout(Console):
    """Standard output: on a terminal, lines fit its width; piped, they are whole."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(PIPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


out = _Stdout(highlight=False)
err = Console(stderr=True, highlight=False)


def _print_json(data: object) -> None:
    """``data`` as JSON on standard output, plain (no colours, no wrapping)."""
    import json  # noqa: PLC0415

    typer.echo(json.dumps(data, indent=2, default=str))


def _load(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        _print_config_error(exc)
        raise typer.Exit(code=2) from exc


def _print_config_error(exc: ConfigError) -> None:
    err.print(f"[bold red]{escape(str(exc.path))}[/]: {len(exc.problems)} problem(s)")
    for key, reason in exc.problems:
        err.print(f"  [bold]{escape(key)}[/]: {escape(reason)}")


@config_app.command("check")
def config_check(
    file: Annotated[
        Path | None,
        typer.Argument(help="File to check; default: --config, $RETRAIN_CONFIG or ./retrain.yaml."),
    ] = None,
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Validate a config file; print a summary, or every bad key and why (exit 2)."""
    path = file or config
    settings = _load(path)
    out.print(
        f"[green]OK[/] {escape(str(path))}: project {settings.project}, "
        f"region {escape(settings.region)}, backend {settings.backend}"
    )
    out.print(
        f"buckets: data gs://{settings.buckets.data}, artifacts gs://{settings.buckets.artifacts}"
    )
    out.print("topics: " + ", ".join(settings.topics.names().values()))
    for name, model in settings.models.items():
        window = model.training_window.rows
        table = Table.grid(padding=(0, 2))
        for key, value in (
            ("data", f"gs://{settings.buckets.data}/{model.data_prefix} ({model.format})"),
            ("label", model.label),
            (
                "features",
                ", ".join(model.features)
                if model.features
                else "all but label, order column and excluded",
            ),
            ("categorical", ", ".join(model.categorical) or "none"),
            *([("excluded", ", ".join(model.exclude_columns))] if model.exclude_columns else []),
            ("unlabelled", f"{model.validation.unlabelled_rows} rows without a label"),
            ("threads", str(model.threads or f"the CPUs available ({available_cpus()} here)")),
            (
                "window",
                f"latest {window} rows by {model.order_column}"
                if window
                else f"all rows, ordered by {model.order_column}",
            ),
            (
                "evaluation",
                f"newest {model.evaluation.fraction:.0%}, at least "
                f"{model.evaluation.min_rows} rows",
            ),
            ("estimator", f"{model.estimator.name} {model.estimator.params or ''}".strip()),
            ("arrivals", f"{model.arrival_policy}, coalesce {model.coalesce_seconds:g} s"),
            (
                "schedule",
                f"{model.schedule.cron} ({model.schedule.timezone})" if model.schedule else "none",
            ),
            *_gate_rows(model.gate),
        ):
            table.add_row(f"  {key}", escape(value))
        out.print(f"model [bold]{escape(name)}[/]")
        out.print(table)


def _gate_rows(gate: Gate) -> list[tuple[str, str]]:
    """Every rule of ``gate``, under the names its keys have in retrain.yaml."""
    bounds = ", ".join(
        f"{metric}{' >= ' + str(b.min) if b.min is not None else ''}"
        f"{' <= ' + str(b.max) if b.max is not None else ''}"
        for metric, b in gate.thresholds.items()
    )
    primary, wanted = gate.primary_metric, gate.min_improvement
    if wanted.relative is not None:
        improvement = (
            f"relative {wanted.relative:g}: {primary} at least {wanted.relative:.2%} "
            "better than the champion's"
        )
    else:
        absolute = wanted.absolute or 0.0
        by = f"by at least {absolute:g}" if absolute else "strictly"
        improvement = f"absolute {absolute:g}: {primary} {by} better than the champion's"
    regression = "; ".join(
        f"{metric} at most {drop:g} worse than the champion's"
        for metric, drop in gate.max_regression.items()
    )
    return [
        ("gate", f"primary {primary}; {bounds or 'no value thresholds'}; "
                 f"min {gate.min_eval_rows} eval rows"),
        ("min_improvement", improvement),
        ("max_regression", regression or "none (other metrics may get worse)"),
        ("on_schema_change", gate.on_schema_change),
    ]  # fmt: skip


def _stack(config: Path) -> Stack:
    return Stack(_load(config), config)


def _print_parts(stack: Stack) -> None:
    table = Table(box=None, pad_edge=False)
    for column in ("part", "listens on", "pid", "state", "restarts"):
        table.add_column(column)
    for part in stack.status():
        state = (
            "[green]healthy[/]"
            if part.healthy
            else ("[yellow]running, not answering[/]" if part.running else "[red]not running[/]")
        )
        last = time.strftime(" (last %H:%M:%S)", time.localtime(part.restarted_at or 0))
        restarts = f"{part.restarts}{last if part.restarts else ''}"
        table.add_row(part.name, part.url, str(part.pid or "-"), state, restarts)
    out.print(table)
    supervised = "[green]running[/]" if stack.supervised() else "[red]not running[/] (`retrain up`)"
    out.print(f"supervisor: {supervised}")


@app.command()
def up(
    config: ConfigOption = Path("retrain.yaml"),
    detach: Annotated[
        bool,
        typer.Option(
            "--detach", "-d", help="Return once the stack is healthy; stop it with `retrain down`."
        ),
    ] = False,
) -> None:
    """Start the local stack: emulators, functions, scheduler and prediction server."""
    stack = _stack(config)
    try:
        with err.status("starting the local stack") as spinner:
            stack.up(progress=spinner.update)
    except StackRunning as exc:
        out.print(f"[yellow]{exc}[/]")
        return
    except StackError as exc:
        err.print(f"[bold red]retrain up failed[/]: {exc}")
        if exc.log:
            err.print(f"[dim]last lines of the {exc.part} log:[/]")
            err.print(exc.log, markup=False)
        raise typer.Exit(code=1) from exc
    except KeyboardInterrupt:  # Ctrl-C while it started: stop what is up, like below
        _stop(stack)
        return
    if detach:
        _announce(stack)
        out.print("Stop it with: retrain down")
        return
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        _announce(stack)
        out.print("Press Ctrl-C to stop.")
        while not stopping.wait(1.0) and stack.state_file.exists():  # (`down` elsewhere)
            pass
    except KeyboardInterrupt:
        pass
    finally:
        _stop(stack)


def _announce(stack: Stack) -> None:
    out.print(f"[green]local stack is up[/] (state in {stack.state_dir})")
    _print_parts(stack)
    env = stack.env()
    out.print("\nPoint clients and gcloud at it with:")
    out.print(
        f"  export PUBSUB_EMULATOR_HOST={env['PUBSUB_EMULATOR_HOST']} "
        f"STORAGE_EMULATOR_HOST={env['STORAGE_EMULATOR_HOST']} "
        f"FIRESTORE_EMULATOR_HOST={env['FIRESTORE_EMULATOR_HOST']}\n"
        f"  export CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB=http://{env['PUBSUB_EMULATOR_HOST']}/ "
        f"CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE={env['STORAGE_EMULATOR_HOST']}/storage/v1/ "
        f"CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true CLOUDSDK_CORE_PROJECT={stack.settings.project}",
        markup=False,
        soft_wrap=True,
    )


def _stop(stack: Stack) -> None:
    with err.status("stopping the local stack"):
        stopped = stack.stopped_on_failure + stack.down()  # (up stops its parts if cut short)
    out.print(f"stopped {', '.join(stopped) or 'nothing'}")


@app.command()
def down(config: ConfigOption = Path("retrain.yaml")) -> None:
    """Stop exactly the processes that `retrain up` started, by process id."""
    stack = _stack(config)
    with err.status("stopping the local stack"):
        stopped = stack.down()
    if stopped:
        out.print(f"stopped {', '.join(stopped)}")
    else:
        out.print(f"no local stack is running from {stack.state_dir}")


@app.command()
def restart(
    part: Annotated[str, typer.Argument(help="One of: " + ", ".join(PART_NAMES) + ".")],
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Stop one part of the local stack and start it again (provisioned as at `up`)."""
    if part not in PART_NAMES:
        err.print(f"[bold red]no part {escape(part)!r}[/]; the parts: {', '.join(PART_NAMES)}")
        raise typer.Exit(code=2)
    stack = _stack(config)
    try:
        with err.status(f"restarting {part}"):
            stack.restart(part)
    except StackError as exc:
        err.print(f"[bold red]retrain restart failed[/]: {escape(str(exc))}")
        if exc.log:
            err.print(exc.log, markup=False)
        raise typer.Exit(code=1) from exc
    out.print(f"restarted {part}")
    _print_parts(stack)


@app.command()
def status(config: ConfigOption = Path("retrain.yaml"), output: OutputOption = "table") -> None:
    """Report each part of the local stack as healthy or not (exit 1 if any is not)."""
    from dataclasses import asdict  # noqa: PLC0415

    stack = _stack(config)
    parts = stack.status()
    if output == "json":
        _print_json({"state_dir": str(stack.state_dir), "supervisor": stack.supervised(),
                     "parts": [asdict(part) for part in parts]})  # fmt: skip
        if not parts or not all(part.healthy for part in parts):
            raise typer.Exit(code=1)
        return
    if not parts:
        out.print(f"no local stack is running from {stack.state_dir}; start it with `retrain up`")
        raise typer.Exit(code=1)
    _print_parts(stack)
    if not all(part.healthy for part in parts):
        raise typer.Exit(code=1)


@app.command()
def demo(
    config: ConfigOption = Path("retrain.yaml"),
    model: Annotated[str, typer.Option(help="The model to replay the stream for.")] = "rainfall",
    data: Annotated[Path, typer.Option(help="The stream (CSV, optionally gzipped).")] = Path(
        "data/rainfall.csv.gz"
    ),
    chunks: Annotated[int | None, typer.Option(min=1, help="Replay only this many chunks.")] = None,
    start_at: Annotated[
        int | None, typer.Option(min=0, help="First row of the first chunk (to skip ahead).")
    ] = None,
    report: Annotated[Path, typer.Option(help="Where to write the HTML report.")] = Path(
        "demo-report.html"
    ),
) -> None:
    """The main job: replay the drifting rainfall stream through a fresh local stack."""
    import yaml  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from retrain.demo import (  # noqa: PLC0415
        CHUNK_ROWS,
        DEMO_WINDOW_SECONDS,
        DRIFT_AT,
        FIRST_ROWS,
        load_stream,
        replay,
        write_report,
    )
    from retrain.localstack.processes import free_ports  # noqa: PLC0415

    settings = _load(config)
    if model not in settings.models:
        err.print(f"[bold red]no model {escape(model)!r} in {config}[/]")
        raise typer.Exit(code=2)
    # A stack of its own, on free ports and in a fresh folder: the demo can run twice, and
    # never touches the data of a stack you run yourself.
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    where = settings.local.state_dir / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    where.mkdir(parents=True, exist_ok=True)
    names = list(settings.local.ports.model_dump())
    raw["local"] = {**raw.get("local", {}), "state_dir": str(where / "state"),
                    "ports": dict(zip(names, free_ports(len(names)), strict=True))}  # fmt: skip
    # The replay plays days of traffic in seconds: the monitor's windows are seconds too.
    spec = raw["models"][model]
    spec["monitoring"] = {"min_rows": CHUNK_ROWS, **spec.get("monitoring", {}),
                          "window_seconds": DEMO_WINDOW_SECONDS}  # fmt: skip
    demo_config = where / "retrain.yaml"
    demo_config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    stack = Stack(load_settings(demo_config), demo_config)
    stream = load_stream(data)
    first = start_at if start_at is not None else FIRST_ROWS
    total = len(range(first, len(stream), CHUNK_ROWS))
    total = min(total, chunks) if chunks else total
    try:
        with err.status("starting a local stack for the demo") as spinner:
            stack.up(progress=spinner.update)
    except StackError as exc:
        err.print(f"[bold red]the demo could not start the local stack[/]: {exc}")
        if exc.log:
            err.print(exc.log, markup=False)
        raise typer.Exit(code=1) from exc
    try:
        with Progress(
            TextColumn("[bold]demo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=err,
        ) as progress:  # fmt: skip
            task = progress.add_task("starting", total=total)
            result = replay(
                stack, stream, model=model, chunks=chunks, start_chunk_at=start_at,
                step=lambda text: progress.update(task, description=text),
                advance=lambda: progress.advance(task),
            )  # fmt: skip
    finally:
        with err.status("stopping the demo's stack"):
            stack.down()
    out.print(_demo_table(result, CHUNK_ROWS))
    before = (result.accuracy("served", False), result.accuracy("static", False))
    after = (result.accuracy("served", True), result.accuracy("static", True))
    out.print(f"before row {DRIFT_AT:,}: served {before[0]:.3f}, static {before[1]:.3f}")
    out.print(f"from row {DRIFT_AT:,}:   served {after[0]:.3f}, static {after[1]:.3f}")
    out.print(f"{result.runs} runs for {len(result.chunks)} chunks (and one for the first upload); "
              f"{result.promotions} promotions, {result.rejections} rejections; "
              f"{result.seconds:.0f} s")  # fmt: skip
    png = report.with_suffix(".png")
    write_report(result, report, png)
    out.print(f"report: {report} and {png} (first object: rows 0-{FIRST_ROWS - 1})", markup=False)


def _demo_table(result: Any, chunk_rows: int) -> Table:
    table = Table(title=f"{result.model}: test, then train, {chunk_rows} rows at a time",
                  box=None)  # fmt: skip
    for column in ("rows", "served", "served acc", "static acc", "live acc", "arrival check",
                   "monitor", "runs"):  # fmt: skip
        table.add_column(column)
    for chunk in result.chunks:
        live = "-" if chunk.live_accuracy is None else f"{chunk.live_accuracy:.3f}"
        table.add_row(
            f"{chunk.start}-{chunk.end}", f"v{chunk.served_version}",
            f"{chunk.served_accuracy:.3f}", f"{chunk.static_accuracy:.3f}", live, chunk.check,
            ",".join(chunk.alerts) or "-", ", ".join(chunk.decisions) or "-",
        )  # fmt: skip
    return table


ImageOption = Annotated[
    str,
    typer.Option(
        "--image",
        envvar="RETRAIN_COMPONENT_IMAGE",
        show_envvar=True,
        help="Container image the components run in (their base_image).",
    ),
]


def _metric(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if name == "rows" else f"{value:.4f}"


@app.command("compile")
def compile_(
    config: ConfigOption = Path("retrain.yaml"),
    image: ImageOption = "retrain-components:latest",
) -> None:
    """Compile the pipeline and each component.yaml (checked in; a test fails when stale)."""
    from pipelines.byo import ComponentMismatch  # noqa: PLC0415 (kfp import costs 0.5 s)
    from pipelines.compile import compile_all  # noqa: PLC0415

    settings = _load(config)
    try:
        written = compile_all(image=image, settings=settings)
    except ComponentMismatch as exc:
        err.print(f"[bold red]retrain compile[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    for path in written:
        out.print(f"wrote {path}")


@app.command("package")
def package_(
    config: ConfigOption = Path("retrain.yaml"),
    out_dir: Annotated[
        Path, typer.Option("--out", help="Build folder that infra/terraform uploads from.")
    ] = Path("build"),
) -> None:
    """Build what `make deploy` uploads: functions.zip and each model's compiled pipeline."""
    from pipelines.byo import ComponentMismatch  # noqa: PLC0415
    from retrain.packaging import compile_pipelines, package_functions  # noqa: PLC0415

    settings = _load(config)
    if settings.backend == "local":
        err.print(
            f"[bold red]retrain package[/]: {escape(str(config))} has backend: local, which runs "
            "pipelines on this machine; set backend: vertex (or kfp, with gcp.kfp.host) to "
            "deploy to Google Cloud"
        )
        raise typer.Exit(code=2)
    package = package_functions(config, out_dir)
    out.print(
        f"wrote {package.zip_path}: {len(package.modules)} modules, "
        f"{len(package.requirements)} pinned requirements"
    )
    try:
        written = compile_pipelines(settings, out_dir)
    except ComponentMismatch as exc:
        err.print(f"[bold red]retrain package[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    for path in written:
        out.print(f"wrote {path} (image {settings.component_image})")


@schedule_app.command("sync")
def schedule_sync(
    config: ConfigOption = Path("retrain.yaml"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; change nothing.")
    ] = False,
    output: OutputOption = "table",
) -> None:
    """Make the backend's schedules match each model's `schedule` with `via:
    pipeline_schedule`: Vertex AI PipelineJobSchedules (backend vertex) or KFP recurring
    runs (backend kfp), one run at a time each. Stale ones of ours are deleted."""
    from pipelines.schedules import (  # noqa: PLC0415 (aiplatform and kfp are slow)
        ScheduleError,
        sync_kfp_schedules,
        sync_vertex_schedules,
    )

    settings = _load(config)
    if settings.backend == "local":
        err.print(
            "[bold red]retrain schedule sync[/] is for backend vertex or kfp; locally, "
            "`retrain up` runs the scheduler for every model's schedule"
        )
        raise typer.Exit(code=2)
    text = config.read_text(encoding="utf-8")
    sync = sync_vertex_schedules if settings.backend == "vertex" else sync_kfp_schedules
    try:
        with err.status(f"syncing {settings.backend} schedules"):
            changes = sync(settings, text, dry_run=dry_run)
    except ScheduleError as exc:
        err.print(f"[bold red]retrain schedule sync[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    if output == "json":
        _print_json({"dry_run": dry_run, "changes": [
            {"model": c.model, "action": c.action, "cron": c.cron, "detail": c.detail}
            for c in changes
        ]})  # fmt: skip
        return
    table = Table("model", "action", "cron", "detail", box=None)
    for change in changes:
        table.add_row(change.model, change.action, change.cron, change.detail)
    out.print(table if changes else "no model is scheduled via pipeline_schedule; nothing to do")
    if dry_run:
        out.print("(dry run: nothing changed)")


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Model name in retrain.yaml.")],
    data: Annotated[
        list[str],
        typer.Option("--data", "-d", help="Data object: a gs:// URI or a local path. Repeat."),
    ],
    config: ConfigOption = Path("retrain.yaml"),
    reason: Annotated[
        str, typer.Option(help="Why this run: data, drift, schedule or manual.")
    ] = "manual",
    run_id: Annotated[
        str | None, typer.Option(help="Run id; default: <model>-<UTC time>-<random>.")
    ] = None,
    image: ImageOption = "retrain-components:latest",
) -> None:
    """Run the pipeline locally with kfp.local, showing each step; publish its MetricsReport.

    The run takes the model's lease first, as a run the ledger launched (one run per model
    at a time), so the gatekeeper decides on its report."""
    from pipelines.launchers import (  # noqa: PLC0415
        LocalRunError,
        local_environment,
        run_and_follow,
    )
    from retrain.ledger import new_run_id  # noqa: PLC0415
    from retrain.service import gathering_lease  # noqa: PLC0415

    settings = _load(config)
    if model not in settings.models:
        known = ", ".join(sorted(settings.models))
        err.print(f"[bold red]no model {escape(model)!r}[/] in {config}; known: {escape(known)}")
        raise typer.Exit(code=2)
    stack = _stack(config)
    try:
        local_environment(stack)
    except LocalRunError as exc:
        err.print(f"[bold red]retrain run[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    run_id = run_id or new_run_id(model)
    ledger = _Clients(stack).ledger()
    lease = ledger.acquire(model, run_id, gathering_lease(settings.models[model]))
    if not lease.acquired:
        err.print(
            f"[bold red]retrain run[/]: run {escape(lease.holder or '?')} of {model} is in flight "
            "(`retrain runs` shows it); one run per model at a time. `retrain publish manual` "
            "queues a run for when it ends."
        )
        raise typer.Exit(code=1)
    ledger.start(model, run_id, list(data))
    try:
        result = run_and_follow(
            stack, model, data, reason=reason, run_id=run_id, image=image, console=err,
            hold_lease=True,
        )  # fmt: skip
    except LocalRunError as exc:
        ledger.abandon(model, run_id, f"the run could not start: {exc}")
        err.print(f"[bold red]retrain run[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    out.print(f"run {result.run_id}: [bold]{result.state}[/] in {result.seconds:.1f} s")
    out.print(f"artifacts (kfp.local): {result.outputs}", markup=False, soft_wrap=True)
    if result.state != "succeeded":
        err.print(
            f"[bold red]step {escape(result.failed_step or '?')} failed[/]: "
            f"{escape(result.error or 'unknown error')}"
        )
        if result.message_id:
            out.print(f"failure report published to model-metrics: message {result.message_id}")
        raise typer.Exit(code=1)
    report = result.report or {}
    candidate = report.get("candidate") or {}
    champion = report.get("champion")
    out.print(f"candidate model: {candidate.get('artifact_uri')}", markup=False, soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    table.add_column("metric")
    table.add_column("candidate", justify="right")
    if champion:
        table.add_column(f"champion v{champion.get('version')}", justify="right")
    for name, value in candidate.get("metrics", {}).items():
        row = [name, _metric(name, value)]
        if champion:
            row.append(_metric(name, champion["metrics"].get(name)))
        table.add_row(*row)
    out.print(table)
    out.print(
        f"MetricsReport published to {settings.topics.model_metrics}: message "
        f"{result.message_id}; kept at {result.report_uri}",
        markup=False,
        soft_wrap=True,
    )


class _Clients:
    """Pub/Sub, storage and Firestore clients: the local stack's emulators when it runs,
    else whatever the environment names (the emulators by their env vars, or Google Cloud)."""

    def __init__(self, stack: Stack) -> None:
        from google.cloud import pubsub_v1, storage  # noqa: PLC0415

        from retrain import statedb  # noqa: PLC0415
        from retrain.localstack import emulators  # noqa: PLC0415

        settings = stack.settings
        project = settings.project
        if stack.running():
            self.publisher = emulators.publisher(stack.pubsub_host)
            self.subscriber = emulators.subscriber(stack.pubsub_host)
            self.storage = emulators.storage_client(stack.gcs_url, project)
            self.db = statedb.Database(
                emulators.firestore_client(stack.firestore_host, project, settings.database)
            )
        else:
            self.publisher = pubsub_v1.PublisherClient()
            self.subscriber = pubsub_v1.SubscriberClient()
            self.storage = storage.Client(project=project)
            self.db = statedb.database(settings)

    def ledger(self) -> FirestoreLedger:
        from retrain.ledger import FirestoreLedger  # noqa: PLC0415

        return FirestoreLedger(self.db)


Kind = Literal["data", "drift", "schedule", "manual", "labels"]


@app.command("publish")
def publish_(
    kind: Annotated[Kind, typer.Argument(help="data | drift | schedule | manual | labels")],
    target: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODEL FILE",
            help="For `labels`: the model and the labels file (CSV with a header, or JSON "
            "lines: request_id, label, optional index), e.g. `retrain publish labels "
            "rainfall labels.csv`.",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model name in retrain.yaml.")
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option("--data", "-d", help="Data URI; for `data`, the one object that landed."),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option("--key", help="Dedupe key; the same key never starts a second run."),
    ] = None,
    summary: Annotated[str, typer.Option(help="For `drift`: what was seen.")] = (
        "published by an operator"
    ),
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Publish a well-formed event to the right topic (a manual trigger); or late labels
    (`labels MODEL FILE`): checked, then uploaded under the model's labels prefix, where the
    monitor joins them to the logged predictions by request id."""
    from retrain.operator import publish  # noqa: PLC0415

    if kind == "labels":
        _publish_labels(config, model, target or [])
        return
    if target:
        err.print(f"[bold red]retrain publish[/]: {kind} takes no MODEL FILE arguments "
                  f"(got {escape(' '.join(target))}); give the model with --model")  # fmt: skip
        raise typer.Exit(code=2)
    if model is None:
        err.print(f"[bold red]retrain publish[/]: {kind} needs --model (a model in retrain.yaml)")
        raise typer.Exit(code=2)
    stack = _stack(config)
    clients = _Clients(stack)
    try:
        sent = publish(stack.settings, clients.publisher, kind, model, data, key, summary)
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[bold red]retrain publish[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    out.print(f"published {kind} for {model} to {sent.topic}: message {sent.message_id}")


def _publish_labels(config: Path, model: str | None, target: list[str]) -> None:
    from retrain.monitoring import LabelError, check_labels, publish_labels  # noqa: PLC0415

    given = ([model] if model else []) + target
    if len(given) != 2:
        err.print("[bold red]retrain publish labels[/]: give MODEL and FILE, e.g. "
                  "`retrain publish labels rainfall labels.csv`")  # fmt: skip
        raise typer.Exit(code=2)
    name, file = given
    path = Path(file)
    if not path.is_file():
        err.print(f"[bold red]retrain publish labels[/]: {escape(file)} is not a file")
        raise typer.Exit(code=2)
    stack = _stack(config)
    data = path.read_bytes()
    try:
        check_labels(stack.settings, name, data, str(path))  # refused before any client is made
        uri = publish_labels(stack.settings, _Clients(stack).storage, name, data, str(path))
    except (LabelError, UnicodeDecodeError) as exc:
        err.print(f"[bold red]retrain publish labels[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    out.print(f"labels for {name} uploaded to {uri}; the next monitor pass joins them",
              markup=False, soft_wrap=True)  # fmt: skip


@app.command()
def republish(
    from_dead_letter: Annotated[
        str | None,
        typer.Option(
            "--from-dead-letter",
            metavar="TOPIC",
            help="Move messages from TOPIC's dead-letter subscription back to TOPIC.",
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many messages.")] = 100,
    event: Annotated[
        str | None,
        typer.Option("--event", metavar="KEY", help="Re-send the recorded event with this key."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="With --event: the event's model.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Give the events new dedupe keys, so that they run again."),
    ] = False,
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Replay dead-lettered messages, or one recorded event. Nothing is acked before it is
    published again; a replay keeps its dedupe key unless --force."""
    from retrain.operator import republish_dead_letters, republish_event  # noqa: PLC0415

    if (from_dead_letter is None) == (event is None):
        err.print("[bold red]retrain republish[/]: give exactly one of --from-dead-letter, --event")
        raise typer.Exit(code=2)
    stack = _stack(config)
    clients = _Clients(stack)
    try:
        if from_dead_letter is not None:
            count = 0
            for sent in republish_dead_letters(
                stack.settings, clients.publisher, clients.subscriber, from_dead_letter, limit,
                force,
            ):  # fmt: skip
                count += 1
                out.print(
                    f"republished to {sent.topic}: message {sent.message_id} "
                    f"(dedupe key {sent.dedupe_key})",
                    markup=False,
                )
            out.print(f"{count} message(s) moved from {from_dead_letter}-dead-letter")
        else:
            assert event is not None  # noqa: S101 (checked above)
            if model is None:
                err.print("[bold red]retrain republish[/]: --event needs --model")
                raise typer.Exit(code=2)
            ledger = clients.ledger()
            sent = republish_event(stack.settings, clients.publisher, ledger, model, event, force)
            out.print(
                f"republished {event} to {sent.topic}: message {sent.message_id}", markup=False
            )
    except (ValueError, LookupError, FileNotFoundError) as exc:
        err.print(f"[bold red]retrain republish[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc


DetailsOption = Annotated[
    bool,
    typer.Option("--details", help="Print why each run ended in full (the table shows one line)."),
]


@app.command()
def runs(
    model: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    details: DetailsOption = False,
    output: OutputOption = "table",
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """List runs with reason, triggering event, state, duration and outcome: the step a
    failed run failed in and its error, or the gate's verdict and the rules it broke."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from retrain.outcomes import one_line, run_outcomes  # noqa: PLC0415

    stack = _stack(config)
    models = [model] if model else sorted(stack.settings.models)
    clients = _Clients(stack)
    ledger, registry = clients.ledger(), _writer(stack, clients)
    found = [run for name in models for run in run_outcomes(ledger, registry, name)]
    if output == "json":
        _print_json([run.to_json() for run in found])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("model", "run", "reason", "trigger", "events", "state", "started", "took"):
        table.add_column(column, no_wrap=True)
    table.add_column("outcome", no_wrap=True, overflow="ellipsis")
    cut = False
    for run in found:
        started = run.started_at or run.created_at
        took = f"{run.seconds:.1f} s" if run.seconds is not None else "-"
        outcome = one_line(run.why, ONE_LINE)
        cut = cut or outcome != " ".join(run.why.split())
        table.add_row(
            run.model, run.run_id, run.reason or "-", escape(run.trigger or "-"),
            str(run.events), run.state,
            datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M:%S"), took,
            escape(outcome) or "-",
        )  # fmt: skip
    out.print(table if found else "no runs yet")
    for run in found:  # the pipeline job each cloud run submitted
        if run.launched_as:
            out.print(f"{run.run_id}: {run.launched_as}", markup=False, soft_wrap=True)
    if details:
        _print_details([run for run in found if run.why])
    elif cut:
        out.print("(outcomes cut to one line: `retrain runs --details` prints them whole)",
                  markup=False)  # fmt: skip


def _print_details(found: list[RunOutcome]) -> None:
    """Why each run in ``found`` ended, in full: every line of its error, every gate rule."""
    for run in found:
        out.print(f"{run.run_id} ({run.model}): {run.state}", markup=False, soft_wrap=True)
        lines = run.why.splitlines()
        if run.state == "succeeded" and run.verdict:  # every rule, passed or not
            version = f" v{run.version}" if run.version else ""
            lines = [f"{run.verdict}{version} by the gate:", *(f"- {r}" for r in run.reasons)]
        for line in lines:
            out.print(f"  {line}", markup=False, soft_wrap=True)


@app.command()
def quarantine(
    what: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL|release", help="Only this model; or `release` to readmit OBJECT."
        ),
    ] = None,
    obj: Annotated[
        str | None, typer.Argument(metavar="OBJECT", help="gs://BUCKET/NAME to release.")
    ] = None,
    output: OutputOption = "table",
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """List the quarantined data objects (the rule each broke); `retrain quarantine release
    gs://BUCKET/NAME` readmits one after a fix: later runs' data windows include it."""
    stack = _stack(config)
    settings = stack.settings
    ledger = _Clients(stack).ledger()
    if what == "release":
        name = settings.model_for_object(*_bucket_and_name(obj))
        if name is None:
            err.print(f"[bold red]retrain quarantine release[/]: {escape(str(obj))} is not under "
                      f"gs://{settings.buckets.data}/ and a model's data_prefix")  # fmt: skip
            raise typer.Exit(code=2)
        released = ledger.release(name, str(obj), _operator())
        if released is None:
            err.print(f"[bold red]retrain quarantine release[/]: {escape(str(obj))} is not "
                      "quarantined (`retrain quarantine` lists what is)")  # fmt: skip
            raise typer.Exit(code=1)
        out.print(f"released {escape(str(obj))} (rule {released.get('rule')}): the next run of "
                  f"{name} reads it; `retrain run {name}` starts one now")  # fmt: skip
        return
    if obj is not None or (what is not None and what not in settings.models):
        known = ", ".join(sorted(settings.models))
        err.print(f"[bold red]retrain quarantine[/]: {escape(str(what))} is not a model in "
                  f"{config} (models: {known}), nor `release OBJECT`")  # fmt: skip
        raise typer.Exit(code=2)
    held: list[dict[str, Any]] = [
        {"model": name, "object": entry.get("object"), "rule": entry.get("rule"),
         "columns": entry.get("columns") or [], "error": entry.get("error"),
         "received_at": entry.get("received_at")}
        for name in ([what] if what else sorted(settings.models))
        for entry in ledger.quarantined(name)
    ]  # fmt: skip
    if output == "json":
        _print_json(held)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("model", "object", "rule", "columns", "error"):
        table.add_column(column)
    for entry in held:
        table.add_row(entry["model"], escape(str(entry["object"])), str(entry["rule"]),
                      escape(", ".join(entry["columns"])) or "-",
                      escape(str(entry["error"])))  # fmt: skip
    out.print(table if held else "nothing is quarantined")


def _bucket_and_name(uri: str | None) -> tuple[str, str]:
    if not uri or not uri.startswith("gs://") or "/" not in uri[5:]:
        err.print(f"[bold red]retrain quarantine release[/]: give the object as "
                  f"gs://BUCKET/NAME, not {escape(str(uri))!r}")  # fmt: skip
        raise typer.Exit(code=2)
    bucket, _, name = uri[5:].partition("/")
    return bucket, name


def _writer(stack: Stack, clients: _Clients | None = None) -> FirestoreRegistry:
    """The registry that ``backend`` names (projected onto Vertex AI Model Registry, or not)."""
    from retrain.gatekeeper import registry_for  # noqa: PLC0415

    clients = clients or _Clients(stack)
    return registry_for(stack.settings, clients.db, clients.storage)


def _operator() -> str:
    """Who is acting, from the environment (recorded with every operator action)."""
    import getpass  # noqa: PLC0415

    return os.environ.get("RETRAIN_OPERATOR") or getpass.getuser()


def _rows(record: dict[str, Any]) -> dict[str, int | None]:
    """The rows behind a version: read from its objects, in the window, trained on (the
    window minus the evaluation rows), evaluated on. None: not recorded (older versions)."""
    lineage = record.get("lineage", {})
    evaluated = record.get("metrics", {}).get("rows")
    return {
        "read": sum(lineage.get("train_rows", {}).values()),
        "window": lineage.get("window_rows"),
        "trained": lineage.get("fit_rows"),
        "evaluated": None if evaluated is None else int(evaluated),
    }


def _rows_text(record: dict[str, Any]) -> str:
    rows = _rows(record)
    objects = len(record.get("lineage", {}).get("train_data_uris", []))
    read = f"read {rows['read']:,} rows from {objects} object(s)"
    if rows["window"] is None or rows["trained"] is None:
        return f"{read}; the rows trained on were not recorded for this version"
    held_out = rows["window"] - rows["trained"]
    return (
        f"trained on {rows['trained']:,} of the window's {rows['window']:,} rows "
        f"({held_out:,} held out for evaluation); {read}"
    )


@app.command()
def versions(
    model: Annotated[str, typer.Argument(help="Model name in retrain.yaml.")],
    details: DetailsOption = False,
    output: OutputOption = "table",
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """List each version with its metrics, verdict, reasons and lineage; mark the champion
    and a canary (its share, since when) and show each canary's decision with its live
    numbers. Then the runs that registered no version (failed, abandoned, in flight) and why."""
    from dataclasses import asdict  # noqa: PLC0415

    from retrain.outcomes import one_line, run_outcomes  # noqa: PLC0415

    stack = _stack(config)
    clients = _Clients(stack)
    registry = _writer(stack, clients)
    pointer = registry.champion_record(model)
    champion = pointer.get("champion") if pointer else None
    canary = registry.canary(model)
    judged = {d["decision"]["run_id"]: d for d in registry.canary_decisions(model)}
    records = registry.records(model)
    without = [run for run in run_outcomes(clients.ledger(), registry, model) if not run.version]
    if output == "json":
        _print_json({
            "model": model,
            "champion": None if not pointer else {
                "version": champion, "by": pointer.get("by"), "reason": pointer.get("reason"),
                "history": pointer.get("history", []),
            },
            "canary": None if canary is None else asdict(canary),
            "versions": [{**record, "champion": record["version"] == champion,
                          "canary": canary is not None and record["version"] == canary.version,
                          "rows": _rows(record)} for record in records],
            "canary_decisions": list(judged.values()),
            "runs_without_version": [run.to_json() for run in without],
        })  # fmt: skip
        return
    if not records:
        out.print(f"{model} has no versions yet", markup=False)
    primary = (
        stack.settings.models[model].gate.primary_metric
        if model in stack.settings.models
        else "roc_auc"
    )
    for record in records:
        mark = " [bold green]* champion[/]" if record["version"] == champion else ""
        if canary is not None and record["version"] == canary.version:
            mark += f" [bold yellow]canary {canary.percent}%[/]"
        metrics = record.get("metrics", {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "rows")
        out.print(
            f"[bold]v{record['version']}[/]{mark} {record.get('verdict') or 'undecided'} "
            f"(run {escape(str(record.get('run_id')))}, reason {record.get('reason')})"
        )
        out.print(
            f"  {primary} {metrics.get(primary, float('nan')):.4f}; {shown}; "
            f"{metrics.get('rows', 0):.0f} eval rows",
            markup=False,
            soft_wrap=True,
        )
        for reason in record.get("reasons", []):
            out.print(f"  - {reason}", markup=False, soft_wrap=True)
        out.print(f"  {_rows_text(record)}; artifact {record.get('artifact_uri')}",
                  markup=False, soft_wrap=True)  # fmt: skip
        _print_canary_decision(judged.get(str(record.get("run_id"))))
    if canary is not None:
        out.print(f"canary v{canary.version}: serves {canary.percent}% beside v{canary.previous} "
                  f"({100 - canary.percent}%) since {_clock(canary.started_at)}; the monitor "
                  "completes or rolls it back on its live metric (gate.canary)",
                  markup=False, soft_wrap=True)  # fmt: skip
    if pointer:
        before = ", ".join("v" + v for v in pointer.get("history", [])) or "none"
        out.print(f"champion v{champion}: set by {pointer.get('by')} ({pointer.get('reason')}); "
                  f"earlier champions, newest first (what `rollback` walks back): {before}",
                  markup=False, soft_wrap=True)  # fmt: skip
    if without:
        out.print(f"runs of {model} that registered no version, oldest first:", markup=False)
    for run in without:
        why = run.why or f"{run.state}, since {_clock(run.started_at or run.created_at)}"
        lines = why.splitlines() if details else [one_line(why, ONE_LINE)]
        out.print(f"  {run.run_id} ({run.reason or '-'}): {lines[0]}",
                  markup=False, soft_wrap=True)  # fmt: skip
        for line in lines[1:]:
            out.print(f"    {line}", markup=False, soft_wrap=True)
    if not details and any(len(" ".join(run.why.split())) > ONE_LINE for run in without):
        out.print(f"(cut to one line: `retrain versions {model} --details` prints them whole)",
                  markup=False)  # fmt: skip


def _print_canary_decision(kept: dict[str, Any] | None) -> None:
    """A version's canary decision: verdict, when, its live numbers and reasons."""
    if kept is None:
        return
    decision = kept["decision"]
    verdict = "completed" if decision["verdict"] == "promoted" else "rolled back"
    published = "" if kept.get("message_id") else " (not yet published)"
    out.print(f"  canary {verdict} at {kept.get('time')}{published}", markup=False)
    for version, numbers in (decision.get("live") or {}).items():
        counts = ("labelled", "served")  # after the metric, as whole numbers
        shown = ", ".join(
            [f"{k} {v:.4f}" for k, v in sorted(numbers.items()) if k not in counts]
            + [f"{k} {numbers[k]:.0f}" for k in counts if k in numbers]
        )
        out.print(f"    live v{version}: {shown}", markup=False, soft_wrap=True)
    for reason in decision.get("reasons", []):
        out.print(f"  - {reason}", markup=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    from datetime import UTC, datetime  # noqa: PLC0415

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _move(stack: Stack, model: str, version: str | None, reason: str, action: str) -> None:
    """Promote ``version``, or roll back (to ``version``, or one step back in the history)."""
    from retrain.gatekeeper import RegistryError  # noqa: PLC0415
    from serving.vertex_endpoint import serving_for  # noqa: PLC0415

    registry = _writer(stack)
    pointer = registry.pointer(model)
    who = _operator()
    why = f"{action}: {reason}"
    try:
        if action == "rollback":
            moved = registry.rollback(model, pointer.generation, who, why, to=version)
        else:
            assert version is not None  # noqa: S101 (promote takes a version)
            if registry.version(model, version) is None:
                err.print(f"[bold red]{model} has no version {escape(version)}[/]")
                raise typer.Exit(code=2)
            promoted = registry.promote(model, version, pointer.generation, who, why)
            moved = str(int(version)) if promoted else None
    except RegistryError as exc:
        err.print(f"[bold red]{escape(str(exc))}[/]")
        raise typer.Exit(code=2) from exc
    if moved is None:
        err.print(
            "[bold red]the champion moved while you acted; look again with `retrain versions`[/]"
        )
        raise typer.Exit(code=1)
    out.print(f"{model}: champion v{pointer.version or '-'} -> v{moved} ({action} by {who}: "
              f"{reason})", markup=False)  # fmt: skip
    # Vertex AI: move the endpoint's traffic too. No function timeout here: wait up to an hour.
    serving = serving_for(stack.settings, registry, wait_seconds=3600.0)
    if serving is None:
        return
    try:
        with err.status(f"deploying v{moved} of {model} to its endpoint"):
            # A move by hand ends any canary: all traffic (a model with gate.canary ignores
            # the static gcp.endpoint.canary_percent, as the gatekeeper's deploys do).
            share = 0 if stack.settings.models[model].gate.canary is not None else None
            serving.deploy(model, moved, share)
    except RuntimeError as exc:  # DeployError: e.g. another version's deploy is under way
        err.print(f"[bold red]the endpoint did not move[/]: {escape(str(exc))}")
        raise typer.Exit(code=1) from exc
    under_way = getattr(registry, "deploy_record", lambda _: None)(model)
    if under_way is not None:
        out.print(
            f"{model}: the deploy of v{moved} goes on in Vertex AI; the endpoint's next "
            "deploy call finishes it and undeploys the old version once the new one serves"
        )
    else:
        out.print(f"{model}: the endpoint serves v{moved}")


ReasonOption = Annotated[str, typer.Option("--reason", help="Why; kept in the audit trail.")]


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="The version to serve.")],
    reason: ReasonOption,
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Make VERSION the champion by hand (compare-and-swap; who and why are recorded)."""
    _move(_stack(config), model, version, reason, "promote")


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="Model name.")],
    reason: ReasonOption,
    to: Annotated[
        str | None,
        typer.Option("--to", help="An earlier champion to go back to; default: the previous."),
    ] = None,
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Serve the previous champion again, walking the champion history back (a second
    rollback goes one step further); or --to an earlier champion. Who and why are recorded."""
    _move(_stack(config), model, to, reason, "rollback")


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="Model name.")],
    instances: Annotated[
        str, typer.Option("--instances", "-i", help="JSON file of instances, or - for stdin.")
    ],
    version: Annotated[
        str | None, typer.Option(help="Ask this version instead of the champion.")
    ] = None,
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Ask the prediction service; prints its answer (Vertex AI's predict shape)."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    stack = _stack(config)
    text = sys.stdin.read() if instances == "-" else Path(instances).read_text(encoding="utf-8")
    try:
        body = json.loads(text)
    except ValueError as exc:
        err.print(f"[bold red]{escape(instances)}: not JSON[/]: {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    if isinstance(body, list):
        body = {"instances": body}
    settings = stack.settings
    base = (
        f"http://{settings.local.host}:{settings.local.ports.serving}/v1/projects/"
        f"{settings.project}/locations/{settings.region}"
    )
    url = (
        f"{base}/models/{model}@{version}:predict"
        if version
        else f"{base}/endpoints/{model}:predict"
    )
    request = urllib.request.Request(  # noqa: S310 (our own loopback server)
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        err.print(f"[bold red]{exc.code}[/]: {escape(exc.read().decode(errors='replace'))}")
        raise typer.Exit(code=1) from exc
    except urllib.error.URLError as exc:
        err.print(
            f"[bold red]the prediction service at {url} did not answer[/]: {exc.reason}; "
            "is the stack up (`retrain status`)?"
        )
        raise typer.Exit(code=1) from exc
    out.print_json(data=answer)


@app.command()
def monitor(
    model: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    windows: Annotated[
        int, typer.Option(min=1, help="Show this many of each model's last windows.")
    ] = 12,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the pass and the windows as JSON (= -o json).")
    ] = False,
    output: OutputOption = "table",
    config: ConfigOption = Path("retrain.yaml"),
) -> None:
    """Run one pass of the monitor now (as every monitor_seconds): check the served inputs
    of each complete window for drift, join late labels, compute each version's live metrics
    over the last window, raise serving_drift and degradation alerts (once per window), and
    settle a canary that has enough labelled traffic. Then show each model's last windows:
    served rows, drift, live metric per version, alerts."""
    from retrain.monitoring import history  # noqa: PLC0415
    from retrain.service import build_service  # noqa: PLC0415

    stack = _stack(config)
    settings = stack.settings
    if model is not None and model not in settings.models:
        known = ", ".join(sorted(settings.models))
        err.print(f"[bold red]retrain monitor[/]: {escape(model)!r} is not a model in {config} "
                  f"(models: {escape(known)})")  # fmt: skip
        raise typer.Exit(code=2)
    if stack.running():  # the stack's emulators, for every client the service makes
        os.environ.update(stack.env())
    service = build_service(settings, stack.config_path)
    passes = service.monitor_passes([model] if model else None)
    shown = {name: history(service.registry.db, name, windows) for name in passes}
    if as_json or output == "json":
        _print_json([
            {"model": name, "pass": found if isinstance(found, str) else found.to_dict(),
             "windows": shown[name]}
            for name, found in passes.items()
        ])  # fmt: skip
        return
    failed = False
    for name, found in passes.items():
        out.print(f"[bold]{name}[/]")
        if isinstance(found, str):
            failed = True
            out.print(f"  {found}", markup=False, soft_wrap=True)
            continue
        _print_windows(shown[name])
        last = found.live
        if last:
            out.print(f"  last window {_clock(last['start'])} - {_clock(last['end'])}: "
                      f"{_live_text(last['versions'])}", markup=False, soft_wrap=True)  # fmt: skip
        for alert in found.alerts:
            sent = alert["message_id"] or "raised before: nothing new published"
            out.print(f"  alert {alert['kind']} ({alert['key']}): {sent}",
                      markup=False, soft_wrap=True)  # fmt: skip
        if found.canary:
            out.print(f"  canary: {found.canary}", markup=False, soft_wrap=True)
        for problem in found.problems:
            out.print(f"  problem: {problem}", markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(code=1)


def _print_windows(found: list[dict[str, Any]]) -> None:
    if not found:
        out.print("  no windows checked yet", markup=False)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("window (UTC)", "served", "drift", "live per version", "alerts"):
        table.add_column(column, justify="right" if column == "served" else "left")
    for window in found:
        drift: dict[str, dict[str, Any]] = window.get("drift") or {}
        if window.get("drifted") is None:
            why = window.get("note") or ("in progress" if "live_as_of" in window else "-")
            drifted = f"- ({why})"
        elif window.get("drifted"):
            worst = sorted((f["psi"], n) for n, f in drift.items() if f.get("drifted"))[::-1]
            drifted = "yes: " + ", ".join(f"{n} psi {psi:.2f}" for psi, n in worst[:3])
        else:
            drifted = "no"
        alerts = ", ".join(f"{k} {v or '(not republished)'}"
                           for k, v in (window.get("alerts") or {}).items())  # fmt: skip
        table.add_row(
            f"{_clock(window['start'])[:-4]} - {_clock(window['end'])[11:-4]}",
            str(window.get("served", "-")), escape(drifted),
            escape(_live_text(window.get("live") or {})), escape(alerts or "-"),
        )  # fmt: skip
    out.print(table)


def _live_text(live: dict[str, dict[str, float]]) -> str:
    """``v1 accuracy 0.8125 roc_auc 0.8710 (120 of 400 labelled)``, per version."""
    parts = []
    for version, figures in sorted(live.items()):
        metrics = " ".join(
            f"{name} {figures[name]:.4f}" for name in ("roc_auc", "accuracy") if name in figures
        )
        labelled = f"{figures.get('labelled', 0):.0f} of {figures.get('served', 0):.0f} labelled"
        parts.append(f"v{version} {metrics + ' ' if metrics else ''}({labelled})")
    return "; ".join(parts) or "nothing served"


def main() -> None:
    app()
