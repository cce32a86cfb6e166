"""The encoding of a network for the fused ops, and the network's pure-torch forward (the twins' model).

An MLP is a network like any other: Linear layers with an activation layer between each two
(encode_mlp); as_mlp recognises that form for the kernels that compute MLPs only (Triton).

`layers` is the input shape of one point [C, H, W] (a vector of n features: [n, 1, 1]) followed by
LAYER_INTS integers per layer: kind, out (Linear's out features, Conv2d's out channels, BatchNorm's
rows of γ and β: 0 or 1 for one, R for pymaml.nn.PerStepBatchNorm2d's per-step rows), kernel,
stride, padding, bias, affine (BatchNorm), activation; `layer_constants` holds one float per layer
(LeakyReLU's negative slope, ELU's alpha, BatchNorm's eps; 0 elsewhere). csrc/bindings.cpp
(decode_network) reads the same encoding; KINDS and ACTIVATIONS are the C++ enums' values
(tests/test_network_encoding.py checks them against the extension's own table).

θ holds the parameters flattened in module order, each layer's as torch stores them: Linear
weight [out, in] then bias; Conv2d weight [out, in, k, k] then bias; BatchNorm weight and bias
(affine only; [R, C] each with R rows, of which the network at inner step s uses row min(s, R − 1)).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ...numerics import decomposed_norms

LAYER_INTS = 8
KINDS = {"linear": 0, "activation": 1, "flatten": 2, "conv2d": 3, "batch_norm": 4, "max_pool": 5, "avg_pool": 6}
ACTIVATIONS = {"none": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "leaky_relu": 4, "elu": 5}
_KIND_NAMES = {value: name for name, value in KINDS.items()}
_ACTIVATION_NAMES = {value: name for name, value in ACTIVATIONS.items()}


@dataclass(frozen=True)
class LayerSpec:
    """One layer of an encoded network."""

    kind: str
    out: int = 0
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    bias: bool = False
    affine: bool = False
    activation: str = "none"
    constant: float = 0.0

    def ints(self) -> list[int]:
        return [KINDS[self.kind], self.out, self.kernel, self.stride, self.padding, int(self.bias), int(self.affine),
                ACTIVATIONS[self.activation]]


def encode(input_shape: tuple[int, int, int], specs: list[LayerSpec]) -> tuple[list[int], list[float]]:
    """(layers, layer_constants) of the network `specs` on points of shape input_shape = (C, H, W)."""
    layers = [int(n) for n in input_shape]
    for spec in specs:
        layers += spec.ints()
    return layers, [float(spec.constant) for spec in specs]


def decode(layers: list[int], layer_constants: list[float]) -> tuple[tuple[int, int, int], list[LayerSpec]]:
    """The inverse of encode."""
    if len(layers) < 3 or (len(layers) - 3) % LAYER_INTS or (len(layers) - 3) // LAYER_INTS != len(layer_constants):
        raise ValueError(f"layers must be [C, H, W] and {LAYER_INTS} integers per layer, with one layer constant "
                         f"per layer; got {len(layers)} integers and {len(layer_constants)} constants")
    specs = []
    for index, constant in enumerate(layer_constants):
        kind, out, kernel, stride, padding, bias, affine, activation = layers[3 + LAYER_INTS * index:
                                                                             3 + LAYER_INTS * (index + 1)]
        specs.append(LayerSpec(_KIND_NAMES[kind], out, kernel, stride, padding, bool(bias), bool(affine),
                               _ACTIVATION_NAMES[activation], float(constant)))
    return (layers[0], layers[1], layers[2]), specs


MLP_ACTIVATIONS = ("none", "relu", "tanh", "sigmoid")


def encode_mlp(widths, activation: str, bias: bool) -> tuple[list[int], list[float]]:
    """(layers, layer_constants) of the MLP of `widths` [n_0, ..., n_L]: Linear layers (all with or
    all without bias) with `activation` between each two and none after the last."""
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths must be at least two positive layer widths, got {list(widths)}")
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"an MLP's activation must be one of {MLP_ACTIVATIONS}, got {activation!r}")
    specs = []
    for index, width in enumerate(widths[1:]):
        if index:
            specs.append(LayerSpec("activation", activation=activation))
        specs.append(LayerSpec("linear", out=int(width), bias=bool(bias)))
    return encode((int(widths[0]), 1, 1), specs)


@lru_cache(maxsize=256)
def _as_mlp(layers: tuple[int, ...], layer_constants: tuple[float, ...]):
    (channels, height, width), specs = decode(list(layers), list(layer_constants))
    linears, activations = specs[0::2], specs[1::2]
    if (height, width) != (1, 1) or not linears or any(spec.kind != "linear" for spec in linears):
        return None
    if any(spec.kind != "activation" or spec.activation not in MLP_ACTIVATIONS for spec in activations):
        return None
    if len(specs) % 2 == 0 or len({spec.bias for spec in linears}) != 1 or len({s.activation for s in activations}) > 1:
        return None
    widths = (channels, *(spec.out for spec in linears))
    return widths, activations[0].activation if activations else "none", linears[0].bias


def as_mlp(layers, layer_constants) -> tuple[list[int], str, bool] | None:
    """(widths, activation, bias) when the encoded network is an MLP (encode_mlp's form), else None."""
    found = _as_mlp(tuple(int(n) for n in layers), tuple(float(c) for c in layer_constants))
    return None if found is None else (list(found[0]), found[1], found[2])


def output_features(layers, layer_constants) -> int:
    """Values per point the encoded network outputs (the classes of cross-entropy)."""
    (channels, height, width), specs = decode(list(layers), list(layer_constants))
    for spec in specs:
        if spec.kind == "linear":
            channels, height, width = spec.out, 1, 1
        elif spec.kind == "conv2d":
            height = (height + 2 * spec.padding - spec.kernel) // spec.stride + 1
            width = (width + 2 * spec.padding - spec.kernel) // spec.stride + 1
            channels = spec.out
        elif spec.kind in ("max_pool", "avg_pool"):
            height, width = height // spec.kernel, width // spec.kernel
        elif spec.kind == "flatten":
            channels, height, width = channels * height * width, 1, 1
    return channels * height * width


def _activate(h: Tensor, spec: LayerSpec) -> Tensor:
    if spec.activation == "relu":
        return torch.relu(h)
    if spec.activation == "tanh":
        return torch.tanh(h)
    if spec.activation == "sigmoid":
        return torch.sigmoid(h)
    if spec.activation == "leaky_relu":
        return F.leaky_relu(h, spec.constant)
    if spec.activation == "elu":
        return F.elu(h, spec.constant)
    return h


def network_apply(theta: Tensor, x: Tensor, layers: list[int], layer_constants: list[float], step: int = 0) -> Tensor:
    """The network on the points x [K, C·H·W] (each point's [C, H, W] in torch's order), with its
    parameters sliced from the flat theta, at inner step `step` (θ_step; it selects a per-step
    BatchNorm's row): the computation the fused kernel performs."""
    (channels, height, width), specs = decode(list(layers), list(layer_constants))
    h = x.reshape(x.shape[0], channels, height, width) if (height, width) != (1, 1) else x.reshape(x.shape[0], -1)
    offset = 0

    def take(*shape):
        nonlocal offset
        count = 1
        for n in shape:
            count *= n
        part = theta[offset:offset + count].view(*shape)
        offset += count
        return part

    for spec in specs:
        if spec.kind == "linear":
            weight = take(spec.out, h.shape[1])
            h = F.linear(h, weight, take(spec.out) if spec.bias else None)
        elif spec.kind == "conv2d":
            if h.dim() == 2:
                h = h.reshape(h.shape[0], h.shape[1], 1, 1)
            weight = take(spec.out, h.shape[1], spec.kernel, spec.kernel)
            h = F.conv2d(h, weight, take(spec.out) if spec.bias else None, stride=spec.stride, padding=spec.padding)
        elif spec.kind == "batch_norm":
            channels, rows = h.shape[1], max(spec.out, 1)
            weight, bias = (take(rows, channels), take(rows, channels)) if spec.affine else (None, None)
            if weight is not None:
                row = min(step, rows - 1)
                weight, bias = weight[row], bias[row]
            # From primitives: torch's own batch_norm has wrong second derivatives under vmap(grad).
            h = decomposed_norms.batch_norm(h, None, None, weight, bias, training=True, eps=spec.constant)
        elif spec.kind in ("max_pool", "avg_pool"):
            if h.dim() == 2:
                h = h.reshape(h.shape[0], h.shape[1], 1, 1)
            pool = F.max_pool2d if spec.kind == "max_pool" else F.avg_pool2d
            h = pool(h, spec.kernel, spec.kernel)
        elif spec.kind == "flatten":
            h = h.flatten(1)
        else:
            h = _activate(h, spec)
    return h.flatten(1) if h.dim() > 2 else h
