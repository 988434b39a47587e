"""Validate and preprocess: input objects in, ordered train and eval Parquet files out.

The names below are imported on first use (components.lazy): building a pipeline does not
pull in pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.lazy import exports

if TYPE_CHECKING:
    from components.preprocess.preprocessing import PreprocessResult, preprocess
    from components.preprocess.validation import Rule, ValidationError

__all__ = ["PreprocessResult", "Rule", "ValidationError", "preprocess"]

__getattr__ = exports(
    __name__,
    {
        "PreprocessResult": "components.preprocess.preprocessing",
        "preprocess": "components.preprocess.preprocessing",
        "Rule": "components.preprocess.validation",
        "ValidationError": "components.preprocess.validation",
    },
)
