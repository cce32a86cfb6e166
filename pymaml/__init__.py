"""pymaml: fused, exact MAML meta-gradients for PyTorch."""

from . import compat, data, distributed, models, nn, reference
from .numerics import functional
from ._extension import build_info
from .numerics.hvp import hvp
from .backends import BackendStatus, MetaOutput, available_backends
from .algorithms.imaml import IMAML, IMAMLOutput
from .algorithms.maml import MAML, AdaptedModel
from .algorithms.reptile import Reptile, ReptileOutput

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
