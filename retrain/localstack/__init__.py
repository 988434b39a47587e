"""The local stack: the whole cloud topology on one machine, from real emulators."""

from retrain.localstack.stack import PART_NAMES, Part, PartHealth, Stack, StackError, StackRunning

__all__ = ["PART_NAMES", "Part", "PartHealth", "Stack", "StackError", "StackRunning"]
