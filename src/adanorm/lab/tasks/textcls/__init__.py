"""Sentence classification (the paper's RT and SST5 columns) with a Transformer encoder."""

from . import task  # noqa: F401  (registers the task)
