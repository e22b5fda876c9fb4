"""Image classification with the paper's small CNN, shared by the MNIST and digits tasks.

The paper says only "a 3-layer CNN" for MNIST and does not say where the norm sits or what it
normalizes (docs/paper.md §3.4, §6).  Our choice, the natural LayerNorm analogue for convolutions:

* three blocks ``conv 3x3 (padding 1) -> norm -> ReLU -> max-pool 2x2``, then one linear layer
  from the flattened last feature map to the classes;
* the norm normalizes **each example over all of (C, H, W)** of its conv output, i.e. it is
  ``make_norm(name, (C, H, W))``.  So LayerNorm has a gain and a bias per (c, h, w) position, as
  ``torch.nn.LayerNorm([C, H, W])`` does, and AdaNorm/DetachNorm/LayerNorm-simple compute
  mean and std over all C*H*W values of an example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

__all__ = ["ConvNet"]


class ConvNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: Sequence[int],
        num_classes: int,
        make_norm: Callable[[tuple[int, ...]], nn.Module],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not channels or any(int(c) <= 0 for c in channels):
            raise ValueError(
                f"model.channels must be a non-empty list of positive ints, got {channels!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout!r}")
        blocks: list[nn.Module] = []
        size, previous = image_size, in_channels
        for width in channels:
            if size < 2:
                raise ValueError(
                    f"model.channels={list(channels)} has too many pooling stages for "
                    f"{image_size}x{image_size} images"
                )
            blocks += [
                nn.Conv2d(previous, int(width), kernel_size=3, padding=1),
                make_norm((int(width), size, size)),  # per example over (C, H, W)
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            size, previous = size // 2, int(width)
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(previous * size * size, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(images).flatten(1)))
