"""Models from the MAML paper."""

from __future__ import annotations

from torch import nn


def mlp(widths: list[int] | tuple[int, ...], activation: type[nn.Module] = nn.ReLU, bias: bool = True) -> nn.Sequential:
    """Linear layers of the given widths with `activation` between them (none after the last)."""
    if len(widths) < 2:
        raise ValueError(f"an MLP needs at least input and output widths, got {widths}")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def sinusoid_mlp() -> nn.Sequential:
    """The paper's sinusoid regressor: 1-40-40-1 with ReLU."""
    return mlp((1, 40, 40, 1), nn.ReLU)


def _conv_block(in_channels: int, out_channels: int, strided: bool) -> list[nn.Module]:
    """3×3 convolution, BatchNorm on batch statistics, ReLU; then stride 2 or a 2×2 max-pool."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=2 if strided else 1, padding=1),
        # MAML normalizes with the statistics of the batch it is given, in training and at test
        # time alike (the paper's code keeps no running averages).
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
    ]
    if not strided:
        layers.append(nn.MaxPool2d(2))
    return layers


class Conv4(nn.Sequential):
    """The paper's convolutional few-shot classifier: 4 × [3×3 conv, BatchNorm, ReLU] and a linear head.

    strided=True is the Omniglot variant (stride-2 convolutions, 64 filters: 28 → 14 → 7 → 4 → 2,
    113,221 parameters for 5 ways); strided=False is the MiniImagenet one (stride 1 and 2×2
    max-pooling; the paper uses hidden=32 there)."""

    def __init__(self, in_channels: int = 1, ways: int = 5, hidden: int = 64, image_size: int = 28,
                 strided: bool = True):
        if min(in_channels, ways, hidden, image_size) < 1:
            raise ValueError(f"Conv4 needs positive in_channels, ways, hidden and image_size, got "
                             f"{in_channels}, {ways}, {hidden}, {image_size}")
        layers: list[nn.Module] = []
        size = image_size
        for block in range(4):
            layers += _conv_block(in_channels if block == 0 else hidden, hidden, strided)
            size = (size + 1) // 2 if strided else size // 2
            if size < 1:
                raise ValueError(f"image_size {image_size} is too small for four blocks that halve it")
        super().__init__(*layers, nn.Flatten(), nn.Linear(hidden * size * size, ways))
        self.in_channels, self.ways, self.image_size = in_channels, ways, image_size


def omniglot_mlp(ways: int = 5, batch_norm: bool = True, image_size: int = 28) -> nn.Sequential:
    """The paper's non-convolutional Omniglot model: flattened image, 256-128-64-64 hidden units,
    each followed by BatchNorm (batch statistics) and ReLU, then a linear layer to `ways`."""
    widths = [image_size * image_size, 256, 128, 64, 64]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(fan_in, fan_out))
        if batch_norm:
            layers.append(nn.BatchNorm1d(fan_out, track_running_stats=False))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(widths[-1], ways))
    return nn.Sequential(*layers)
