"""Read the input objects of one model and check them against its settings.

Every problem raises :class:`ValidationError`, whose message names the object(s), the
column(s) and the :class:`Rule` that failed. Checks that need all inputs together (an
all-null feature, the label's classes, the size of the splits) name every input object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pandas as pd

from components.dataio import DataReadError, read_table
from components.encoding import to_keys
from components.rules import RuleError
from retrain.config import ModelSettings

__all__ = [
    "Inputs",
    "Rule",
    "ValidationError",
    "check_arrival",
    "check_object",
    "check_size",
    "check_split",
    "read_inputs",
    "read_object",
]


class Rule(StrEnum):
    """The names of the validation rules, as they appear in error messages."""

    UNREADABLE = "unreadable"
    EMPTY = "empty"
    TOO_LARGE = "too_large"
    MISSING_COLUMN = "missing_column"
    EXTRA_COLUMN = "extra_column"
    NON_NUMERIC = "non_numeric"
    NULL_VALUES = "null_values"
    ALL_NULL = "all_null"
    LABEL_NOT_BINARY = "label_not_binary"
    TOO_FEW_ROWS = "too_few_rows"
    SINGLE_CLASS = "single_class"


class ValidationError(RuleError):
    """Input data that breaks a rule; ``obj``, ``columns`` and ``rule`` say where and which."""


@dataclass(frozen=True)
class Inputs:
    """All input rows, in input order, with columns order column, features, label.

    ``skipped`` holds the error of each input object that broke a rule and was left out;
    ``dropped`` the feature columns left out because not every object has them. Numeric
    features are float64; categorical ones hold category keys (see components.encoding)."""

    frame: pd.DataFrame
    features: tuple[str, ...]
    rows: tuple[tuple[str, int], ...]  # (uri, rows) per input object used
    skipped: tuple[ValidationError, ...] = ()
    dropped: tuple[str, ...] = ()
    unlabelled: int = 0
    """Rows left out because their label is null (``validation.unlabelled_rows: drop``)."""


def read_object(uri: str, settings: ModelSettings, data: bytes | None = None) -> pd.DataFrame:
    """One object (or ``data``, its content) as a frame; :class:`ValidationError` if it is
    unreadable or has no rows."""
    try:
        frame = read_table(uri, settings.format, data)
    except DataReadError as exc:
        raise ValidationError(uri, [], Rule.UNREADABLE, exc.reason) from exc
    if frame.empty:
        header = "" if len(frame.columns) else " and no header"
        raise ValidationError(uri, [], Rule.EMPTY, f"the object has no rows{header}")
    return _timestamps(frame, settings.order_column)


def _timestamps(frame: pd.DataFrame, order: str) -> pd.DataFrame:
    """An order column of ISO 8601 text (as CSV gives dates) as timestamps, in UTC if
    any value names its offset; other text is left for the order column's rule."""
    if order not in frame.columns or not pd.api.types.is_string_dtype(frame[order].dtype):
        return frame
    column = frame[order]
    try:
        parsed = pd.to_datetime(column, format="ISO8601")
    except (ValueError, TypeError):
        try:
            parsed = pd.to_datetime(column, format="ISO8601", utc=True)
        except (ValueError, TypeError):
            return frame
    return frame.assign(**{order: parsed})


def check_object(uri: str, frame: pd.DataFrame, settings: ModelSettings) -> tuple[str, ...]:
    """The rules each object must pass on its own, at arrival and in preprocess; return
    its feature columns (``features`` if configured, else all but label, order column and
    ``exclude_columns``). A rule that several columns break names them all."""
    label, order = settings.label, settings.order_column
    reserved = (order, label)
    ignored = set(settings.exclude_columns)
    _check_missing(uri, frame, settings, (*reserved, *(settings.features or ())))
    if settings.features is not None:
        features = tuple(settings.features)
        extra = [str(c) for c in frame.columns if c not in (*reserved, *features, *ignored)]
        if extra:
            why = (
                "not among features, label and order column; list it under features, "
                "or under exclude_columns to ignore it"
            )
            raise ValidationError(uri, extra, Rule.EXTRA_COLUMN, why)
    else:
        features = tuple(str(c) for c in frame.columns if c not in reserved and c not in ignored)
        if not features:
            why = "no feature columns besides the label, the order column and exclude_columns"
            raise ValidationError(uri, [], Rule.MISSING_COLUMN, why)
    _check_set(uri, frame, settings)
    classes = _values(frame[label].unique())
    if len(classes) > 2:
        raise ValidationError(
            uri,
            [label],
            Rule.LABEL_NOT_BINARY,
            f"expected two classes, found {len(classes)}: {_show(classes)}",
        )
    # Column by column, but without a Series per column (the check of every arrival).
    nulls = frame.isna().all()
    empty = [c for c in features if nulls[c]]
    if empty:
        raise ValidationError(uri, empty, Rule.ALL_NULL, "every value is null in this object")
    categorical = set(settings.categorical)
    dtypes = frame.dtypes
    text = [
        c for c in features if c not in categorical and not _numeric(dtypes[c], allow_bool=True)
    ]
    if text:
        kinds = ", ".join(f"{c} is {dtypes[c]}" for c in text)
        raise ValidationError(
            uri,
            text,
            Rule.NON_NUMERIC,
            f"a feature must be numeric ({kinds}); list a feature of categories under "
            "categorical, or a column that is not a feature under exclude_columns",
        )
    _check_order_dtype(uri, frame, order)
    return features


def _check_set(uri: str, frame: pd.DataFrame, settings: ModelSettings) -> None:
    """The order column, and the label unless unlabelled rows may be dropped, in every row."""
    required = [settings.order_column]
    if settings.validation.unlabelled_rows == "reject":
        required.append(settings.label)
    for column in required:
        nulls = int(frame[column].isna().sum())
        if nulls:
            hint = (
                "; set validation.unlabelled_rows: drop to train without them"
                if column == settings.label
                else ""
            )
            raise ValidationError(
                uri,
                [column],
                Rule.NULL_VALUES,
                f"{nulls} of {len(frame)} rows are null; the label and the order column "
                f"must be set in every row{hint}",
            )
    if frame[settings.label].isna().all():
        raise ValidationError(uri, [settings.label], Rule.ALL_NULL, "no row has a label")


def check_size(uri: str, size: int, settings: ModelSettings) -> None:
    """An arriving object's size, before it is read: this bounds the check's memory."""
    limit = settings.validation.max_object_bytes
    if size > limit:
        raise ValidationError(
            uri,
            [],
            Rule.TOO_LARGE,
            f"{size} bytes is over validation.max_object_bytes = {limit}; split it into "
            "smaller objects",
        )


def check_arrival(
    uri: str, data: bytes, settings: ModelSettings
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Every rule of :func:`check_object` on ``data`` (the content of ``uri``), and the
    row count that only an arriving object must reach (``validation.min_object_rows``).
    Return the frame and its features."""
    limits = settings.validation
    frame = read_object(uri, settings, data)
    features = check_object(uri, frame, settings)
    if len(frame) < limits.min_object_rows:
        raise ValidationError(
            uri,
            [],
            Rule.TOO_FEW_ROWS,
            f"{len(frame)} rows is under validation.min_object_rows = {limits.min_object_rows}",
        )
    return frame, features


def read_inputs(uris: Sequence[str], settings: ModelSettings) -> Inputs:
    """Read and check ``uris``, and concatenate the objects that pass; numeric features are
    cast to float64, and rows without a label left out if ``validation.unlabelled_rows`` is
    drop. An object that breaks a rule on its own is left out (``Inputs.skipped``): a
    run is not failed by one bad object among good ones. Without configured features, the
    features are the columns that every object has (in the newest object's order)."""
    if not uris:
        raise ValueError("no input objects given")
    used: list[tuple[str, pd.DataFrame, tuple[str, ...]]] = []
    skipped: list[ValidationError] = []
    for uri in uris:
        try:
            frame = read_object(uri, settings)
            used.append((uri, frame, check_object(uri, frame, settings)))
        except ValidationError as exc:
            skipped.append(exc)
    if not used:
        first = skipped[0]
        if len(skipped) == 1:
            raise first
        raise ValidationError(
            _objects(list(uris)),
            first.columns,
            first.rule,
            f"every input object breaks a rule; the first: {first}",
        ) from first
    shared = set(used[0][2]).intersection(*(set(feats) for _, _, feats in used[1:]))
    features = tuple(c for c in used[-1][2] if c in shared)
    dropped = sorted({c for _, _, feats in used for c in feats} - shared)
    if not features:
        raise ValidationError(
            _objects([uri for uri, _, _ in used]),
            dropped,
            Rule.MISSING_COLUMN,
            "the objects share no feature column",
        )
    label, order = settings.label, settings.order_column
    frames = [frame[[order, *features, label]] for _, frame, _ in used]
    combined = pd.concat([_categories_as_keys(f, settings) for f in frames], ignore_index=True)
    labelled = combined[label].notna()
    unlabelled = int((~labelled).sum())
    combined = combined[labelled].reset_index(drop=True)
    _check_combined([uri for uri, _, _ in used], combined, settings, features)
    numeric = [c for c in features if c not in settings.categorical]
    combined[numeric] = combined[numeric].astype("float64")
    return Inputs(
        combined,
        features,
        tuple((uri, len(frame)) for uri, frame, _ in used),
        tuple(skipped),
        tuple(dropped),
        unlabelled,
    )


def _categories_as_keys(frame: pd.DataFrame, settings: ModelSettings) -> pd.DataFrame:
    """Categorical features as their keys (strings, None for missing): one column type
    across objects whatever each object's reader made of it (see components.encoding)."""
    present = [c for c in settings.categorical if c in frame.columns]
    if not present:
        return frame
    frame = frame.copy()
    for column in present:
        frame[column] = pd.Series(to_keys(frame[column].tolist()), index=frame.index, dtype=object)
    return frame


def check_split(
    uris: Sequence[str], settings: ModelSettings, train: pd.DataFrame, evaluation: pd.DataFrame
) -> None:
    """Each split needs ``evaluation.min_rows`` rows and both classes of the label."""
    objects = _objects(uris)
    minimum = settings.evaluation.min_rows
    if len(train) < minimum or len(evaluation) < minimum:
        requested = settings.training_window.rows
        window = f"training_window.rows = {requested}" if requested else "all rows"
        raise ValidationError(
            objects,
            [settings.order_column],
            Rule.TOO_FEW_ROWS,
            f"the window has {len(train) + len(evaluation)} rows ({window}); "
            f"evaluation.fraction {settings.evaluation.fraction:g} splits them into "
            f"{len(train)} training and {len(evaluation)} evaluation rows, and each split "
            f"needs at least evaluation.min_rows = {minimum}",
        )
    for name, split in (("training", train), ("evaluation", evaluation)):
        classes = _values(split[settings.label].unique())
        if len(classes) < 2:
            raise ValidationError(
                objects,
                [settings.label],
                Rule.SINGLE_CLASS,
                f"the {name} split holds one class only ({_show(classes)}); each split "
                "needs both classes",
            )


def _check_missing(
    uri: str, frame: pd.DataFrame, settings: ModelSettings, expected: Sequence[str]
) -> None:
    missing = [c for c in expected if c not in frame.columns]
    if not missing:
        return
    present = ", ".join(repr(str(c)) for c in frame.columns)
    hint = ""
    unnamed = any(str(c).startswith("Unnamed: ") for c in frame.columns)
    if settings.order_column in missing and unnamed:
        hint = (
            f"; a column has an empty header: name it {settings.order_column!r} "
            "(the order column) before upload"
        )
    raise ValidationError(
        uri, missing, Rule.MISSING_COLUMN, f"not in the object, which has {present}{hint}"
    )


def _check_combined(
    uris: Sequence[str], frame: pd.DataFrame, settings: ModelSettings, features: Sequence[str]
) -> None:
    objects = _objects(uris)
    classes = _values(frame[settings.label].unique())
    if len(classes) != 2:
        raise ValidationError(
            objects,
            [settings.label],
            Rule.LABEL_NOT_BINARY,
            f"expected two classes over all inputs, found {len(classes)}: {_show(classes)}",
        )
    _check_order_dtype(objects, frame, settings.order_column)


def _check_order_dtype(obj: str, frame: pd.DataFrame, order: str) -> None:
    dtype = frame[order].dtype
    if not (_numeric(dtype, allow_bool=False) or pd.api.types.is_datetime64_any_dtype(dtype)):
        raise ValidationError(
            obj,
            [order],
            Rule.NON_NUMERIC,
            f"the order column must be numeric or a timestamp (ISO 8601 text in CSV), not {dtype}",
        )


def _numeric(dtype: Any, *, allow_bool: bool) -> bool:
    if pd.api.types.is_bool_dtype(dtype):
        return allow_bool
    return bool(pd.api.types.is_numeric_dtype(dtype))


def _values(unique: Any) -> list[Any]:
    values: list[Any] = [v for v in unique.tolist() if not pd.isna(v)]
    try:
        return sorted(values)
    except TypeError:
        return values


def _show(values: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"{shown}{more}"


def _objects(uris: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(uris[:limit])
    return f"{shown} and {len(uris) - limit} more" if len(uris) > limit else shown
