"""The arrival check's time and memory on big objects: the function reads a whole object
into pandas, so ``validation.max_object_bytes`` (shipped 64 MiB) is its memory bound.

Run with ``make bench``. Each size is checked in a fresh process (peak RSS is per process);
prints the figures, asserts only that the check passed.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import resource, sys, time
from pathlib import Path
from components.preprocess.validation import check_arrival
from retrain.config import load_settings
spec = load_settings(Path(sys.argv[1])).models["rainfall"]
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
data = Path(sys.argv[2]).read_bytes()
started = time.perf_counter()
frame, _ = check_arrival("gs://bench/" + Path(sys.argv[2]).name, data, spec)
took = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{len(frame)} {len(data) / 2**20:.1f} {took:.2f} {imported:.0f} {peak:.0f}")
"""


@pytest.mark.parametrize("rows", [3_000, 200_000, 400_000])
def test_arrival_check_time_and_peak_memory(rows: int, tmp_path: Path) -> None:
    stream = pd.read_csv(ROOT / "data" / "rainfall.csv.gz")
    stream = stream.rename(columns={"Unnamed: 0": "day"})
    big = pd.concat([stream] * (rows // len(stream) + 1), ignore_index=True).iloc[:rows]
    path = tmp_path / f"rows-{rows}.csv"
    big.assign(day=np.arange(rows)).to_csv(path, index=False)

    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(ROOT / "retrain.yaml"), str(path)],
        capture_output=True, text=True, timeout=300, check=True, cwd=ROOT,
    )  # fmt: skip

    checked, mib, took, imported, peak = done.stdout.split()
    assert int(checked) == rows
    print(
        f"\narrival check of {rows:,} rows ({mib} MiB): {took} s; peak RSS {peak} MiB "
        f"({imported} MiB after imports)"
    )
