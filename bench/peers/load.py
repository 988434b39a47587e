"""Load generators: wrk (with a Lua script for the POST body) where it is installed, else an
asyncio HTTP/1.1 client on keep-alive connections. Both are bounded by a duration and a
request count, and both report the same :class:`LoadResult`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LoadResult", "Target", "generator", "run_load"]

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = io.open(os.getenv("BENCH_BODY_FILE"), "rb")
wrk.body = file:read("*a")
file:close()

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"status": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"""


@dataclass(frozen=True)
class Target:
    """One HTTP endpoint on 127.0.0.1 and the body POSTed to it."""

    port: int
    path: str
    body: bytes
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def generator(choice: str = "auto") -> str:
    """``wrk`` if asked for or (``auto``) installed, else ``python``."""
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("--load wrk: wrk is not installed (apt-get install wrk)")
    if choice not in ("wrk", "python"):
        raise ValueError(f"--load: expected auto, wrk or python, got {choice!r}")
    return choice


def run_load(
    target: Target, concurrency: int, seconds: float, max_requests: int, tool: str
) -> LoadResult:
    """``concurrency`` keep-alive connections POST ``target.body`` for ``seconds`` (the
    Python client also stops after ``max_requests``; wrk has no count limit)."""
    if tool == "wrk":
        return _wrk(target, concurrency, seconds)
    return asyncio.run(_python(target, concurrency, seconds, max_requests))


def _wrk(target: Target, concurrency: int, seconds: float) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script, body = Path(tmp) / "post.lua", Path(tmp) / "body.json"
        script.write_text(WRK_SCRIPT, encoding="utf-8")
        body.write_bytes(target.body)
        argv = [
            "wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency),
            "-d", f"{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(script),
            f"http://{target.host}:{target.port}{target.path}",
        ]  # fmt: skip
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            env={**os.environ, "BENCH_BODY_FILE": str(body)},
            check=False,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    data = json.loads(lines[-1].removeprefix("BENCH "))
    errors = sum(data[k] for k in ("status", "connect", "read", "write", "timeout"))
    return LoadResult(
        data["requests"], data["duration_us"] / 1e6, data["p50_us"] / 1000,
        data["p99_us"] / 1000, errors,
    )  # fmt: skip


async def _python(
    target: Target, concurrency: int, seconds: float, max_requests: int
) -> LoadResult:
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(target.body)}\r\n\r\n"
    ).encode()
    request = head + target.body
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            while time.perf_counter() < deadline and len(latencies) < max_requests:
                sent = time.perf_counter()
                writer.write(request)
                status = await _response(reader)
                latencies.append((time.perf_counter() - sent) * 1000)
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    await asyncio.wait_for(
        asyncio.gather(*(client() for _ in range(concurrency))), timeout=seconds + 60
    )
    elapsed = time.perf_counter() - started
    if not latencies:
        raise RuntimeError(f"no request answered within {seconds} s")
    return LoadResult(
        len(latencies), elapsed, float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)), errors,
    )  # fmt: skip


async def _response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length is None:
        raise RuntimeError(f"a response without Content-Length: {lines[0]}")
    await reader.readexactly(length)
    return status
