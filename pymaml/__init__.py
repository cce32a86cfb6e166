"""pymaml: fused, exact MAML meta-gradients for PyTorch."""

from . import compat, data, distributed, models, nn, reference
from ._extension import build_info
from .algorithms.imaml import IMAML, IMAMLOutput
from .algorithms.maml import MAML, AdaptedModel
from .algorithms.reptile import Reptile, ReptileOutput
from .backends import BackendStatus, MetaOutput, available_backends
from .numerics import functional
from .numerics.hvp import hvp

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "IMAML",
    "IMAMLOutput",
    "Reptile",
    "ReptileOutput",
    "AdaptedModel",
    "BackendStatus",
    "MetaOutput",
    "available_backends",
    "build_info",
    "compat",
    "data",
    "distributed",
    "functional",
    "hvp",
    "models",
    "nn",
    "reference",
]
