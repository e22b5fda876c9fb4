"""Image classification: MNIST (the paper's column) and scikit-learn's 8x8 digits (the demo), both
with the CNN of :mod:`.model`."""

from . import digits, mnist  # noqa: F401  (registers the tasks)
