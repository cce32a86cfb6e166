"""The package laid out by topic keeps its public names: what users import from pymaml, pymaml.data,
pymaml.models, pymaml.nn and pymaml.compat resolves to the objects the topic modules define."""

import importlib

import pytest

import pymaml

PUBLIC = {
    "pymaml": ["MAML", "IMAML", "IMAMLOutput", "Reptile", "ReptileOutput", "AdaptedModel", "BackendStatus",
               "MetaOutput", "available_backends", "build_info", "hvp", "compat", "data", "distributed",
               "functional", "models", "nn", "reference"],
    "pymaml.data": ["Sinusoid", "SinusoidBatch", "FewShot", "FewShotBatch", "Omniglot", "MiniImagenet", "CIFARFS",
                    "FC100"],
    "pymaml.models": ["Conv4", "sinusoid_mlp", "omniglot_mlp"],
    "pymaml.nn": ["PerStepBatchNorm2d", "inner_step"],
    "pymaml.compat.learn2learn": ["MAML", "MetaSGD", "meta_sgd_update", "update_module", "detach_module",
                                  "clone_module", "clone_parameters", "clone_named_parameters"],
    "pymaml.distributed": ["DistributedMAML", "DistributedContext"],
}

# Where each public name is defined now.
HOMES = {
    ("pymaml", "MAML"): "pymaml.algorithms.maml",
    ("pymaml", "IMAML"): "pymaml.algorithms.imaml",
    ("pymaml", "Reptile"): "pymaml.algorithms.reptile",
    ("pymaml", "hvp"): "pymaml.numerics.hvp",
    ("pymaml.data", "Sinusoid"): "pymaml.data.sinusoid",
    ("pymaml.data", "FewShot"): "pymaml.data.fewshot",
    ("pymaml.data", "Omniglot"): "pymaml.data.omniglot",
    ("pymaml.data", "MiniImagenet"): "pymaml.data.miniimagenet",
    ("pymaml.data", "CIFARFS"): "pymaml.data.cifar100",
    ("pymaml.data", "FC100"): "pymaml.data.cifar100",
}


@pytest.mark.parametrize("module,name", [(module, name) for module, names in PUBLIC.items() for name in names])
def test_public_name_importable(module, name):
    assert getattr(importlib.import_module(module), name) is not None


@pytest.mark.parametrize("module,name", sorted(HOMES))
def test_public_name_is_the_topic_modules_object(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(importlib.import_module(HOMES[module, name]), name)


def test_all_lists_only_defined_names():
    for module in ("pymaml", "pymaml.data"):
        imported = importlib.import_module(module)
        missing = [name for name in imported.__all__ if not hasattr(imported, name)]
        assert not missing, f"{module}.__all__ names undefined {missing}"


def test_functional_and_reference_are_the_numerics_modules():
    assert pymaml.functional is importlib.import_module("pymaml.numerics.functional")
    assert pymaml.reference is importlib.import_module("pymaml.reference")


# Each algorithm's arguments, and the name it gives itself in its errors.
ALGORITHM_ARGUMENTS = {
    "MAML": (dict(inner_lr=0.1), "MAML"),
    "IMAML": (dict(inner_lr=0.1, inner_steps=1, reg_lambda=1.0, cg_steps=2), "iMAML"),
    "Reptile": (dict(inner_lr=0.1, inner_steps=1, outer_lr=0.1), "Reptile"),
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_ARGUMENTS))
def test_algorithms_share_one_model_check(algorithm):
    """MAML, IMAML and Reptile refuse a model without trainable parameters with the shared check's message."""
    import torch

    arguments, named = ALGORITHM_ARGUMENTS[algorithm]
    model = torch.nn.Linear(1, 1).requires_grad_(False)
    with pytest.raises(ValueError, match=f"the model has no parameters that require grad; {named} has nothing to adapt"):
        getattr(pymaml, algorithm)(model, **arguments)
