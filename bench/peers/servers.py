"""The servers compared: ours (``python -m serving``), MLServer with ``mlserver-sklearn`` in
its own venv, and the HTTP floor. Each binds 127.0.0.1 on free ports, with one OpenMP
thread, is waited on with a timeout and stopped by its pid."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrain.localstack.processes import (
    ProcessRecord,
    free_ports,
    http_ok,
    log_tail,
    spawn,
    stop,
    wait_until,
)

__all__ = [
    "MLSERVER_MODEL",
    "PEERS_VENV",
    "Server",
    "floor_server",
    "mlserver",
    "our_server",
]

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv-peers"
MLSERVER_MODEL = "rainfall"
START_TIMEOUT = 90.0
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Server:
    """A started server: how to reach it and how to phrase a request for ``rows``."""

    name: str
    port: int
    path: str
    body: Callable[[npt.NDArray[np.float64]], bytes]
    probabilities: Callable[[bytes], list[float]]  # P(positive class) from a 200 answer
    pid: int


def vertex_body(x: npt.NDArray[np.float64]) -> bytes:
    """Our request: Vertex AI's ``{"instances": [[...], ...]}``, full precision."""
    return json.dumps({"instances": x.tolist()}).encode()


def v2_body(x: npt.NDArray[np.float64]) -> bytes:
    """MLServer's: the V2 inference protocol, asking for predict_proba."""
    request = {
        "inputs": [
            {"name": "predict-prob", "shape": list(x.shape), "datatype": "FP64",
             "data": x.ravel().tolist()}
        ],
        "outputs": [{"name": "predict_proba"}],
    }  # fmt: skip
    return json.dumps(request).encode()


def _ours_probabilities(answer: bytes) -> list[float]:
    return [float(p["probability"]) for p in json.loads(answer)["predictions"]]


def _v2_probabilities(answer: bytes) -> list[float]:
    (output,) = json.loads(answer)["outputs"]
    width = output["shape"][1]
    return [float(p) for p in output["data"][width - 1 :: width]]  # the positive class


def _no_probabilities(_: bytes) -> list[float]:
    return []


@contextmanager
def _started(
    name: str, argv: Sequence[str], env: Mapping[str, str], workdir: Path, ready: str,
    expect: Callable[[int, bytes], bool] | None = None,
) -> Iterator[ProcessRecord]:  # fmt: skip
    log = workdir / f"{name}.log"
    record = spawn(argv, log, {**ONE_THREAD, **env}, workdir)
    try:
        if not wait_until(
            lambda: http_ok(ready, expect), timeout=START_TIMEOUT, interval=0.2,
            abort=lambda: not record.alive(),
        ):  # fmt: skip
            raise RuntimeError(f"{name} did not answer {ready}:\n{log_tail(log)}")
        yield record
    finally:
        stop(record)


@contextmanager
def our_server(
    config: Path, env: Mapping[str, str], model: str, endpoint: str, workdir: Path, workers: int
) -> Iterator[Server]:
    """``python -m serving`` on ``config`` (the stack's emulators in ``env``), serving
    ``model``'s champion; ``--workers`` is passed only when more than one is asked for.
    Its decisions subscription does not exist: it loads the champion at start and polls."""
    (port,) = free_ports(1)
    argv = [
        sys.executable, "-m", "serving", "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--subscription", f"peers-bench-{uuid.uuid4().hex[:8]}",
        "--cache-dir", str(workdir / "ours-cache"),
    ]  # fmt: skip
    if workers > 1:
        argv += ["--workers", str(workers)]
    ready = f"http://127.0.0.1:{port}/healthz"
    with _started(
        "ours", argv, env, workdir, ready, lambda s, b: s == 200 and model.encode() in b
    ) as record:
        yield Server("ours", port, f"{endpoint}/endpoints/{model}:predict", vertex_body,
                     _ours_probabilities, record.pid)  # fmt: skip


@contextmanager
def mlserver(model_file: Path, workdir: Path, venv: Path = PEERS_VENV) -> Iterator[Server]:
    """``mlserver start`` on a folder with settings.json (free HTTP, gRPC and metrics ports on
    127.0.0.1; everything else MLServer's defaults, parallel_workers included) and a
    model-settings.json for ``mlserver_sklearn.SKLearnModel`` on ``model_file``."""
    executable = venv / "bin" / "mlserver"
    if not executable.exists():
        raise RuntimeError(f"{executable} is missing: run `make bench-peers` first")
    http, grpc, metrics = free_ports(3)
    folder = workdir / "mlserver" / MLSERVER_MODEL  # MLServer expects the model's name
    folder.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"host": "127.0.0.1", "http_port": http, "grpc_port": grpc,
                                "metrics_port": metrics}  # fmt: skip
    (folder / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    model_settings = {
        "name": MLSERVER_MODEL,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(model_file.resolve()), "version": "v1"},
    }
    (folder / "model-settings.json").write_text(json.dumps(model_settings), encoding="utf-8")
    ready = f"http://127.0.0.1:{http}/v2/models/{MLSERVER_MODEL}/ready"
    # MLServer's workers find the runtime by the venv's PATH, as `mlserver start` does there.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    argv = [str(executable), "start", str(folder)]
    with _started("mlserver", argv, env, workdir, ready, lambda s, _: s == 200) as record:
        yield Server("MLServer", http, f"/v2/models/{MLSERVER_MODEL}/infer", v2_body,
                     _v2_probabilities, record.pid)  # fmt: skip


@contextmanager
def floor_server(workdir: Path) -> Iterator[Server]:
    """The bare Starlette app of :mod:`bench.peers.floor` on uvicorn."""
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "bench.peers.floor", "--port", str(port)]
    with _started("floor", argv, {"PYTHONPATH": str(ROOT)}, workdir,
                  f"http://127.0.0.1:{port}/healthz") as record:  # fmt: skip
        yield Server("HTTP floor", port, "/predict", vertex_body, _no_probabilities, record.pid)
