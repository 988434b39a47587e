"""Per-feature reference statistics of the training data, kept for later drift checks.

For PSI, ``bins.edges`` are the distinct deciles of the training values (the first is the
minimum, the last the maximum). Bin ``i`` holds values ``v`` with
``edges[i] <= v < edges[i + 1]``, except that the first bin is open below and the last
is open above: :func:`bin_proportions` applies the same rule to new data. For a KS test,
``sample`` holds up to :data:`SAMPLE_SIZE` non-null values, drawn with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "QUANTILES",
    "SAMPLE_SIZE",
    "bin_proportions",
    "category_proportions",
    "category_reference",
    "feature_reference",
]

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
SAMPLE_SIZE = 1000
_SEED = 0


def feature_reference(values: npt.ArrayLike) -> dict[str, Any]:
    """Statistics of one feature's training values; nulls are counted, then left out."""
    array = np.asarray(values, dtype=np.float64)
    present = array[~np.isnan(array)]
    stats: dict[str, Any] = {"count": int(present.size), "missing": int(array.size - present.size)}
    if not present.size:
        return stats
    edges = np.unique(np.quantile(present, np.linspace(0.0, 1.0, 11)))
    rng = np.random.default_rng(_SEED)
    size = min(SAMPLE_SIZE, present.size)
    sample = np.sort(rng.choice(present, size=size, replace=False))
    return stats | {
        "mean": float(present.mean()),
        "std": float(present.std()),
        "min": float(present.min()),
        "max": float(present.max()),
        "quantiles": {
            f"{q:g}": float(v)
            for q, v in zip(QUANTILES, np.quantile(present, QUANTILES), strict=True)
        },
        "bins": {"edges": edges.tolist(), "proportions": bin_proportions(present, edges)},
        "sample": sample.tolist(),
    }


def bin_proportions(values: npt.ArrayLike, edges: npt.ArrayLike) -> list[float]:
    """Share of non-null ``values`` in each bin defined by ``edges`` (see the module doc)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    bounds = np.asarray(edges, dtype=np.float64)
    bins = max(bounds.size - 1, 1)
    if not array.size:
        return [0.0] * bins
    index = np.digitize(array, bounds[1:-1], right=False)
    counts = np.bincount(index, minlength=bins)
    return [float(share) for share in counts / array.size]


def category_reference(keys: Sequence[str | None], known: Sequence[str]) -> dict[str, Any]:
    """Statistics of one categorical feature's training values, as category keys (see
    components.encoding): the share of each category in ``known``, then of all others
    (rarer than the kept ones), for PSI and a chi-squared test; missing values are counted,
    then left out."""
    present = [k for k in keys if k is not None]
    return {
        "kind": "categorical",
        "count": len(present),
        "missing": len(keys) - len(present),
        "categories": list(known),
        "proportions": category_proportions(present, known),
    }


def category_proportions(keys: Sequence[str | None], known: Sequence[str]) -> list[float]:
    """Share of non-null ``keys`` in each category of ``known``, then of all other keys."""
    index = {key: i for i, key in enumerate(known)}
    other = len(known)
    positions = [index.get(k, other) for k in keys if k is not None]
    if not positions:
        return [0.0] * (other + 1)
    counts = np.bincount(np.asarray(positions, dtype=np.int64), minlength=other + 1)
    return [float(share) for share in counts / len(positions)]
