"""Task families: the sinusoid regression, the few-shot sampler and the image sets it draws from
(Omniglot, MiniImagenet, CIFAR-FS and FC100), one module each."""

from .cifar100 import CIFARFS, FC100
from .fewshot import FewShot, FewShotBatch
from .miniimagenet import MiniImagenet
from .omniglot import Omniglot
from .sinusoid import Sinusoid, SinusoidBatch

__all__ = ["CIFARFS", "FC100", "FewShot", "FewShotBatch", "MiniImagenet", "Omniglot", "Sinusoid", "SinusoidBatch"]
