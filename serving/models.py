"""The models the prediction server holds, and what keeps them current.

:class:`ModelStore` loads each model's champion from the
:class:`~retrain.gatekeeper.registry.ModelRegistry` (downloading the artifact folder once
per artifact into a local cache), warms it with one
prediction, and only then swaps it in by replacing a single reference. A request takes that
reference once and finishes on the object it took, so a swap never fails a request.

While the champion is a canary (:class:`~retrain.gatekeeper.registry.CanaryState`), that
reference is a :class:`Serving` holding both the canary and the previous champion, loaded
and warmed, and the canary's share: each request goes to one of them by a hash of its
request id (:func:`share_of`), so one id always meets the same version. Starting a canary,
completing it and rolling it back each swap one :class:`Serving` for another.

:class:`ChampionWatcher` keeps the store current: a streaming pull on the ``model-decisions``
subscription refreshes a model as soon as a decision about it arrives, and a poller refreshes
every model every few seconds as a safety net (and as the only mechanism if the subscription
does not exist).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import operator
import pickle
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import joblib
import numpy as np
import numpy.typing as npt
from sklearn.utils import get_tags

from components.artifacts import METADATA_FILE, MODEL_FILE
from components.encoding import category_key, codes
from retrain.gatekeeper.registry import CanaryState, ModelRegistry, ModelVersion
from retrain.messages import Decision, MessageError, decode
from serving.small_batches import MAX_ROWS, Predictor, small_batch_predictor

__all__ = [
    "ChampionWatcher",
    "Downloader",
    "InstanceError",
    "LoadedModel",
    "ModelLoadError",
    "ModelStore",
    "Serving",
    "load_model",
    "share_of",
]

log = logging.getLogger(__name__)

Downloader = Callable[[str, Path], object]
"""``download(uri, local_dir)``: copy every file under the folder ``uri`` into ``local_dir``."""

THRESHOLD = 0.5  # the same threshold as the evaluation component
# The types a JSON number or null parses to (bool is its own type: True is not a number here).
_NUMBERS = frozenset({float, int})
_NUMBERS_OR_NULL = _NUMBERS | {type(None)}
_FEATURE_NAMES_WARNING = "X does not have valid feature names"
_LOAD_ERRORS = (
    OSError,
    EOFError,
    pickle.UnpicklingError,
    ImportError,
    AttributeError,
    ValueError,
    KeyError,
    TypeError,
)


class ModelLoadError(RuntimeError):
    """A model folder that cannot be downloaded, loaded or warmed; names the version and why."""


class InstanceError(ValueError):
    """A prediction instance that does not fit the model; the message names it and the feature."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One version, loaded and warmed, ready to predict. Never changed after loading."""

    version: ModelVersion
    estimator: Any
    features: tuple[str, ...]
    label: str
    classes: tuple[Any, ...]
    allow_nan: bool
    loaded_at: datetime
    # True only if the estimator needs a DataFrame with the feature names (an estimator whose
    # names could not be dropped at load time); then the hot path pays for pandas.
    needs_frame: bool = False
    # Position of each categorical feature -> {category key: code} (components.encoding).
    lookups: dict[int, dict[str, float]] = field(default_factory=dict)
    # The folder it was loaded from (never replaced once complete), for the predict processes.
    directory: Path | None = None
    # Batches of at most small_batches.MAX_ROWS rows, predicted without scikit-learn's
    # per-call cost (serving.small_batches); None: scikit-learn predicts every batch.
    small: Predictor | None = None
    index: dict[str, int] = field(init=False)

    _getter: Callable[[dict[str, Any]], Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {name: i for i, name in enumerate(self.features)})
        object.__setattr__(self, "_getter", operator.itemgetter(*self.features))

    @property
    def name(self) -> str:
        return self.version.model

    def matrix(self, instances: list[Any]) -> npt.NDArray[np.float64]:
        """One float array from ``instances`` (lists in feature order, or objects by name).

        Raises :class:`InstanceError` naming the instance and the feature.

        The usual request (all lists of the right length, or all objects with exactly the
        model's features; only numbers, and nulls where the estimator accepts them) becomes
        an array without per-value Python work: the values are flattened and their types
        checked as a set, then numpy converts them in one call. Anything else, and every
        model with categorical features, takes the checked path, value by value, which
        names the first bad instance and feature.
        """
        if not self.lookups:
            fast = self._fast_matrix(instances)
            if fast is not None:
                return fast
        return self._checked_matrix(instances)

    def _fast_matrix(self, instances: list[Any]) -> npt.NDArray[np.float64] | None:
        """The matrix, or None if anything needs the checked path (which finds the error)."""
        rows = self._rows(instances)
        if rows is None or set(map(len, rows)) != {len(self.features)}:
            return None
        flat = list(itertools.chain.from_iterable(rows))
        if not set(map(type, flat)) <= (_NUMBERS_OR_NULL if self.allow_nan else _NUMBERS):
            return None
        try:
            x = np.array(flat, dtype=np.float64)  # None (if allowed) becomes NaN
        except OverflowError:
            return None  # an integer beyond float64: the checked path says which
        if np.isinf(x).any():
            return None  # 1e999 parses to inf: the checked path names it
        return x.reshape(len(instances), len(self.features))

    def _rows(self, instances: list[Any]) -> list[Any] | None:
        """Each instance's values in feature order, if all are lists or all objects with
        exactly the model's features; else None."""
        kinds = set(map(type, instances))
        if kinds == {list}:
            return instances
        width = len(self.features)
        if kinds != {dict} or set(map(len, instances)) != {width}:
            return None
        try:
            # With as many keys as features and every feature present, no key is unknown.
            rows = list(map(self._getter, instances))
        except KeyError:
            return None
        return [[value] for value in rows] if width == 1 else rows

    def _checked_matrix(self, instances: list[Any]) -> npt.NDArray[np.float64]:
        width = len(self.features)
        flat: list[float] = []
        append = flat.append
        lookups = self.lookups
        for i, instance in enumerate(instances):
            if isinstance(instance, list):
                if len(instance) != width:
                    raise InstanceError(
                        f"instances[{i}]: expected {width} feature values "
                        f"({', '.join(self.features)}), got {len(instance)}"
                    )
                values = instance
            elif isinstance(instance, dict):
                values = self._by_name(instance, i)
            else:
                raise InstanceError(
                    f"instances[{i}]: expected a list of {width} numbers in feature order or "
                    f"an object keyed by feature name, got {_kind(instance)}"
                )
            for j, value in enumerate(values):
                if lookups and j in lookups:
                    append(self._category(value, i, j))
                else:
                    append(self._number(value, i, self.features[j]))
        return np.array(flat, dtype=np.float64).reshape(len(instances), width)

    def _by_name(self, instance: dict[str, Any], i: int) -> list[Any]:
        unknown = [k for k in instance if k not in self.index]
        if unknown:
            raise InstanceError(
                f"instances[{i}]: unknown feature {unknown[0]!r}; "
                f"the model's features are {', '.join(self.features)}"
            )
        missing = [f for f in self.features if f not in instance]
        if missing:
            raise InstanceError(
                f"instances[{i}]: missing feature {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return [instance[name] for name in self.features]

    def _category(self, value: Any, i: int, j: int) -> float:
        if isinstance(value, list | dict):
            raise InstanceError(
                f"instances[{i}], feature {self.features[j]!r}: expected a category (a string "
                f"or a number), got {_kind(value)}"
            )
        # A category never seen in training, or a missing one: NaN, which the model
        # treats as a missing value (see components.encoding).
        key = category_key(value)
        return math.nan if key is None else self.lookups[j].get(key, math.nan)

    def _number(self, value: Any, i: int, feature: str) -> float:
        kind = type(value)
        if kind is float:
            if math.isfinite(value):
                return float(value)
            raise InstanceError(f"instances[{i}], feature {feature!r}: {value} is not finite")
        if kind is int:
            try:
                return float(value)
            except OverflowError:
                raise InstanceError(
                    f"instances[{i}], feature {feature!r}: {value} is too large"
                ) from None
        if value is None:
            if self.allow_nan:
                return math.nan
            raise InstanceError(
                f"instances[{i}], feature {feature!r}: null (a missing value) is not accepted "
                f"by {type(self.estimator).__name__}"
            )
        raise InstanceError(
            f"instances[{i}], feature {feature!r}: expected a number, got {_kind(value)}"
        )

    def predict(self, x: npt.NDArray[np.float64]) -> list[dict[str, Any]]:
        """``[{"label": predicted class, "probability": P(positive class)}, ...]``."""
        return self.predictions(self.probabilities(x))

    def predictions(self, proba: npt.NDArray[np.float64]) -> list[dict[str, Any]]:
        """The response rows for :meth:`probabilities`' result (Vertex AI's shape)."""
        labels = (self.classes[0], self.classes[1])
        return [{"label": labels[p >= THRESHOLD], "probability": p} for p in proba.tolist()]

    def probabilities(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """P(positive class) for each row of ``x``."""
        if self.small is not None and len(x) <= MAX_ROWS:
            return self.small(x)
        data: Any = x
        if self.needs_frame:
            import pandas as pd  # noqa: PLC0415 (only for estimators that insist on names)

            data = pd.DataFrame(x, columns=list(self.features))
        result: npt.NDArray[np.float64] = self.estimator.predict_proba(data)[:, 1]
        return result


def _kind(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    names = {str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
    return f"{names.get(type(value), type(value).__name__)} {text}"


def load_model(
    version: ModelVersion, directory: Path, *, small_batches: bool = True
) -> LoadedModel:
    """Load ``model.joblib`` and ``metadata.json`` from ``directory`` and warm the estimator;
    with ``small_batches``, also its treelite import for small batches where it answers as
    the estimator does (:mod:`serving.small_batches`).

    If the estimator remembers the DataFrame column names it was fitted on, and they are the
    metadata's features in order, the names are dropped here, once, so that the hot path can
    pass a plain array without sklearn's "does not have valid feature names" warning.
    """
    where = f"{version.model} version {version.version} ({version.artifact_uri})"
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
        features = tuple(str(f) for f in metadata["features"])
        label = str(metadata["label"])
        known: dict[str, list[str]] = dict(metadata.get("categories") or {})
        estimator = joblib.load(directory / MODEL_FILE)
        classes = tuple(estimator.classes_.tolist())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{where}: not a model folder: {exc.filename} is missing") from exc
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"{where}: cannot load: {exc!r}") from exc
    if len(classes) != 2:
        raise ModelLoadError(f"{where}: expected a binary classifier, found classes {classes}")
    if not features:
        raise ModelLoadError(f"{where}: metadata.json lists no features")
    fitted_names = vars(estimator).get("feature_names_in_")
    if fitted_names is not None:
        if tuple(str(n) for n in fitted_names) != features:
            raise ModelLoadError(
                f"{where}: the estimator was fitted on columns {list(fitted_names)}, "
                f"but metadata.json lists {list(features)}"
            )
        del estimator.feature_names_in_  # a private copy: loaded from disk just now
    allow_nan = _allows_nan(estimator)
    model = LoadedModel(
        version=version,
        estimator=estimator,
        features=features,
        label=label,
        classes=classes,
        allow_nan=allow_nan,
        loaded_at=datetime.now(UTC),
        lookups={j: codes(known[name]) for j, name in enumerate(features) if name in known},
        directory=directory,
    )
    model = _warm(model, where)
    if model.needs_frame or not small_batches:
        return model
    return replace(model, small=small_batch_predictor(estimator, len(features), allow_nan))


def _allows_nan(estimator: Any) -> bool:
    """Whether the estimator accepts missing values (sklearn's tags; False if it has none)."""
    steps = getattr(estimator, "steps", None)  # a pipeline: its classifier decides
    if steps:
        estimator = steps[-1][1]
    try:
        return bool(get_tags(estimator).input_tags.allow_nan)
    except AttributeError:
        return False


def _warm(model: LoadedModel, where: str) -> LoadedModel:
    """One prediction on a row of zeros; switch to DataFrames if the estimator wants names."""
    zeros = np.zeros((1, len(model.features)), dtype=np.float64)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            proba = model.estimator.predict_proba(zeros)
    except Exception as exc:
        raise ModelLoadError(f"{where}: the warm-up prediction failed: {exc!r}") from exc
    if np.shape(proba) != (1, 2):
        raise ModelLoadError(f"{where}: predict_proba returned shape {np.shape(proba)}")
    if any(_FEATURE_NAMES_WARNING in str(w.message) for w in caught):
        model = replace(model, needs_frame=True)
        model.predict(zeros)
    return model


def share_of(request_id: str) -> int:
    """The request id's place in the traffic, 0-99: the same in every process and run
    (a hash of the id, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100


@dataclass(frozen=True, eq=False)
class Serving:
    """What answers a model's endpoint: the champion, and during a canary the version before
    it. Never changed: the store swaps a new one in, and a request takes it once.

    ``percent``: the champion's share of the traffic (100 without a canary); ``previous``
    answers the rest.
    """

    champion: LoadedModel
    previous: LoadedModel | None = None
    percent: int = 100
    canary: CanaryState | None = None

    def route(self, request_id: str) -> LoadedModel:
        """The version that answers ``request_id``: always the same one for one id."""
        if self.previous is None:
            return self.champion
        return self.champion if share_of(request_id) < self.percent else self.previous

    def split(self) -> dict[str, int]:
        """``{version: percent of the traffic}``, the champion first."""
        if self.previous is None:
            return {self.champion.version.version: 100}
        return {
            self.champion.version.version: self.percent,
            self.previous.version.version: 100 - self.percent,
        }

    def loaded(self) -> tuple[LoadedModel, ...]:
        """The versions in memory for it, the champion first."""
        return (self.champion,) if self.previous is None else (self.champion, self.previous)


class ModelStore:
    """What serves each model (:class:`Serving`), swapped atomically; and a few pinned versions.

    ``models`` are the names to serve (e.g. ``settings.models``); ``download(uri, dir)`` copies
    an artifact folder (e.g. :func:`retrain.blobstore.download_dir`); ``cache_dir`` keeps one
    folder per downloaded version, reused across refreshes and restarts.
    """

    def __init__(
        self,
        models: Iterable[str],
        registry: ModelRegistry,
        download: Downloader,
        cache_dir: Path,
        *,
        pinned_capacity: int = 4,
    ) -> None:
        self.models: tuple[str, ...] = tuple(models)
        self.registry = registry
        self.download = download
        self.cache_dir = cache_dir
        self.pinned_capacity = pinned_capacity
        self._serving: dict[str, Serving] = {}
        self._pinned: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._pinned_lock = threading.Lock()
        # One load at a time per model: the subscriber and the poller may refresh together.
        self._locks = {name: threading.Lock() for name in self.models}
        self._download_lock = threading.Lock()

    def __contains__(self, model: object) -> bool:
        return model in self._locks

    def serving(self, model: str) -> Serving | None:
        """What serves ``model`` now (no I/O): take it once per request."""
        return self._serving.get(model)

    def current(self, model: str) -> LoadedModel | None:
        """The champion being served now (no I/O)."""
        state = self._serving.get(model)
        return None if state is None else state.champion

    def versions(self) -> dict[str, str | None]:
        """``{model: champion version served, or None}``."""
        out: dict[str, str | None] = {}
        for name in self.models:
            state = self._serving.get(name)
            out[name] = state.champion.version.version if state else None
        return out

    def refresh(self, model: str) -> bool:
        """Re-read the champion pointer (and its canary); load and warm what is new, then
        swap in the new :class:`Serving` as one reference. True if swapped.

        If the registry has no champion, what is served (if any) stays. Raises
        :class:`ModelLoadError` (what was served stays) or the registry's own errors.
        """
        if model not in self._locks:
            raise KeyError(f"{model!r} is not a model this server serves")
        with self._locks[model]:
            champion, canary = self._pointer(model)
            if champion is None:
                return False
            served = self._serving.get(model)
            if (
                served is not None
                and _same(served.champion.version, champion)
                and (_canary_key(served.canary) == _canary_key(canary))
            ):
                return False
            previous_version = None
            if canary is not None:
                previous_version = self.registry.version(model, canary.previous)
                if previous_version is None:
                    raise ModelLoadError(
                        f"{model}: the canary of version {canary.version} names version "
                        f"{canary.previous} as the previous champion, which does not exist"
                    )
            state = Serving(
                champion=self._reuse_or_load(served, champion),
                previous=None
                if previous_version is None
                else self._reuse_or_load(served, previous_version),
                percent=100 if canary is None else canary.percent,
                canary=canary,
            )
            self._serving[model] = state  # the swap: one reference replaced
        log.info(
            "serving %s: %s (was %s)",
            model,
            _describe(state.split()),
            _describe(served.split()) if served else "nothing",
        )
        return True

    def _pointer(self, model: str) -> tuple[ModelVersion | None, CanaryState | None]:
        """The champion and its canary, read consistently: the canary is the champion's at
        the generation read (two reads of a pointer that may move between them)."""
        for _ in range(5):
            champion = self.registry.champion(model)
            if champion is None:
                return None, None
            canary = self.registry.canary(model)
            if canary is None or (
                canary.version == champion.version
                and champion.generation in (None, canary.generation)
            ):
                return champion, canary
        raise ModelLoadError(f"{model}: the champion pointer kept moving while it was read")

    def _reuse_or_load(self, served: Serving | None, version: ModelVersion) -> LoadedModel:
        """``version`` loaded: the one in memory already (served or pinned), or loaded now."""
        for loaded in served.loaded() if served else ():
            if _same(loaded.version, version):
                return loaded
        pinned = self._pinned_get(version.model, version.version)
        if pinned is not None and _same(pinned.version, version):
            return pinned
        return self._load(version)

    def refresh_all(self) -> dict[str, bool]:
        """Refresh every model; a model that fails is logged and skipped."""
        swapped = {}
        for name in self.models:
            try:
                swapped[name] = self.refresh(name)
            except Exception:
                log.exception("could not refresh %s; still serving what it served", name)
                swapped[name] = False
        return swapped

    def cached_pinned(self, model: str, version: str) -> LoadedModel | None:
        """A version already in memory (served or pinned), without I/O."""
        state = self._serving.get(model)
        for loaded in state.loaded() if state else ():
            if loaded.version.version == version:
                return loaded
        return self._pinned_get(model, version)

    def pinned(self, model: str, version: str) -> LoadedModel | None:
        """One specific version (loaded on first use, kept in a small LRU), or None if unknown."""
        if model not in self._locks:
            return None
        found = self.cached_pinned(model, version)
        if found is not None:
            return found
        record = self.registry.version(model, version)
        if record is None:
            return None
        loaded = self._load(record)
        with self._pinned_lock:
            self._pinned[(model, version)] = loaded
            self._pinned.move_to_end((model, version))
            while len(self._pinned) > self.pinned_capacity:
                self._pinned.popitem(last=False)
        return loaded

    def _pinned_get(self, model: str, version: str) -> LoadedModel | None:
        with self._pinned_lock:
            found = self._pinned.get((model, version))
            if found is not None:
                self._pinned.move_to_end((model, version))
            return found

    def _load(self, version: ModelVersion) -> LoadedModel:
        return load_model(version, self._local_folder(version))

    def _local_folder(self, version: ModelVersion) -> Path:
        """The version's folder in the cache, downloaded once (into a temp dir, then renamed).
        Keyed by the artifact, not the version number: a folder is never another model's.

        Worker processes share the cache: a folder appears whole (a rename), is never
        replaced once complete (another worker may be loading from it), and a worker that
        downloaded it too keeps the first one."""
        digest = hashlib.sha256(version.artifact_uri.encode()).hexdigest()[:24]
        target = self.cache_dir / quote(version.model, safe="") / digest
        with self._download_lock:
            if _complete(target):
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
            try:
                self.download(version.artifact_uri, partial)
            except Exception as exc:
                shutil.rmtree(partial, ignore_errors=True)
                raise ModelLoadError(
                    f"{version.model} version {version.version}: cannot download "
                    f"{version.artifact_uri}: {exc}"
                ) from exc
            if target.exists() and not _complete(target):  # not ours: set it aside whole
                aside = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
                with contextlib.suppress(OSError):  # (another worker set it aside first)
                    target.rename(aside / "folder")
                shutil.rmtree(aside, ignore_errors=True)
            try:
                partial.rename(target)
            except OSError:  # another worker's download was renamed first: keep that one
                shutil.rmtree(partial, ignore_errors=True)
                if not _complete(target):
                    raise ModelLoadError(
                        f"{version.model} version {version.version}: the cache folder "
                        f"{target} is incomplete"
                    ) from None
            return target


def _complete(folder: Path) -> bool:
    return (folder / MODEL_FILE).exists() and (folder / METADATA_FILE).exists()


class ChampionWatcher:
    """Background threads that keep a :class:`ModelStore` current; ``start()`` / ``stop()``.

    - a streaming pull on ``subscription`` (a pull subscription on ``model-decisions``): any
      decision about a served model refreshes it, then the message is acked;
    - a poller that refreshes every model every ``poll_seconds`` (None: no poller).

    If the subscription does not exist or Pub/Sub cannot be reached, one warning is logged
    and the poller alone keeps the store current.

    ``template``: the subscription to copy if ``subscription`` does not exist. Each worker
    process of a server needs its own subscription (on one shared subscription, Pub/Sub
    hands each decision to one worker only), so a worker listens on ``<template>-<slot>``,
    made on the template's topic when missing. A subscription just made holds only what is
    published after it, so the store is refreshed once more right after it is made.
    """

    def __init__(
        self,
        store: ModelStore,
        project: str,
        subscription: str | None,
        *,
        poll_seconds: float | None = 5.0,
        subscriber_factory: Callable[[], Any] | None = None,
        template: str | None = None,
    ) -> None:
        self.store = store
        self.project = project
        self.subscription = subscription
        self.template = template
        self.poll_seconds = poll_seconds
        self._subscriber_factory = subscriber_factory
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._future: Any = None
        self._subscriber: Any = None
        self._lock = threading.Lock()
        self.listening = threading.Event()  # set once the streaming pull has started

    def start(self) -> None:
        if self.subscription:
            self._spawn("champion-watcher-pubsub", self._listen)
        if self.poll_seconds is not None:
            self._spawn("champion-watcher-poll", self._poll)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            future = self._future
        if future is not None:
            future.cancel()
        for thread in self._threads:
            thread.join(timeout)

    def running(self) -> bool:
        """Whether any of its threads is still alive."""
        return any(thread.is_alive() for thread in self._threads)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll(self) -> None:
        assert self.poll_seconds is not None  # noqa: S101 (only started with a period)
        while not self._stop.wait(self.poll_seconds):
            self.store.refresh_all()

    def on_message(self, message: Any) -> None:
        """Refresh the model a decision names, then ack; a message we cannot read is acked."""
        try:
            decision = decode(Decision, message.data)
        except MessageError as exc:
            log.warning("ignoring a message on %s: %s", self.subscription, exc)
            message.ack()
            return
        if decision.model not in self.store:
            message.ack()
            return
        try:
            self.store.refresh(decision.model)
        except Exception:
            log.exception(
                "decision %s for %s (run %s): refresh failed; the poller will retry",
                decision.verdict,
                decision.model,
                decision.run_id,
            )
        message.ack()

    def _listen(self) -> None:
        from google.api_core.exceptions import GoogleAPICallError, NotFound  # noqa: PLC0415
        from google.auth.exceptions import GoogleAuthError  # noqa: PLC0415

        try:
            subscriber = self._make_subscriber()
            path = subscriber.subscription_path(self.project, self.subscription)
            try:
                subscriber.get_subscription(subscription=path, timeout=10)
            except NotFound:
                if self.template is None:
                    raise
                self._copy_template(subscriber, path)
        except NotFound:
            log.warning(
                "subscription %s does not exist; refreshing models by polling every %ss only",
                self.subscription,
                self.poll_seconds,
            )
            return
        except (GoogleAPICallError, GoogleAuthError, OSError) as exc:
            log.warning(
                "cannot reach Pub/Sub for %s (%s); refreshing models by polling only",
                self.subscription,
                exc,
            )
            return
        with self._lock:
            if self._stop.is_set():
                subscriber.close()
                return
            self._subscriber = subscriber
            self._future = subscriber.subscribe(path, callback=self.on_message)
        self.listening.set()
        try:
            self._future.result()
        except CancelledError:
            pass  # stop() cancelled it
        except Exception:
            log.exception("the streaming pull on %s failed; polling only from now on", path)
        finally:
            subscriber.close()

    def _copy_template(self, subscriber: Any, path: str) -> None:
        """Make ``path`` on the template's topic (NotFound if the template is missing too),
        then refresh every model: decisions from before it existed are not in it."""
        from google.api_core.exceptions import AlreadyExists  # noqa: PLC0415

        template = subscriber.get_subscription(
            subscription=subscriber.subscription_path(self.project, self.template), timeout=10
        )
        try:
            subscriber.create_subscription(
                name=path,
                topic=template.topic,
                ack_deadline_seconds=template.ack_deadline_seconds,
                timeout=10,
            )
            log.info("made subscription %s on %s, like %s", path, template.topic, self.template)
        except AlreadyExists:
            pass  # another process with the same slot made it first: the same subscription
        self.store.refresh_all()

    def _make_subscriber(self) -> Any:
        if self._subscriber_factory is not None:
            return self._subscriber_factory()
        from google.cloud import pubsub_v1  # noqa: PLC0415 (PUBSUB_EMULATOR_HOST is honoured)

        return pubsub_v1.SubscriberClient()


def _canary_key(canary: CanaryState | None) -> tuple[str, str, int] | None:
    return None if canary is None else (canary.version, canary.previous, canary.percent)


def _describe(split: dict[str, int]) -> str:
    return ", ".join(f"version {v} at {p}%" for v, p in split.items())


def _same(one: ModelVersion, other: ModelVersion) -> bool:
    """The same version of the same artifact (a number alone may be reused by a new
    registry; an artifact alone may be registered twice)."""
    return (one.version, one.artifact_uri) == (other.version, other.artifact_uri)
