"""Language modelling (the paper's enwik8 column; Tiny Shakespeare on CPU): Transformer-XL, BPC."""

from . import task  # noqa: F401  (registers the task)
