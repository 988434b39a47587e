"""A big arriving object is checked on a bounded sample (issue 13): on_data_arrival reads at
most about ``SAMPLE_BYTES`` of it, never the whole object, and records its rows as estimated
from the sample (exact for Parquet)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from retrain import service
from retrain.config import load_settings
from retrain.events import ObjectEvent
from retrain.service import RetrainService, sample_object

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ROWS = 40_000
LIMIT = 256 * 1024


def _frame(rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({f"x{i}": rng.normal(size=rows) for i in range(6)})
    frame["day"] = np.arange(rows)
    frame["rain"] = rng.integers(0, 2, size=rows)
    return frame


class Reader(io.BytesIO):
    """A seekable object reader that counts the bytes it handed out (Blob.open("rb"))."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.handed = 0

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self.handed += len(chunk)
        return chunk

    def read1(self, size: int | None = -1, /) -> bytes:
        chunk = super().read1(size)
        self.handed += len(chunk)
        return chunk

    def readinto(self, buffer: Any, /) -> int:
        count = super().readinto(buffer)
        self.handed += count
        return count


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_csv_head_is_read_and_its_rows_estimated(gzipped: bool) -> None:
    data = _frame().to_csv(index=False).encode()
    if gzipped:
        data = gzip.compress(data)
    reader = Reader(data)
    sample = sample_object(reader, "gs://b/rain/x.csv" + ".gz" * gzipped, "csv", LIMIT)
    assert sample is not None
    head, ratio = sample
    assert len(head) <= LIMIT
    assert head.endswith(b"\n")
    rows = len(pd.read_csv(io.BytesIO(head)))
    assert abs(rows * ratio - ROWS) / ROWS < 0.05, (rows, ratio)
    # Only the head was read (gzip reads its trailer too, and decompresses in chunks).
    assert reader.handed < (len(data) if gzipped else LIMIT + 128 * 1024)


def test_parquet_row_groups_are_read_and_the_rows_are_exact() -> None:
    out = io.BytesIO()
    _frame().to_parquet(out, row_group_size=2_000)
    data = out.getvalue()
    head, ratio = sample_object(Reader(data), "gs://b/rain/x.parquet", "parquet", 64 * 1024) or (
        b"",
        0.0,
    )
    sample = pd.read_parquet(io.BytesIO(head))
    assert 0 < len(sample) < ROWS
    assert round(len(sample) * ratio) == ROWS


def test_other_compressions_are_not_sampled() -> None:
    assert sample_object(Reader(b"a,b\n1,2\n"), "gs://b/x.csv.bz2", "csv", 4) is None


class Blob:
    def __init__(self, data: bytes) -> None:
        self.data, self.size, self.reader = data, len(data), Reader(data)

    def open(self, mode: str) -> Reader:
        assert mode == "rb"
        return self.reader

    def download_as_bytes(self) -> bytes:
        raise AssertionError("a big object must not be downloaded whole")


def test_the_arrival_check_reads_a_bounded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(ROOT / "retrain.yaml")
    model = settings.models["rainfall"]
    data = _frame().to_csv(index=False).encode()
    blob = Blob(data)
    storage = SimpleNamespace(bucket=lambda _name: SimpleNamespace(get_blob=lambda *_a, **_k: blob))
    launcher = SimpleNamespace(scheduled=None)
    retrain = RetrainService(settings, None, launcher, None, None, storage=storage)  # type: ignore[arg-type]
    monkeypatch.setattr(service, "SAMPLE_BYTES", LIMIT)
    event = ObjectEvent("e1", "OBJECT_FINALIZE", settings.buckets.data, "rainfall/x.csv", "7")
    frame, features, size, rows = retrain._read_checked(event, model)
    assert size == len(data)
    assert len(frame) < ROWS
    assert abs(rows - ROWS) / ROWS < 0.05
    assert "rain" not in features
    assert blob.reader.handed < LIMIT + 128 * 1024  # not the 2.6 MB object
