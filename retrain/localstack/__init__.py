"""The local stack: the whole cloud topology on one machine, from real emulators."""

from retrain.localstack.stack import Part, PartHealth, Stack, StackError, StackRunning

__all__ = ["Part", "PartHealth", "Stack", "StackError", "StackRunning"]
