"""The ``ModelRegistry`` port and its Firestore adapter, the truth for every backend.

Records live in Firestore (:mod:`retrain.statedb`, the same database as the run ledger,
so that a decision and the end of its run are one commit); the models themselves in the
registry bucket (``buckets.registry``), copied there at registration, where only the
gatekeeper writes (the pipelines may read it)::

    registry/<model>                   champion: the version served; generation: how many
                                       times the champion moved; history: the earlier
                                       champions, newest first; versions: the last number;
                                       canary: while the champion is a canary (gate.canary),
                                       {version, previous, percent, started_at, generation}
    registry/<model>/versions/<NNNNNN> a version: artifact, metrics, lineage, verdict, reasons
    registry/<model>/runs/<run id>     the run's version (once registered) and decision
                                       (once decided), and the Decision's message id
    registry/<model>/audit/<id>        each move of the champion: from, to, by whom, why
    registry/<model>/refused/<id>      each report the gatekeeper refused, and why

Version numbers are allocated with the ``versions`` counter in the same commit that
creates the version and names it in the run's document: unique, gap-free, in
registration order, one per run however often its report is delivered.

:class:`ModelRegistry` is what the prediction server and the evaluate step read;
:class:`FirestoreRegistry` also registers, decides (with :mod:`retrain.gatekeeper.decisions`)
and moves the champion. :class:`~retrain.gatekeeper.vertex.VertexRegistry` projects it
onto Vertex AI Model Registry.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from retrain import blobstore
from retrain.gatekeeper.policy import Pointer
from retrain.statedb import Change, Database, Doc, retrying

__all__ = [
    "HISTORY",
    "CanaryState",
    "FirestoreRegistry",
    "ModelRegistry",
    "ModelVersion",
    "RegistryError",
]

HISTORY = 50  # earlier champions kept in the pointer (the audit trail keeps every move)


class RegistryError(RuntimeError):
    """The registry's records are missing or malformed; the message names the record."""


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: str
    artifact_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    generation: int | None = None  # the champion pointer's generation, if read as champion


@dataclass(frozen=True)
class CanaryState:
    """The champion ``version`` is a canary: it serves ``percent`` % of the traffic and
    ``previous`` (the champion before it) the rest, since ``started_at`` (epoch seconds),
    until the gatekeeper completes or rolls it back. ``generation`` is the pointer's
    generation that the canary's promotion made; a later move of the pointer ends it."""

    version: str
    previous: str
    percent: int
    started_at: float
    generation: int


class ModelRegistry(Protocol):
    def champion(self, model: str) -> ModelVersion | None:
        """The version that the champion pointer names, or None for a new model."""
        ...

    def canary(self, model: str) -> CanaryState | None:
        """The champion's canary, if the champion is one (see :class:`CanaryState`)."""
        ...

    def version(self, model: str, version: str) -> ModelVersion | None:
        """One registered version, or None if there is no such version."""
        ...


def canary_of(where: str, head: dict[str, Any] | None) -> CanaryState | None:
    """The canary that the champion pointer ``head`` records, if it is still the champion's
    (a pointer that moved since, by hand or by a rollback, has no canary)."""
    raw = (head or {}).get("canary")
    if not raw:
        return None
    try:
        state = CanaryState(
            version=str(raw["version"]),
            previous=str(raw["previous"]),
            percent=int(raw["percent"]),
            started_at=float(raw["started_at"]),
            generation=int(raw["generation"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"{where}: malformed canary: {exc!r}") from exc
    assert head is not None  # noqa: S101 (it had a canary)
    if str(head.get("champion")) != state.version or int(head.get("generation", 0)) != (
        state.generation
    ):
        return None
    return state


def _version_id(version: str | int) -> str:
    return f"{int(version):06d}"


class FirestoreRegistry:
    """The registry in the ``registry`` collection of ``db``; models in gs://``bucket``."""

    def __init__(self, db: Database, bucket: str, storage: Any | None = None) -> None:
        self.db = db
        self.bucket = bucket
        self._storage = storage

    # -- documents ---------------------------------------------------------------------

    def head_doc(self, model: str) -> Doc:
        return self.db.read_path("registry", model)

    def run_doc(self, model: str, run_id: str) -> Doc:
        return self.db.read_path("registry", model, "runs", run_id)

    def version_doc(self, model: str, version: str) -> Doc:
        return self.db.read_path("registry", model, "versions", _version_id(version))

    def where(self, model: str, *parts: str) -> str:
        """A record's name, for messages."""
        return "/".join(["registry", model, *parts])

    # -- reading -----------------------------------------------------------------------

    def pointer(self, model: str) -> Pointer:
        head = self.head_doc(model)
        return Pointer(head.get("champion"), int(head.get("generation", 0)))

    def champion_record(self, model: str) -> dict[str, Any] | None:
        """The champion pointer: champion, generation, history, by, reason, at; or None."""
        head = self.head_doc(model)
        return head.data if head.get("champion") is not None else None

    def champion(self, model: str) -> ModelVersion | None:
        head = self.head_doc(model)
        version = head.get("champion")
        if version is None:
            return None
        found = self.version(model, str(version))
        if found is None:
            raise RegistryError(
                f"{self.where(model)} names version {version}, but "
                f"{self.where(model, 'versions', _version_id(version))} does not exist"
            )
        return ModelVersion(
            found.model, found.version, found.artifact_uri, found.metrics, found.run_id,
            int(head.get("generation", 0)),
        )  # fmt: skip

    def canary(self, model: str) -> CanaryState | None:
        return canary_of(self.where(model), self.head_doc(model).data)

    def version(self, model: str, version: str) -> ModelVersion | None:
        if not str(version).isdigit():
            return None
        record = self.version_doc(model, version).data
        if record is None:
            return None
        try:
            return ModelVersion(
                model=model,
                version=str(version).lstrip("0") or "0",
                artifact_uri=str(record["artifact_uri"]),
                metrics={k: float(v) for k, v in (record.get("metrics") or {}).items()},
                run_id=record.get("run_id"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            where = self.where(model, "versions", _version_id(version))
            raise RegistryError(f"{where}: malformed: {exc!r}") from exc

    def records(self, model: str) -> list[dict[str, Any]]:
        """Every version's record, in registration order."""
        found = self.db.all(self.db.client.collection("registry", model, "versions"))
        return sorted((d.data or {} for d in found), key=lambda r: int(r["number"]))

    def decision(self, model: str, run_id: str) -> dict[str, Any] | None:
        """The decision kept for ``run_id``: ``{"decision", "time", "message_id"}``."""
        found = self.run_doc(model, run_id)
        return found.data if found.get("decision") is not None else None

    def decisions(self, model: str) -> list[dict[str, Any]]:
        found = self.db.all(self.db.client.collection("registry", model, "runs"))
        kept = [d.data for d in found if d.data and d.data.get("decision") is not None]
        return sorted(kept, key=lambda v: str(v.get("time", "")))

    def audit(self, model: str) -> list[dict[str, Any]]:
        """Every move of the champion, oldest first."""
        found = self.db.all(self.db.client.collection("registry", model, "audit"))
        return [d.data or {} for d in sorted(found, key=lambda d: d.ref.id)]

    def refused(self, model: str) -> list[dict[str, Any]]:
        found = self.db.all(self.db.client.collection("registry", model, "refused"))
        return [d.data or {} for d in sorted(found, key=lambda d: d.ref.id)]

    # -- registering -------------------------------------------------------------------

    def keep_artifact(self, model: str, run_id: str, artifact_uri: str) -> str:
        """Copy the candidate's folder into the registry bucket (idempotent); its new URI.
        What serves is this copy, which the pipelines cannot overwrite."""
        target = f"gs://{self.bucket}/{model}/{run_id}/model"
        blobstore.copy_prefix(artifact_uri, target, self._storage)
        return target

    def register(self, model: str, record: dict[str, Any]) -> str:
        """The version of ``record["run_id"]``: a new one, numbered next, or the one it
        has already (one commit: the counter, the version and the run's document)."""
        run_id = str(record["run_id"])

        def attempt() -> str:
            run = self.run_doc(model, run_id)
            if run.get("version") is not None:
                return str(run.get("version"))
            head = self.head_doc(model)
            number = int(head.get("versions", 0)) + 1
            now = time.time()
            version = self.version_doc(model, str(number))
            change = Change()
            change.put(head, {"versions": number})
            change.put(version, {**record, "version": str(number), "number": number,
                                 "verdict": None, "reasons": []})  # fmt: skip
            change.put(run, {"version": str(number), "registered_at": now})
            self.db.commit(change)
            return str(number)

        return retrying(attempt, f"register run {run_id} of {model}")

    # -- deciding (the writes of the gatekeeper's one commit) --------------------------

    def decide(
        self, change: Change, model: str, run: Doc, head: Doc, kept: dict[str, Any],
        version: str | None, promote: bool, by: str, reason: str, canary: int | None = None,
    ) -> None:  # fmt: skip
        """Add to ``change``: keep the decision ``kept`` in the run's document, the verdict
        in the version's, and (``promote``) move the champion to ``version``. ``run`` and
        ``head`` are the documents the decision was made from.

        ``canary`` (a percentage, with a champion to replace): the move is a canary's
        (audit action ``canary``), and the pointer records it (:class:`CanaryState`) in
        the same write. Its ``previous`` is the champion replaced, or, if that champion
        was itself a canary not judged yet, the canary's own ``previous``: the version
        that last served in full keeps the larger share, never an unproven one."""
        now = time.time()
        change.put(run, kept)
        if version is not None:
            decision = kept["decision"]
            change.put(
                self.version_doc(model, version),
                {"verdict": decision["verdict"], "reasons": decision["reasons"],
                 "decided_at": kept["time"]},
            )  # fmt: skip
        if promote and head.get("champion") != version:
            assert version is not None  # noqa: S101 (only a version is promoted)
            current = head.get("champion")
            if canary and current is not None:
                running = canary_of(self.where(model), head.data)
                state = {"version": version,
                         "previous": running.previous if running else str(current),
                         "percent": int(canary), "started_at": now,
                         "generation": int(head.get("generation", 0)) + 1}  # fmt: skip
                self._move(change, model, head, version, "canary", by, reason, now,
                           canary=state)  # fmt: skip
            else:
                self._move(change, model, head, version, "promote", by, reason, now)
        else:  # decided from this pointer: the commit fails if it moved meanwhile
            change.guard(head, now)

    def _move(
        self, change: Change, model: str, head: Doc, to: str, action: str, by: str,
        reason: str, now: float, history: list[str] | None = None,
        canary: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Move the champion pointer to ``to`` (generation + 1) and audit it. Every move
        clears the pointer's canary, unless it starts one (``canary``): a promotion or
        rollback by hand during a canary ends it, and the monitor judges it no more."""
        current = head.get("champion")
        if history is None:  # a promotion: the current champion goes on top of the history
            history = ([current] if current else []) + list(head.get("history", []))
        generation = int(head.get("generation", 0)) + 1
        change.put(head, {"champion": to, "generation": generation, "history": history[:HISTORY],
                          "by": by, "reason": reason, "at": now, "canary": canary,
                          **(extra or {})})  # fmt: skip
        change.put(
            Doc(self.db.doc("registry", model, "audit", f"{time.time_ns():020d}-{action}"), None),
            {"action": action, "from": current, "to": to, "by": by, "reason": reason,
             "at": now, "generation": generation},
        )  # fmt: skip

    # -- operators ---------------------------------------------------------------------

    def promote(
        self, model: str, version: str, expected_generation: int, by: str, reason: str
    ) -> bool:
        """Make ``version`` the champion by hand, only if the pointer is still at
        ``expected_generation`` (compare-and-swap); who and why go to the audit trail.
        Promoting the champion while it is a canary completes the canary by hand: the
        canary is cleared (who and why kept on the pointer), and the pointer does not move
        (no generation, no audit entry: the same version serves, now all traffic)."""
        if self.version(model, version) is None:
            raise RegistryError(f"{model} has no version {version}")

        def attempt() -> bool:
            head = self.head_doc(model)
            if int(head.get("generation", 0)) != expected_generation:
                return False
            if head.get("champion") == str(int(version)):
                if canary_of(self.where(model), head.data) is not None:
                    change = Change()
                    change.put(head, {"canary": None, "by": by, "reason": reason,
                                      "at": time.time()})  # fmt: skip
                    self.db.commit(change)
                return True  # it serves already: nothing moves, nothing goes in the history
            change = Change()
            self._move(change, model, head, str(int(version)), "promote", by, reason,
                       time.time())  # fmt: skip
            self.db.commit(change)
            return True

        return retrying(attempt, f"promote {model} v{version}")

    def rollback(
        self, model: str, expected_generation: int, by: str, reason: str, to: str | None = None
    ) -> str | None:
        """Walk the champion history back: to the previous champion (two rollbacks go two
        steps back), or to ``to``, which must be in the history. The version now served,
        or None if the pointer moved from ``expected_generation`` meanwhile. Raises
        :class:`RegistryError` if there is nothing to go back to."""

        def attempt() -> str | None:
            head = self.head_doc(model)
            if int(head.get("generation", 0)) != expected_generation:
                return None
            target = self.rollback_target(model, head, to)
            history = [str(v) for v in head.get("history", [])]
            change = Change()
            rest = history[history.index(target) + 1 :]
            self._move(change, model, head, target, "rollback", by, reason, time.time(), rest)
            self.db.commit(change)
            return target

        return retrying(attempt, f"roll back {model}")

    def rollback_target(self, model: str, head: Doc, to: str | None) -> str:
        """The version a rollback from ``head`` serves: ``to``, or the previous champion.
        Raises :class:`RegistryError` if it is not an earlier champion."""
        history = [str(v) for v in head.get("history", [])]
        target = str(int(to)) if to is not None and to.isdigit() else to
        if to is None:
            target = history[0] if history else None
        if target is None or target not in history:
            known = ", ".join(f"v{v}" for v in history) or "none"
            raise RegistryError(
                f"{model}: {'v' + target if target else 'no version'} is not an earlier "
                f"champion (history: {known}); `retrain promote` serves any version"
            )
        return target

    # -- audit of what the gatekeeper did not accept -------------------------------------

    def refuse(self, model: str, run_id: str, why: str, report: dict[str, Any]) -> None:
        """Keep a refused report and the reason, for audit (never keyed by its run: a
        forged report must not block the real one)."""
        change = Change()
        name = f"{time.time_ns():020d}"
        change.put(
            Doc(self.db.doc("registry", model, "refused", name), None),
            {"run_id": run_id, "why": why, "report": json.loads(json.dumps(report)),
             "at": time.time()},
        )  # fmt: skip
        self.db.commit(change)

    # -- the canary's end (the writes of Gatekeeper.settle_canary's one commit) -----------

    def settle_canary(
        self, change: Change, model: str, head: Doc, state: CanaryState, run: Doc,
        kept: dict[str, Any], complete: bool, reason: str,
    ) -> None:  # fmt: skip
        """Add to ``change``: the canary Decision ``kept`` in the canary's run document
        (``canary_decision``), its verdict in the version's (``canary_verdict``), and the
        pointer's end of the canary, compare-and-swap against ``head`` as read (its
        generation and its canary): the commit fails if anyone moved the pointer since.

        - Completion clears the canary and leaves the pointer where it is, **generation
          unchanged**: the champion is the same version, now serving all traffic, so a
          run evaluated against it (at the canary's generation) was evaluated against the
          champion that serves, and its report stays valid (no needless requeue). The
          audit trail, which records moves of the pointer, gets no entry; the Decision
          (published, kept in the run) is the record of the completion.
        - A rollback moves the pointer back to ``state.previous`` (audit action
          ``rollback``, by ``canary``; generation + 1, so a run evaluated against the
          canary is found stale), the canary version leaving the history as in any
          rollback.

        Either way the run's id joins the pointer's ``canary_unpublished`` until the
        Decision's message id is kept (:meth:`mark_canary_published`), so that whoever
        calls ``settle_canary`` next finishes a publish that a crash interrupted.
        """
        now = time.time()
        decision = kept["decision"]
        run_id = str(decision["run_id"])
        change.put(run, {"canary_decision": kept})
        change.put(
            self.version_doc(model, state.version),
            {"canary_verdict": decision["verdict"], "canary_reasons": decision["reasons"],
             "canary_decided_at": kept["time"]},
        )  # fmt: skip
        pending = [*(str(r) for r in head.get("canary_unpublished") or []), run_id]
        if complete:
            change.put(head, {"canary": None, "canary_unpublished": pending})
            return
        history = [str(v) for v in head.get("history", [])]
        rest = history[history.index(state.previous) + 1 :] if state.previous in history \
            else history  # fmt: skip
        self._move(change, model, head, state.previous, "rollback", "canary", reason, now,
                   rest, extra={"canary_unpublished": pending})  # fmt: skip

    def canary_decision(self, model: str, run_id: str) -> dict[str, Any] | None:
        """The canary Decision kept for ``run_id``: ``{"decision", "time", "message_id"}``."""
        found = self.run_doc(model, run_id).get("canary_decision")
        return dict(found) if found else None

    def canary_decisions(self, model: str) -> list[dict[str, Any]]:
        """Every canary Decision kept, oldest first."""
        found = self.db.all(self.db.client.collection("registry", model, "runs"))
        kept = [dict(d.data["canary_decision"]) for d in found
                if d.data and d.data.get("canary_decision")]  # fmt: skip
        return sorted(kept, key=lambda v: str(v.get("time", "")))

    def unpublished_canaries(self, model: str) -> list[str]:
        """The runs whose canary Decision is kept but not yet published."""
        return [str(r) for r in self.head_doc(model).get("canary_unpublished") or []]

    def mark_canary_published(self, model: str, run_id: str, message_id: str) -> None:
        """Keep the canary Decision's message id, and take the run off the pointer's
        ``canary_unpublished``: one commit."""

        def attempt() -> None:
            run, head = self.run_doc(model, run_id), self.head_doc(model)
            found = dict(run.get("canary_decision") or {})
            if not found:
                raise RegistryError(f"{self.where(model, 'runs', run_id)} has no canary decision")
            change = Change()
            change.put(run, {"canary_decision": {**found, "message_id": message_id}})
            pending = [str(r) for r in head.get("canary_unpublished") or []]
            if run_id in pending:
                change.put(head, {"canary_unpublished": [r for r in pending if r != run_id]})
            self.db.commit(change)

        retrying(attempt, f"mark the canary decision on {run_id} published")

    def mark_published(self, model: str, run_id: str, message_id: str) -> None:
        def attempt() -> None:
            run = self.run_doc(model, run_id)
            change = Change()
            change.put(run, {"message_id": message_id})
            self.db.commit(change)

        retrying(attempt, f"mark the decision on {run_id} published")

    # -- hooks of the Vertex AI projection (none here) ----------------------------------

    def veto(self, model: str, current: str | None, target: str) -> str | None:
        """Why ``target`` must not replace ``current`` outside this registry, or None."""
        del model, current, target
        return None

    def project(self, model: str) -> None:
        """Bring a projection of the champion (Vertex AI's alias) up to date."""
        del model
