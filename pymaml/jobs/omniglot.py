"""The paper's Omniglot few-shot classification job, `pymaml omniglot`: the Omniglot case of
pymaml.jobs.fewshot (`pymaml fewshot --dataset omniglot`), whose docstring gives the protocol.

Finn et al. (2017), section 5.2 and appendix A.1: the convolutional model (pymaml.models.Conv4,
strided, 64 filters), tasks from the 1200 meta-training characters with each 90° rotation a
class of its own, Adam with 1e-3, 60,000 iterations. 5-way: α=0.4, one inner step in training,
meta-batch 32. 20-way: α=0.1, five inner steps, meta-batch 16. Evaluation adapts with three
steps (5-way) or five (20-way) on tasks from the other 423 characters, and reports the mean query
accuracy over 600 tasks with its 95% interval.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fewshot import DEFAULT_ITERATIONS, FewShotConfig, evaluate, make_maml, run, summary, train
from .fewshot import OMNIGLOT_ACCURACY as PAPER_ACCURACY
from .fewshot import OMNIGLOT_ROTATIONS as ROTATIONS
from .fewshot import paper_defaults as _paper_defaults

__all__ = ["DEFAULT_ITERATIONS", "PAPER_ACCURACY", "ROTATIONS", "OmniglotConfig", "evaluate", "make_maml",
           "paper_defaults", "run", "summary", "train"]


@dataclass
class OmniglotConfig(FewShotConfig):
    """A FewShotConfig with dataset="omniglot"."""
    dataset: str = "omniglot"


def paper_defaults(ways: int) -> dict:
    """Step size, inner steps in training and at test, and meta-batch of the paper for `ways`-way Omniglot."""
    defaults = _paper_defaults("omniglot", ways, 1)
    return {name: defaults[name] for name in ("inner_lr", "inner_steps", "test_steps", "meta_batch")}
