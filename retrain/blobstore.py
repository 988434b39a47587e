"""Copy artifact folders to and from ``gs://`` through google-cloud-storage.

``storage.Client()`` picks fake-gcs-server by ``STORAGE_EMULATOR_HOST``, and real GCS
otherwise. The library is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from google.cloud import storage

__all__ = [
    "copy_prefix",
    "download_dir",
    "join",
    "read_bytes",
    "split_uri",
    "upload_dir",
    "upload_file",
    "write_bytes",
]


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not uri.startswith("gs://"):
        raise ValueError(f"{uri!r} is not a gs:// URI")
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, name


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _client(client: Any | None) -> storage.Client:
    if client is not None:
        return client
    from google.cloud import storage  # noqa: PLC0415

    return storage.Client()


def upload_dir(local: Path, uri: str, client: Any | None = None) -> list[str]:
    """Upload every file under ``local`` to the prefix ``uri``; return the object URIs."""
    gcs = _client(client)
    bucket_name, prefix = split_uri(uri)
    bucket = gcs.bucket(bucket_name)
    uploaded = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        name = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(local).as_posix()]))
        bucket.blob(name).upload_from_filename(str(path))
        uploaded.append(f"gs://{bucket_name}/{name}")
    if not uploaded:
        raise ValueError(f"{local}: no files to upload")
    return uploaded


def upload_file(local: Path, uri: str, client: Any | None = None) -> str:
    bucket, name = split_uri(uri)
    _client(client).bucket(bucket).blob(name).upload_from_filename(str(local))
    return uri


def download_dir(uri: str, local: Path, client: Any | None = None) -> list[Path]:
    """Download every object under the prefix ``uri`` into ``local``."""
    gcs = _client(client)
    bucket_name, prefix = split_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    written = []
    for blob in gcs.list_blobs(bucket_name, prefix=prefix):
        relative = blob.name[len(prefix) :]
        if not relative or relative.endswith("/") or ".." in relative.split("/"):
            continue
        target = local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
        written.append(target)
    if not written:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    return written


def copy_prefix(source: str, target: str, client: Any | None = None) -> list[str]:
    """Copy every object under the prefix ``source`` to the prefix ``target``, server-side;
    the copies' URIs. Copying again gives the same objects (idempotent)."""
    gcs = _client(client)
    source_bucket, source_prefix = split_uri(source)
    target_bucket, target_prefix = split_uri(target)
    source_prefix = source_prefix.rstrip("/") + "/"
    into = gcs.bucket(target_bucket)
    copied = []
    for blob in gcs.list_blobs(source_bucket, prefix=source_prefix):
        relative = blob.name[len(source_prefix) :]
        if not relative or relative.endswith("/") or ".." in relative.split("/"):
            continue
        name = f"{target_prefix.rstrip('/')}/{relative}"
        gcs.bucket(source_bucket).copy_blob(blob, into, name)
        copied.append(f"gs://{target_bucket}/{name}")
    if not copied:
        raise FileNotFoundError(f"{source}: no objects under this prefix")
    return copied


def read_bytes(uri: str, client: Any | None = None) -> bytes | None:
    """The object's bytes, or None if it does not exist."""
    from google.api_core.exceptions import NotFound  # noqa: PLC0415

    bucket, name = split_uri(uri)
    try:
        data: bytes = _client(client).bucket(bucket).blob(name).download_as_bytes()
    except NotFound:
        return None
    return data


def write_bytes(uri: str, data: bytes, client: Any | None = None, **kwargs: Any) -> int:
    """Write an object and return its generation.

    ``kwargs`` pass preconditions, e.g. ``if_generation_match=0`` to create only.
    """
    bucket, name = split_uri(uri)
    blob = _client(client).bucket(bucket).blob(name)
    blob.upload_from_string(data, content_type="application/json", **kwargs)
    generation: int = blob.generation
    return generation
