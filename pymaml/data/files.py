"""Reading distributed data set files: the shipped class splits, pickles holding only arrays, the
decoded-image caches kept next to the data, and the messages for missing or corrupt files."""

from __future__ import annotations

import codecs
import collections
import importlib
import json
import pickle
import warnings
from importlib import resources
from pathlib import Path

import torch


def published_split(name: str) -> dict:
    """The class splits shipped with the package: pymaml/data/splits/<name>.json."""
    return json.loads(resources.files(__package__).joinpath("splits", f"{name}.json").read_text())


def check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def check_split(dataset: str, split, splits=("train", "val", "test")) -> str:
    if split not in splits:
        raise ValueError(f"unknown {dataset} split {split!r}; use one of {splits}")
    return split


def found_under(root: Path, limit: int = 12) -> str:
    """What `root` holds, in words, for the messages about missing files."""
    if not root.exists():
        return f"{root} does not exist"
    if not root.is_dir():
        return f"{root} is a file, not a folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not entries:
        return f"{root} is empty"
    shown = ", ".join(entries[:limit]) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")
    return f"{root} holds {shown}"


# The numpy globals a pickle of arrays refers to; numpy 2 moved numpy.core to numpy._core, and a pickle
# names whichever the numpy that wrote it had.
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")
_NUMPY_NAMES = {"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers only: the distributed pickles come from
    the web, and a pickle naming any other global could run code when loaded."""

    def find_class(self, module, name):
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
            for place in (module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
                try:
                    return getattr(importlib.import_module(place), name)
                except (ImportError, AttributeError):
                    continue
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("_codecs", "encode"):   # how Python 3 writes bytes in pickle protocols 0-2
            return codecs.encode
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a file of arrays never holds")


def load_array_pickle(path: Path, what: str, encoding: str):
    """The object in the pickle `path` (a file of `what`), or a ValueError naming the file."""
    try:
        with open(path, "rb") as file:
            return _ArrayUnpickler(file, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, UnicodeDecodeError, MemoryError) as error:
        raise ValueError(f"{path} is not a readable {what} pickle ({type(error).__name__}: {error}); the file "
                         f"is corrupt or truncated: download it again") from error


class LabelledImages:
    """What every few-shot data set exposes beside its `images` [N, C, H, W] and `class_names`."""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ImageCache:
    """Decoded images kept in one torch.save file next to the data, valid while `source` (a description
    of the files they were decoded from) and the image size are unchanged."""

    VERSION = 1

    def __init__(self, path: Path, dataset: str, image_size: int, source):
        self.path, self.dataset, self.image_size, self.source = path, dataset, image_size, source

    def read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            cached = torch.load(self.path, weights_only=True)
        except Exception as error:
            warnings.warn(f"{self.dataset}: ignoring the unreadable cache {self.path} ({error}); decoding the "
                          f"images again")
            return None
        if not isinstance(cached, dict) or cached.get("version") != self.VERSION or \
                cached.get("image_size") != self.image_size or cached.get("source") != self.source:
            return None
        return cached

    def write(self, **tensors) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            torch.save({"version": self.VERSION, "image_size": self.image_size, "source": self.source, **tensors},
                       partial)
            partial.replace(self.path)
        except OSError as error:
            warnings.warn(f"{self.dataset}: could not write the cache {self.path} ({error}); the images will be "
                          f"decoded again next time")
