"""Benchmarks use the same real stack fixture as the tests."""

from tests.conftest import bucket, gcs, publisher, stack, subscriber

__all__ = ["bucket", "gcs", "publisher", "stack", "subscriber"]
