"""Validate and preprocess: input objects in, ordered train and eval Parquet files out."""

from components.preprocess.preprocessing import PreprocessResult, preprocess
from components.preprocess.validation import Rule, ValidationError

__all__ = ["PreprocessResult", "Rule", "ValidationError", "preprocess"]
