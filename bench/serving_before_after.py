"""The prediction server before and after a change, side by side, with wrk as the client.

    .venv/bin/python bench/serving_before_after.py --before /work/main [--rounds 2]

Trains the rainfall model (HistGradientBoosting, 200 iterations, 8 features), then, in
interleaved rounds, serves it from each checkout's ``serving.app.create_app`` (the app of
``python -m serving``, on a local folder instead of the registry: no emulators needed) and
measures with wrk (apt-get install wrk): 1-row requests at concurrency 1 and 8, 1,000-row
requests at concurrency 4, 10,000-row requests at concurrency 1. Prints each figure and the
machine's load with each round. The after checkout also runs with 2 worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
PATH = "/v1/projects/retrain-local/locations/us-central1/endpoints/bench:predict"
LUA = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {{"requests": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f, "errors": %d}}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def app_factory() -> Any:
    """The app under test (uvicorn's factory; the checkout is first on sys.path)."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    from retrain.config import Settings  # noqa: PLC0415
    from retrain.gatekeeper.registry import CanaryState, ModelVersion  # noqa: PLC0415
    from serving.app import create_app  # noqa: PLC0415
    from serving.models import ModelStore  # noqa: PLC0415

    folder = os.environ["BENCH_MODEL_DIR"]
    settings = Settings.model_validate(
        {
            "project": "retrain-local",
            "region": "us-central1",
            "buckets": {"data": "bench-data", "artifacts": "bench-artifacts"},
            "models": {"bench": {"data_prefix": "b/", "label": "rain", "order_column": "day"}},
        }
    )

    class OneVersion:
        def champion(self, model: str) -> ModelVersion:
            return ModelVersion(model, "1", folder, {}, "run")

        def version(self, model: str, version: str) -> ModelVersion | None:
            return self.champion(model) if version == "1" else None

        def canary(self, model: str) -> CanaryState | None:
            return None  # never a canary

    def copy(uri: str, local: Path) -> object:
        return shutil.copytree(uri, local, dirs_exist_ok=True)

    store = ModelStore(["bench"], OneVersion(), copy, Path(tempfile.mkdtemp()))
    threadpool_limits(limits=1)
    kwargs: dict[str, Any] = {}
    if "max_body_bytes" in create_app.__code__.co_varnames:  # the after checkout
        kwargs["max_body_bytes"] = 8 * 1024 * 1024
    if "BENCH_PARALLEL" in os.environ:
        kwargs["parallel_predicts"] = int(os.environ["BENCH_PARALLEL"])
    return create_app(settings, store, **kwargs)


def serve(checkout: Path, port: int, workers: int, model_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BENCH_MODEL_DIR": str(model_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{checkout}:{HERE.parent}"}  # fmt: skip
    code = (
        "import socket, uvicorn; from uvicorn.supervisors import Multiprocess; "
        "c = uvicorn.Config('serving_before_after:app_factory', factory=True, "
        f"host='127.0.0.1', port={port}, workers={workers}, log_level='warning'); "
        "s = c.bind_socket(); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); "
        "Multiprocess(c, sockets=[s]).run()"
        if workers > 1
        else "import uvicorn; uvicorn.run('serving_before_after:app_factory', factory=True, "
        f"host='127.0.0.1', port={port}, log_level='warning')"
    )  # with workers, as python -m serving starts them (see serving/__main__.py)
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=checkout)
    body = json.dumps({"instances": [[0.0] * 8]}).encode()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", data=body)
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"the server from {checkout} did not answer (exit {process.poll()})")


def wrk(port: int, body: Path, connections: int, seconds: int, scripts: Path) -> dict[str, Any]:
    script = scripts / f"{body.stem}.lua"
    script.write_text(LUA.format(body=body))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s",
         str(script), f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("JSON "))
    result: dict[str, Any] = json.loads(line[5:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout before")
    parser.add_argument("--after", type=Path, default=ROOT, help="the checkout after")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--port", type=int, default=18480)
    args = parser.parse_args()

    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    from components.train import train  # noqa: PLC0415
    from retrain.config import ModelSettings  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    rows = pd.read_csv(ROOT / "data" / "rainfall.csv.gz", nrows=3000)
    rows = rows.rename(columns={"Unnamed: 0": "day"})
    rows.to_parquet(work / "train.parquet")
    spec = ModelSettings.model_validate(
        {"data_prefix": "b/", "label": "rain", "order_column": "day",
         "estimator": {"name": "HistGradientBoostingClassifier",
                       "params": {"max_iter": 200, "learning_rate": 0.1}}}
    )  # fmt: skip
    model_dir = train(work / "train.parquet", spec, work / "model").model_path.parent
    features = json.loads((model_dir / "metadata.json").read_text())["features"]
    x = rows[features].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(16)
    big = x[rng.integers(0, len(x), 10_000)] * (1 + rng.normal(0, 1e-3, (10_000, len(features))))
    bodies = {
        "one": [x[0].tolist()],
        "thousand": big[:1000].tolist(),
        "ten_thousand_4dp": np.round(big, 4).tolist(),
        "ten_thousand_full": big.tolist(),
    }
    for name, instances in bodies.items():
        (work / f"{name}.json").write_text(json.dumps({"instances": instances}))
    cases = [("one", 1), ("one", 8), ("thousand", 4), ("ten_thousand_4dp", 1),
             ("ten_thousand_full", 1)]  # fmt: skip
    servers = [("before", args.before, 1), ("after", args.after, 1), ("after-2w", args.after, 2)]
    for round_ in range(args.rounds):
        order = servers[round_ % 3 :] + servers[: round_ % 3]
        for label, checkout, workers in order:
            process = serve(checkout, args.port, workers, model_dir)
            try:
                for name, connections in cases:
                    body = work / f"{name}.json"
                    rows_each = len(bodies[name])
                    load = Path("/proc/loadavg").read_text().split()[0]
                    r = wrk(args.port, body, connections, args.seconds, work)
                    ok = r["requests"] - r["errors"]
                    print(
                        f"round {round_ + 1} {label:8} {name:17} c={connections}: "
                        f"{r['requests'] / r['seconds']:7.1f} req/s, "
                        f"{ok * rows_each / r['seconds']:9.0f} rows/s, p50 {r['p50_ms']:7.2f} ms, "
                        f"p99 {r['p99_ms']:7.2f} ms, errors {r['errors']}, load {load}",
                        flush=True,
                    )
            finally:
                process.terminate()
                process.wait(30)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
