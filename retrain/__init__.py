"""Event-driven retraining service: the core package (config, messages, CLI, local stack)."""

__version__ = "0.1.0"
