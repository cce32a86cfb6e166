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
