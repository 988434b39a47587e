"""``python -m bench.peers``: our prediction server and local pipeline against what users
would pick instead, side by side on this machine.

It starts a local stack (the emulators), trains the shipped rainfall model with our train
step and makes it a champion, then serves that same model.joblib from our server
(``python -m serving``), from MLServer with mlserver-sklearn (in .venv-peers: ``make
bench-peers``) and measures a bare uvicorn app (the HTTP floor) and predict_proba in this
process (the in-process floor); then ``retrain run``'s pipeline and a plain kfp.local
pipeline on the same rows. Rounds are interleaved, the order rotated each round.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml

from bench.peers.model import rainfall_rows, register_champion, train_model
from bench.peers.runner import PipelineJob, Plan, Served, as_json, compare, summary
from retrain import statedb
from retrain.config import load_settings
from retrain.gatekeeper.registry import FirestoreRegistry
from retrain.localstack import Stack, emulators
from retrain.localstack.processes import free_ports

ROOT = Path(__file__).resolve().parents[2]
SERVED_MODEL = "peers"
PIPELINE_MODEL = "rainfall"


def write_configs(directory: Path, log_sample_rate: float | None = None) -> tuple[Path, Path]:
    """The stack's config (the shipped one: free ports, state under ``directory``, the
    rainfall model without its schedule) and our server's (the same stack, serving only the
    ``peers`` model, whose champion the bench registers; its prediction log at
    ``log_sample_rate``, None: the shipped default)."""
    raw = yaml.safe_load((ROOT / "retrain.yaml").read_text(encoding="utf-8"))
    names = list(raw["local"]["ports"])
    raw["local"]["ports"] = dict(zip(names, free_ports(len(names)), strict=True))
    raw["local"]["state_dir"] = str(directory / "state")
    rainfall = {**raw["models"]["rainfall"], "schedule": None}
    raw["models"] = {PIPELINE_MODEL: rainfall}
    stack = directory / "retrain.yaml"
    stack.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    served_model = {**rainfall, "data_prefix": f"{SERVED_MODEL}/"}
    if log_sample_rate is not None:
        served_model["serving"] = {"log_sample_rate": log_sample_rate}
    raw["models"] = {SERVED_MODEL: served_model}
    served = directory / "serving.yaml"
    served.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return stack, served


@contextmanager
def bench_stack(
    directory: Path, log_sample_rate: float | None = None
) -> Iterator[tuple[Stack, Path]]:
    stack_config, served_config = write_configs(directory, log_sample_rate)
    with Stack(load_settings(stack_config), stack_config).running_stack() as stack:
        yield stack, served_config


def main(
    rounds: Annotated[int, typer.Option(min=1, max=20, help="Interleaved rounds.")] = 3,
    quick: Annotated[
        bool, typer.Option(help="One short round, a handful of requests: a smoke run.")
    ] = False,
    seconds: Annotated[
        float | None,
        typer.Option(min=0.5, max=120, help="Seconds per measurement (default 5; quick: 1)."),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Our server's worker processes (--workers N).")
    ] = 1,
    load: Annotated[
        str, typer.Option(help="Load generator: auto (wrk if installed), wrk or python.")
    ] = "auto",
    with_mlserver: Annotated[
        bool,
        typer.Option(
            "--mlserver/--no-mlserver", help="Run MLServer (needs .venv-peers: make bench-peers)."
        ),
    ] = True,
    with_pipelines: Annotated[
        bool,
        typer.Option(
            "--pipelines/--no-pipelines",
            help="Run retrain run's pipeline and the plain kfp.local one.",
        ),
    ] = True,
    serving: Annotated[
        bool, typer.Option("--serving/--no-serving", help="Run the serving scenarios.")
    ] = True,
    kfp_venv: Annotated[
        bool,
        typer.Option(
            help="Run the peer pipeline under kfp.local's default SubprocessRunner(use_venv=True), "
            "where each task pip-installs pandas, pyarrow and scikit-learn into a fresh venv "
            "(default: use_venv=False, the installed packages)."
        ),
    ] = False,
    log_sample_rate: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Our server's prediction log sample rate (default: retrain.yaml's, 1: every "
            "request is logged; MLServer logs nothing, 0 compares like with like).",
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="After the rounds, profile the servers with py-spy (1 row at concurrency 8; "
            "10,000-row requests) and keep the samples in this folder."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the raw figures to this file.")
    ] = None,
) -> None:
    """Serve the same model.joblib from ours, MLServer and the floors; run both pipelines;
    print each round's figures and the load, then the medians with their min and max."""
    plan = Plan.quick() if quick else Plan(rounds=rounds)
    plan = dataclasses.replace(
        plan, workers=workers, load=load, with_mlserver=with_mlserver,
        with_pipelines=with_pipelines, with_serving=serving, kfp_venv=kfp_venv,
        seconds=seconds or plan.seconds, profile_dir=profile,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        workdir = Path(tmp)
        print(f"starting the local stack in {workdir}")
        if log_sample_rate is not None:
            print(f"our prediction log's sample rate: {log_sample_rate}")
        with bench_stack(workdir, log_sample_rate) as (stack, served_config):
            settings = stack.settings
            # The Google clients made here (registry, storage, the in-process compute's bus)
            # find the emulators by environment, as the stack's processes do.
            os.environ.update(stack.env())
            spec = load_settings(served_config).models[SERVED_MODEL]
            folder = train_model(spec, workdir / "trained")
            gcs = emulators.storage_client(stack.gcs_url, settings.project)
            registry = FirestoreRegistry(statedb.database(settings), settings.buckets.models, gcs)
            register_champion(registry, gcs, SERVED_MODEL, folder)
            features = list(spec.features or []) or _features(folder)
            served = Served(
                served_config, stack.env(), SERVED_MODEL,
                f"/v1/projects/{settings.project}/locations/{settings.region}",
                folder / "model.joblib", features,
            )  # fmt: skip
            csv = workdir / "rows.csv"
            rainfall_rows(3000).to_csv(csv, index=False)
            name = "peers-bench/rows.csv"  # under no model's data_prefix: no run is triggered
            gcs.bucket(settings.buckets.data).blob(name).upload_from_filename(str(csv))
            job = PipelineJob(stack, PIPELINE_MODEL, f"gs://{settings.buckets.data}/{name}", csv)
            report = compare(plan, served, workdir, job)
    print()
    print(summary(report, plan))
    if json_out is not None:
        json_out.write_text(as_json(report), encoding="utf-8")
    if report.failed_requests():
        raise typer.Exit(f"{report.failed_requests()} requests failed")  # type: ignore[arg-type]


def _features(folder: Path) -> list[str]:
    import json  # noqa: PLC0415

    return list(json.loads((folder / "metadata.json").read_text(encoding="utf-8"))["features"])


if __name__ == "__main__":
    typer.run(main)
