"""Machine translation (the paper's IWSLT / WMT columns): recipes, BPE, Transformer, beam search,
BLEU."""

from . import task  # noqa: F401  (registers the task)
