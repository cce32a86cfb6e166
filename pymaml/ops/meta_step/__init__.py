"""The fused meta-step of a network and its Hessian-vector products: the schema (op.py), the
implementation per device (cpu.py, cuda.py; Triton's in pymaml.kernels), the pure-torch twins
(twin.py) and the network encoding they all take (network.py)."""

from .hvp import hvp
from .network import as_mlp, decode, encode, encode_mlp, network_apply, output_features
from .op import NATIVE_IMPLEMENTATION, FusedImplementation, fused_forward, meta_step, meta_step_from_parts
from .twin import hvp_torch, meta_step_torch

__all__ = ["FusedImplementation", "NATIVE_IMPLEMENTATION", "as_mlp", "decode", "encode", "encode_mlp",
           "fused_forward", "hvp", "hvp_torch", "meta_step", "meta_step_from_parts", "meta_step_torch",
           "network_apply", "output_features"]
