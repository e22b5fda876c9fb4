"""Dependency parsing (the paper's PTB column): arc-standard transitions and an MLP parser."""

from . import task  # noqa: F401  (registers the task)
