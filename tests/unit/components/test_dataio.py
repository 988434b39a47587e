"""components.dataio on local files: CSV, gzipped CSV, Parquet, and unreadable objects."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from components.dataio import DataReadError, _compression, read_table


@pytest.mark.unit
@pytest.mark.parametrize("name", ["part.csv", "part.csv.gz"])
def test_reads_csv_plain_and_compressed(tmp_path: Path, rainfall: pd.DataFrame, name: str) -> None:
    path = tmp_path / name
    rainfall.head(20).to_csv(path, index=False)

    frame = read_table(str(path), "csv")

    pd.testing.assert_frame_equal(frame, rainfall.head(20))


@pytest.mark.unit
def test_reads_parquet(tmp_path: Path, rainfall: pd.DataFrame) -> None:
    path = tmp_path / "part.parquet"
    rainfall.head(20).to_parquet(path, index=False)

    pd.testing.assert_frame_equal(read_table(str(path), "parquet"), rainfall.head(20))


@pytest.mark.unit
def test_zero_byte_csv_is_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")

    assert read_table(str(path), "csv").empty


@pytest.mark.unit
def test_missing_file_names_the_object(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"

    with pytest.raises(DataReadError, match="no such file") as caught:
        read_table(str(path), "csv")

    assert caught.value.uri == str(path)
    assert isinstance(caught.value.__cause__, FileNotFoundError)


@pytest.mark.unit
def test_csv_given_as_parquet_is_unreadable(tmp_path: Path, rainfall: pd.DataFrame) -> None:
    path = tmp_path / "part.parquet"
    rainfall.head(5).to_csv(path, index=False)

    with pytest.raises(DataReadError, match="not readable as parquet") as caught:
        read_table(str(path), "parquet")

    assert str(path) in str(caught.value)
    assert caught.value.__cause__ is not None


@pytest.mark.unit
def test_importing_the_components_does_not_import_google_cloud() -> None:
    code = (
        "import sys, components.preprocess, components.train, components.evaluate; "
        "sys.exit('google.cloud.storage' in sys.modules or 'kfp' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("part.csv.gz", gzip.compress(b"a,b\n1,2\n", mtime=0), "gzip"),
        ("part.csv", gzip.compress(b"a,b\n1,2\n", mtime=0), "gzip"),
        ("part.csv.gz", b"a,b\n1,2\n", None),  # stored with Content-Encoding: gzip
        ("part.csv.bz2", b"BZh9", "bz2"),
        ("part.csv", b"a,b\n1,2\n", None),
    ],
)
def test_downloaded_bytes_get_their_compression_from_content_then_suffix(
    name: str, data: bytes, expected: str | None
) -> None:
    assert _compression(name, data) == expected
