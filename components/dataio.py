"""Read one table (CSV or Parquet) from a local path or a ``gs://`` URI.

``gs://`` objects are fetched with ``google.cloud.storage.Client()``, which honours
``STORAGE_EMULATOR_HOST``; the library is imported, and the client built, only when a
``gs://`` URI is read.
"""

from __future__ import annotations

import io
import zlib
from pathlib import PurePosixPath
from typing import Literal

import pandas as pd

__all__ = ["DataFormat", "DataReadError", "read_table"]

DataFormat = Literal["csv", "parquet"]

_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zip": "zip", ".xz": "xz", ".zst": "zstd"}
_GZIP_MAGIC = b"\x1f\x8b"
_READ_ERRORS = (OSError, ValueError, EOFError, zlib.error)


class DataReadError(ValueError):
    """An object that is missing or cannot be parsed as the expected format."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: {reason}")


def read_table(uri: str, fmt: DataFormat, data: bytes | None = None) -> pd.DataFrame:
    """Read ``uri`` as ``fmt``, or parse ``data`` as the content of ``uri`` if given; a
    zero-byte CSV is an empty table, not an error."""
    if data is not None or uri.startswith("gs://"):
        data = _download(uri) if data is None else data
        source: object = io.BytesIO(data)
        compression = _compression(uri, data)
    else:
        source = uri
        compression = "infer"
    try:
        if fmt == "parquet":
            return pd.read_parquet(source)
        return pd.read_csv(source, compression=compression)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except FileNotFoundError as exc:
        raise DataReadError(uri, "no such file") from exc
    except _READ_ERRORS as exc:
        raise DataReadError(uri, f"not readable as {fmt}: {exc}") from exc


def _compression(uri: str, data: bytes) -> str | None:
    """pandas infers compression from a path only, so do it for downloaded bytes.

    Objects stored with ``Content-Encoding: gzip`` arrive decompressed: trust the bytes
    for gzip, and the suffix for the rest.
    """
    if data[:2] == _GZIP_MAGIC:
        return "gzip"
    suffix = PurePosixPath(uri).suffix.lower()
    return None if suffix == ".gz" else _COMPRESSION.get(suffix)


def _download(uri: str) -> bytes:
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    if not bucket or not name:
        raise DataReadError(uri, "expected gs://BUCKET/OBJECT")
    from google.api_core import exceptions  # noqa: PLC0415 (only gs:// needs google-cloud)
    from google.cloud import storage  # noqa: PLC0415

    try:
        data: bytes = storage.Client().bucket(bucket).blob(name).download_as_bytes()
    except exceptions.NotFound as exc:
        raise DataReadError(uri, "no such object") from exc
    except exceptions.GoogleAPICallError as exc:
        raise DataReadError(uri, f"cannot download: {exc}") from exc
    return data
