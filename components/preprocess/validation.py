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
from components.rules import RuleError
from retrain.config import ModelSettings

__all__ = ["Inputs", "Rule", "ValidationError", "check_split", "read_inputs"]


class Rule(StrEnum):
    """The names of the validation rules, as they appear in error messages."""

    UNREADABLE = "unreadable"
    EMPTY = "empty"
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
    """All input rows, in input order, with columns order column, features, label."""

    frame: pd.DataFrame
    features: tuple[str, ...]
    rows: tuple[tuple[str, int], ...]  # (uri, rows) per input object


def read_inputs(uris: Sequence[str], settings: ModelSettings) -> Inputs:
    """Read, check and concatenate ``uris``; features are cast to float64."""
    if not uris:
        raise ValueError("no input objects given")
    read = [_read(uri, settings) for uri in uris]
    features = (
        tuple(settings.features)
        if settings.features is not None
        else _derive_features(uris[0], read[0], settings)
    )
    frames: list[pd.DataFrame] = []
    for uri, frame in zip(uris, read, strict=True):
        _check_object(uri, frame, settings, features, first=uris[0])
        frames.append(frame[[settings.order_column, *features, settings.label]])
    combined = pd.concat(frames, ignore_index=True)
    _check_combined(uris, combined, settings, features)
    combined[list(features)] = combined[list(features)].astype("float64")
    return Inputs(combined, features, tuple((u, len(f)) for u, f in zip(uris, frames, strict=True)))


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


def _read(uri: str, settings: ModelSettings) -> pd.DataFrame:
    try:
        frame = read_table(uri, settings.format)
    except DataReadError as exc:
        raise ValidationError(uri, [], Rule.UNREADABLE, exc.reason) from exc
    if frame.empty:
        header = "" if len(frame.columns) else " and no header"
        raise ValidationError(uri, [], Rule.EMPTY, f"the object has no rows{header}")
    return frame


def _derive_features(uri: str, frame: pd.DataFrame, settings: ModelSettings) -> tuple[str, ...]:
    reserved = (settings.label, settings.order_column)
    _check_missing(uri, frame, settings, reserved)
    features = tuple(str(c) for c in frame.columns if c not in reserved)
    if not features:
        raise ValidationError(
            uri, [], Rule.MISSING_COLUMN, "no feature columns besides the label and order column"
        )
    return features


def _check_object(
    uri: str, frame: pd.DataFrame, settings: ModelSettings, features: tuple[str, ...], first: str
) -> None:
    label, order = settings.label, settings.order_column
    expected = (order, *features, label)
    _check_missing(uri, frame, settings, expected)
    extra = [str(c) for c in frame.columns if c not in expected]
    if extra:
        why = (
            "not among features, label and order column; list it under features or drop it"
            if settings.features is not None
            else f"not in the first object {first}, from which the features were taken"
        )
        raise ValidationError(uri, extra, Rule.EXTRA_COLUMN, why)
    for column in (label, order):
        nulls = int(frame[column].isna().sum())
        if nulls:
            raise ValidationError(
                uri,
                [column],
                Rule.NULL_VALUES,
                f"{nulls} of {len(frame)} rows are null; the label and the order column "
                "must be set in every row",
            )
    classes = _values(frame[label].unique())
    if len(classes) > 2:
        raise ValidationError(
            uri,
            [label],
            Rule.LABEL_NOT_BINARY,
            f"expected two classes, found {len(classes)}: {_show(classes)}",
        )
    for column in features:
        values = frame[column]
        if not values.isna().all() and not _numeric(values.dtype, allow_bool=True):
            raise ValidationError(
                uri, [column], Rule.NON_NUMERIC, f"a feature must be numeric, not {values.dtype}"
            )
    _check_order_dtype(uri, frame, order)


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
    empty = [c for c in features if frame[c].isna().all()]
    if empty:
        raise ValidationError(
            objects, empty, Rule.ALL_NULL, "every value is null, in every input object"
        )
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
            f"the order column must be numeric or a timestamp, not {dtype}",
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
