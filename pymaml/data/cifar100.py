"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of the CIFAR-100
classes, read from the CIFAR-100 python archive."""

from __future__ import annotations

from pathlib import Path

import torch

from .files import LabelledImages, check_split, found_under, load_array_pickle, published_split

ARCHIVE_FOLDER = "cifar-100-python"
ARCHIVE_FILES = ("train", "test", "meta")


class _CIFAR100Split(LabelledImages):
    """The images of some CIFAR-100 fine classes, the archive's train and test files pooled.

    root/cifar-100-python/{train,test,meta} are the pickles of the CIFAR-100 python version
    (cifar-100-python.tar.gz from Alex Krizhevsky's CIFAR page at the University of Toronto, unpacked
    in root; torchvision's CIFAR100(root, download=True) leaves the same folder): train and test are
    dicts with b"data" uint8 [N, 3072] (each row the 32×32 red, then green, then blue plane, row by
    row), b"fine_labels" and b"coarse_labels" [N]; meta holds b"fine_label_names" (100) and
    b"coarse_label_names" (20). The archive is checked against CIFAR-100's class names, its superclass
    hierarchy and its IMAGES_PER_CLASS images per class in each file.

    The pixel arrays are stored as they are, so nothing is decoded and no cache is kept.
    """

    DATASET = "CIFAR-100"
    SPLITS = ("train", "val", "test")
    IMAGES_PER_CLASS = {"train": 500, "test": 100}

    def __init__(self, root, split: str):
        self.split = check_split(self.DATASET, split, self.SPLITS)
        self.root = Path(root)
        hierarchy = published_split("fc100")["superclasses"]
        self.superclass_of = {fine: coarse for coarse, fines in hierarchy.items() for fine in fines}
        self.fine_names = sorted(self.superclass_of)
        self.coarse_names = sorted(hierarchy)
        self.class_names = self._split_classes()
        images, fine_labels = self._read_archive()
        position = torch.full((len(self.fine_names),), -1, dtype=torch.int64)
        position[[self.fine_names.index(name) for name in self.class_names]] = torch.arange(len(self.class_names))
        mapped = position[fine_labels]
        # stable sort by label: within a class, the train file's images in file order, then the test file's.
        order = torch.argsort(torch.where(mapped < 0, len(self.class_names), mapped), stable=True)
        order = order[: int((mapped >= 0).sum())]
        self.images = images.index_select(0, order).contiguous()
        self.labels = mapped[order]

    def _split_classes(self) -> list[str]:
        raise NotImplementedError

    @property
    def archive(self) -> Path:
        return self.root / ARCHIVE_FOLDER

    def _missing_message(self, missing) -> str:
        tarball = self.root / "cifar-100-python.tar.gz"
        hint = f" ({tarball.name} is there: unpack it in place)" if tarball.is_file() else ""
        found = found_under(self.root)
        if self.archive.is_dir():
            found += f"; {found_under(self.archive)}"
        return (f"{self.DATASET} data not found: {', '.join(missing)} missing{hint}. {type(self).__name__} reads "
                f"the CIFAR-100 python version (cifar-100-python.tar.gz from Alex Krizhevsky's CIFAR page at the "
                f"University of Toronto, as torchvision's CIFAR100 downloads it) unpacked in {self.root}, giving\n"
                f"  {self.archive}/train, {self.archive}/test, {self.archive}/meta\nFound: {found}")

    def _read_archive(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images [60000, 3, 32, 32] uint8 (train file, then test file) and their fine labels."""
        missing = [f"{ARCHIVE_FOLDER}/{name}" for name in ARCHIVE_FILES if not (self.archive / name).is_file()]
        if missing:
            raise FileNotFoundError(self._missing_message(missing))
        self._check_meta(self._read_pickle("meta"))
        images, fine = [], []
        for part in ("train", "test"):
            pixels, labels = self._check_part(part, self._read_pickle(part))
            images.append(pixels)
            fine.append(labels)
        return torch.cat(images), torch.cat(fine)

    def _read_pickle(self, name: str) -> dict:
        path = self.archive / name
        content = load_array_pickle(path, "CIFAR-100", encoding="bytes")
        if not isinstance(content, dict):
            raise ValueError(f"{path} holds a {type(content).__name__}, not the dict of a CIFAR-100 file")
        return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}

    @staticmethod
    def _names(values) -> list:
        return [value.decode("latin1") if isinstance(value, bytes) else value for value in values]

    def _check_meta(self, meta: dict) -> None:
        path = self.archive / "meta"
        for key, expected in (("fine_label_names", self.fine_names), ("coarse_label_names", self.coarse_names)):
            if key not in meta:
                raise ValueError(f"{path} has no {key} (it holds {sorted(meta)}); not the CIFAR-100 meta file")
            if not isinstance(meta[key], (list, tuple)):
                raise ValueError(f"{path}: {key} is a {type(meta[key]).__name__}, not a list of names")
            names = self._names(meta[key])
            if names != expected:
                differing = next(i for i in range(max(len(names), len(expected)))
                                 if i >= min(len(names), len(expected)) or names[i] != expected[i])
                found = repr(names[differing]) if differing < len(names) else "missing"
                raise ValueError(f"{path}: {key} are not CIFAR-100's {len(expected)} names in their order "
                                 f"({len(names)} names; entry {differing} is {found}, CIFAR-100's is "
                                 f"{expected[differing]!r})" if differing < len(expected) else
                                 f"{path}: {key} has {len(names)} names, CIFAR-100 has {len(expected)}")

    def _check_part(self, part: str, content: dict) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy

        path = self.archive / part
        absent = [key for key in ("data", "fine_labels", "coarse_labels") if key not in content]
        if absent:
            raise ValueError(f"{path} has no {', '.join(absent)} (it holds {sorted(content)}); not a CIFAR-100 "
                             f"{part} file")
        data = content["data"]
        if not isinstance(data, numpy.ndarray) or data.dtype != numpy.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} {list(data.shape)}" if isinstance(data, numpy.ndarray) else type(data).__name__
            raise ValueError(f"{path}: data is {found}, not uint8 [N, 3072] (32×32 pixels, 3 colour planes)")
        labels = {}
        for key, classes in (("fine_labels", len(self.fine_names)), ("coarse_labels", len(self.coarse_names))):
            values = numpy.asarray(content[key])
            if values.shape != (data.shape[0],) or values.dtype.kind not in "iu" or \
                    (values.size and (values.min() < 0 or values.max() >= classes)):
                raise ValueError(f"{path}: {key} are not {data.shape[0]} integers in 0..{classes - 1} (one per image)")
            labels[key] = torch.from_numpy(values.astype(numpy.int64))
        fine, coarse = labels["fine_labels"], labels["coarse_labels"]
        superclass = torch.tensor([self.coarse_names.index(self.superclass_of[name]) for name in self.fine_names])
        wrong = (superclass[fine] != coarse).nonzero()
        if wrong.numel():
            row = int(wrong[0])
            raise ValueError(f"{path}: image {row} is labelled {self.fine_names[fine[row]]!r} in superclass "
                             f"{self.coarse_names[coarse[row]]!r}, which is not CIFAR-100's superclass of it "
                             f"({self.superclass_of[self.fine_names[fine[row]]]!r})")
        counts = torch.bincount(fine, minlength=len(self.fine_names))
        short = (counts != self.IMAGES_PER_CLASS[part]).nonzero().squeeze(1).tolist()
        if short:
            listed = ", ".join(f"{self.fine_names[c]} ({int(counts[c])})" for c in short[:3])
            raise ValueError(f"{path} is incomplete: {len(short)} classes do not have the "
                             f"{self.IMAGES_PER_CLASS[part]} images of CIFAR-100's {part} file, e.g. class "
                             f"(images): {listed}")
        return torch.from_numpy(numpy.ascontiguousarray(data)).reshape(-1, 3, 32, 32), fine


class CIFARFS(_CIFAR100Split):
    """CIFAR-FS (Bertinetto et al. 2019): the 100 CIFAR-100 classes split 64 / 16 / 20 (train / val /
    test) by class, as in the paper's split files (pymaml/data/splits/cifarfs.json), 600 images of 32×32 each
    (the archive's train and test files pooled).

    `images` [M, 3, 32, 32] uint8, `labels` [M] int64, `class_names` the CIFAR-100 fine names of the
    split in CIFAR-100's order (label = position); see _CIFAR100Split for the files read.
    """

    DATASET = "CIFAR-FS"

    def _split_classes(self) -> list[str]:
        names = set(published_split("cifarfs")[self.split])
        return [name for name in self.fine_names if name in names]


class FC100(_CIFAR100Split):
    """FC100 (Oreshkin et al. 2018): the CIFAR-100 classes split by superclass, 12 / 4 / 4 superclasses
    = 60 / 20 / 20 classes (train / val / test), as published (pymaml/data/splits/fc100.json), 600 images of
    32×32 each (the archive's train and test files pooled).

    `images` [M, 3, 32, 32] uint8, `labels` [M] int64, `class_names` the CIFAR-100 fine names of the
    split in CIFAR-100's order (label = position), `superclass_names` the split's superclasses and
    `class_superclasses` the superclass of each class; see _CIFAR100Split for the files read.
    """

    DATASET = "FC100"

    def _split_classes(self) -> list[str]:
        self.superclass_names = list(published_split("fc100")[self.split])
        names = [name for name in self.fine_names if self.superclass_of[name] in self.superclass_names]
        self.class_superclasses = [self.superclass_of[name] for name in names]
        return names
