"""The Firestore database that holds the run ledger and the model registry.

Every change of state is **one atomic commit** (a Firestore batch write) whose writes carry
preconditions on the documents they were computed from: a document read as absent is
created only if it is still absent, and one read at ``update_time`` T is updated or
deleted only if it is still at T. Two racing changes cannot both commit; the loser's
commit fails as a whole (nothing of it is written), reads again and decides again
(:func:`retrying`). This is optimistic concurrency: no locks are held, so a caller that
dies mid-way leaves nothing half-done and blocks no one.

Every write goes through :meth:`Database.commit`, so a test can wrap that one method to
crash a caller after any write (``tests/reliability``).

The client finds the emulator by ``FIRESTORE_EMULATOR_HOST``, as the other clients find
theirs; in the cloud the database is ``settings.database`` (Firestore, Native mode).
"""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from retrain.config import Settings

__all__ = ["Change", "Conflict", "Database", "Doc", "database", "firestore", "retrying"]

T = TypeVar("T")


def firestore(submodule: str = "") -> Any:
    """``google.cloud.firestore`` (or ``google.cloud.firestore_v1.<submodule>``), imported on
    first use and by name: its ``py.typed`` would make ``google.cloud`` a typed package for
    mypy, and every ``from google.cloud import storage`` fail (as :mod:`retrain.vertex_sdk`
    explains for aiplatform). Its objects are used as ``Any``."""
    name = f"google.cloud.firestore_v1.{submodule}" if submodule else "google.cloud.firestore"
    return importlib.import_module(name)


class Conflict(RuntimeError):
    """A commit lost a race (a precondition failed); read again and decide again."""


@dataclass(frozen=True)
class Doc:
    """A document as read: its data (None if absent) and when it was last written."""

    ref: Any  # google.cloud.firestore.DocumentReference
    data: dict[str, Any] | None
    update_time: Any = None  # a protobuf Timestamp; None if absent

    @property
    def exists(self) -> bool:
        return self.data is not None

    def get(self, key: str, default: Any = None) -> Any:
        return (self.data or {}).get(key, default)


@dataclass
class Change:
    """The writes of one atomic commit, each guarded by what was read."""

    writes: list[tuple[str, Doc, dict[str, Any] | None]] = field(default_factory=list)

    def put(self, doc: Doc, data: dict[str, Any]) -> None:
        """Create ``doc`` if it was read as absent (and still is), else update the fields of
        ``data`` if it is unchanged since it was read."""
        self.writes.append(("put", doc, data))

    def delete(self, doc: Doc) -> None:
        """Delete ``doc`` if it is unchanged since it was read."""
        self.writes.append(("delete", doc, None))

    def verify(self, doc: Doc, field_name: str) -> None:
        """Make the commit fail if ``doc`` changed since it was read, without changing it:
        ``field_name`` is written back with the value read. A write that changes nothing
        leaves the document's update time as it was (Firestore's ``WriteResult.update_time``:
        "if the write did not actually change the document, this will be the previous
        update_time"), so changes guarded by that time, or verifying it too, still commit.
        ``doc`` must exist and hold ``field_name``."""
        if doc.data is None or field_name not in doc.data:
            raise ValueError(f"cannot verify {doc.ref.path}: it has no field {field_name!r}")
        self.put(doc, {field_name: doc.data[field_name]})

    def guard(self, doc: Doc, now: float) -> None:
        """Make the commit fail if ``doc`` changed since it was read (a write of one field)."""
        self.put(doc, {"guarded_at": now})

    def __bool__(self) -> bool:
        return bool(self.writes)


class Database:
    """The client of the ledger's and registry's database, and their one write path."""

    def __init__(self, client: Any) -> None:
        """``client`` is a ``google.cloud.firestore.Client``."""
        self.client = client

    def doc(self, *path: str) -> Any:
        return self.client.document(*path)

    def read(self, ref: Any) -> Doc:
        snapshot = ref.get(retry=None)
        if not snapshot.exists:
            return Doc(ref, None)
        return Doc(ref, snapshot.to_dict() or {}, snapshot.update_time)

    def read_many(self, refs: list[Any]) -> list[Doc]:
        """Several documents in one round trip (absent ones too), in no particular order."""
        if not refs:
            return []
        return [
            Doc(s.reference, s.to_dict() or {}, s.update_time)
            if s.exists
            else Doc(s.reference, None)
            for s in self.client.get_all(refs)
        ]

    def read_path(self, *path: str) -> Doc:
        return self.read(self.doc(*path))

    def query(self, collection: Any, field_path: str, op: str, value: Any, limit: int) -> list[Doc]:
        """Documents of ``collection`` where ``field_path op value``, at most ``limit``."""
        condition = firestore("base_query").FieldFilter(field_path, op, value)
        found = collection.where(filter=condition).limit(limit)
        return [Doc(s.reference, s.to_dict() or {}, s.update_time) for s in found.stream()]

    def all(self, collection: Any) -> list[Doc]:
        return [Doc(s.reference, s.to_dict() or {}, s.update_time) for s in collection.stream()]

    def commit(self, change: Change) -> list[Any]:
        """Apply every write of ``change`` or none; :class:`Conflict` if a precondition
        failed. Never retried here: a retry of a commit whose answer was lost would fail
        its own preconditions, so callers read again and recognise their own write.

        Returns the ``update_time`` of each write, in order (None for a delete): a document
        written here is, as of that time, exactly what was written, so a later change may be
        guarded by it without reading the document again (:meth:`written`)."""
        from google.api_core import exceptions  # noqa: PLC0415

        if not change:
            return []
        batch = self.client.batch()
        for kind, doc, data in change.writes:
            if kind == "delete":
                option = self.client.write_option(last_update_time=doc.update_time)
                batch.delete(doc.ref, option=option)
            elif doc.exists:
                assert data is not None  # noqa: S101 (put always carries data)
                option = self.client.write_option(last_update_time=doc.update_time)
                batch.update(doc.ref, _escape(data), option=option)
            else:
                assert data is not None  # noqa: S101
                batch.create(doc.ref, data)
        try:
            results = batch.commit(retry=None)
        except (
            exceptions.FailedPrecondition,  # update_time moved: someone wrote first
            exceptions.Conflict,  # create of a document that exists (AlreadyExists)
            exceptions.NotFound,  # update or delete of a document someone deleted
            exceptions.Aborted,
        ) as exc:
            raise Conflict(str(exc)) from exc
        return [getattr(result, "update_time", None) for result in results]

    @staticmethod
    def written(doc: Doc, data: dict[str, Any], update_time: Any) -> Doc:
        """``doc`` as a commit that returned ``update_time`` left it: created with ``data``
        if it was absent, else updated with it (the fields not in ``data`` are as read)."""
        return Doc(doc.ref, {**(doc.data or {}), **data}, update_time)


def _escape(data: dict[str, Any]) -> dict[str, Any]:
    """``update`` reads dotted keys as field paths; ours are plain top-level fields."""
    field_path = firestore("field_path").FieldPath
    return {field_path(key).to_api_repr(): value for key, value in data.items()}


def retrying(attempt: Callable[[], T], what: str, tries: int = 40) -> T:
    """Call ``attempt`` until it commits without a :class:`Conflict` (reading afresh each
    time), with jittered backoff; give up after ``tries`` with a :class:`Conflict`."""
    for n in range(tries):
        try:
            return attempt()
        except Conflict:
            time.sleep(random.uniform(0, min(0.25, 0.005 * 2 ** min(n, 6))))  # noqa: S311
    raise Conflict(f"{what}: still contended after {tries} attempts")


def database(settings: Settings) -> Database:
    """The database named by ``settings.database`` in ``settings.project``."""
    return Database(firestore().Client(project=settings.project, database=settings.database))
