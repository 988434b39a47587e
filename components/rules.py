"""The error every component raises for data or a model that breaks one of its rules."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["RuleError"]


class RuleError(ValueError):
    """Names the object (URI or path), the columns involved, and the rule broken."""

    def __init__(self, obj: str, columns: Sequence[str], rule: str, detail: str) -> None:
        self.obj = obj
        self.columns = tuple(columns)
        self.rule = rule
        named = ", ".join(repr(c) for c in self.columns)
        where = f"column{'s' if len(self.columns) > 1 else ''} {named}: " if named else ""
        super().__init__(f"{obj}: {where}rule {rule}: {detail}")
