"""Categorical features: their values as category keys, and the float codes models take.

A model's input is one float per feature. A numeric feature is its value; a categorical
feature is the position of its value's *key* in the category list learned from the
training rows and stored in ``metadata.json`` (``categories``). Keys make the same category
match whatever type carried it: a string is its own key; an integral number (``21``,
``21.0``, ``numpy.int64(21)``) is its decimal text (``"21"``, so a CSV column read as
numbers matches a JSON string code); other numbers are their ``repr``; booleans are
``"True"``/``"False"``. Null, NaN and missing values have no key.

A category never seen in training, and a missing value, become NaN: the model treats them
as a missing value (HistGradientBoosting's missing-value branch; all-zero one-hot columns
for the other estimators). Only the :data:`MAX_CATEGORIES` most frequent training categories
get a code; the rarer ones are treated as unseen.

Models with categorical features are fitted on plain arrays (see :func:`as_fitted`).

pandas is not imported here: the prediction server's hot path uses :func:`category_key` and
:func:`codes` only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "MAX_CATEGORIES",
    "as_fitted",
    "categories",
    "category_key",
    "codes",
    "model_input",
    "to_keys",
]

MAX_CATEGORIES = 250
"""Categories kept per feature (HistGradientBoosting's native support allows at most 255)."""


def category_key(value: Any) -> str | None:
    """The key of one categorical value, or None for a missing value (see the module doc)."""
    if hasattr(value, "item") and not isinstance(value, str | int | float):
        value = value.item()  # a numpy scalar
    key: str | None
    if value is None or isinstance(value, str):
        key = None if value is None else str(value)
    elif isinstance(value, bool | int):
        key = str(value)
    elif isinstance(value, float):
        integral = math.isfinite(value) and value.is_integer()
        key = None if math.isnan(value) else str(int(value)) if integral else repr(value)
    else:
        text = str(value)
        key = None if text in ("<NA>", "NaT", "nan") else text
    return key


def to_keys(values: Iterable[Any]) -> list[str | None]:
    """:func:`category_key` of each value."""
    return [category_key(v) for v in values]


def categories(keys: Iterable[str | None]) -> list[str]:
    """The category list learned from training keys: the :data:`MAX_CATEGORIES` most
    frequent (ties by key), sorted by key; missing values are not a category."""
    counts = Counter(k for k in keys if k is not None)
    kept = sorted(counts, key=lambda k: (-counts[k], k))[:MAX_CATEGORIES]
    return sorted(kept)


def codes(known: Sequence[str]) -> dict[str, float]:
    """``{key: code}`` for a stored category list."""
    return {key: float(code) for code, key in enumerate(known)}


def model_input(
    frame: pd.DataFrame, features: Sequence[str], known: Mapping[str, Sequence[str]]
) -> pd.DataFrame:
    """The frame a model is fitted on and scores: ``features`` in order, as float64, with
    each categorical feature (a key of ``known``) replaced by its codes."""
    columns = {}
    for name in features:
        column = frame[name]
        if name in known:
            lookup = codes(known[name])
            mapped = [
                lookup.get(k, math.nan) if k is not None else math.nan
                for k in to_keys(column.tolist())
            ]
            columns[name] = mapped
        else:
            columns[name] = column.astype("float64")
    import pandas as pd  # noqa: PLC0415 (see the module doc)

    return pd.DataFrame(columns, index=frame.index, columns=list(features)).astype("float64")


def as_fitted(estimator: Any, x: pd.DataFrame) -> Any:
    """``x`` as the estimator was fitted: the frame if it was fitted with feature names,
    else its values. Models with categorical features are fitted on values, so that no
    step inside them (HistGradientBoosting's own encoder, the one-hot pipeline) needs a
    frame to predict; the prediction server then passes plain arrays."""
    return x if hasattr(estimator, "feature_names_in_") else x.to_numpy()
