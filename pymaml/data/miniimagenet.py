"""MiniImagenet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from .files import (LabelledImages, ImageCache, check_image_size, check_split, found_under, load_array_pickle,
                    published_split)


class MiniImagenet(LabelledImages):
    """The MiniImagenet images as a class-indexed image set for FewShot: 100 ImageNet classes, 600
    images each, split 64 / 16 / 20 (train / val / test) as Ravi & Larochelle (2017) published it.

    Reads either distributed layout in `root`:

      layout "images": root/images/<file>.jpg with Ravi & Larochelle's split files root/train.csv,
          root/val.csv, root/test.csv (header `filename,label`; label is the class's WordNet id), the
          images made from ImageNet by their script or unpacked from the usual MiniImagenet archive;
      layout "pickle": root/mini-imagenet-cache-{train,val,test}.pkl, the pickle caches of Ren et
          al. (2018) that learn2learn downloads, each a dict {"image_data": uint8 [N, 84, 84, 3],
          "class_dict": {wnid: [row indices]}}.

    layout=None takes "images" when root/<split>.csv exists and "pickle" otherwise. The classes found
    must be exactly the split's published ones (pymaml/data/splits/miniimagenet.json), each with
    IMAGES_PER_CLASS images. Classes are ordered by WordNet id (label = position); the images of a
    class keep the order of the csv rows or of the class_dict indices.

    The images are converted to RGB and, when not image_size × image_size already, resized with Lanczos
    filtering. `images` [M, 3, S, S] uint8, `labels` [M] int64, `class_names` [wnid, ...].

    cache=True keeps the decoded images of the split in root/pymaml_miniimagenet_<split>_<S>px.pt, so
    later loads skip the JPEGs; it is rebuilt when the csv rows change. The pickle layout is read
    as it is (its arrays are already decoded) and cached only when it has to be resized.
    """

    SPLITS = ("train", "val", "test")
    LAYOUTS = ("images", "pickle")
    IMAGES_PER_CLASS = 600
    PICKLE_SIZE = 84

    def __init__(self, root, split: str = "train", image_size: int = 84, layout: str | None = None,
                 cache: bool = True):
        self.split = check_split("MiniImagenet", split, self.SPLITS)
        self.image_size = check_image_size(image_size)
        if layout is not None and layout not in self.LAYOUTS:
            raise ValueError(f"unknown MiniImagenet layout {layout!r}; use None or one of {self.LAYOUTS}")
        self.root = Path(root)
        self.class_names = list(published_split("miniimagenet")[split])
        if layout is None:
            layout = "images" if self.csv_path.is_file() else "pickle"
        self.layout = layout
        if layout == "images":
            self.images, self.labels = self._read_images_layout(cache)
        else:
            self.images, self.labels = self._read_pickle_layout(cache)

    @property
    def csv_path(self) -> Path:
        return self.root / f"{self.split}.csv"

    @property
    def pickle_path(self) -> Path:
        return self.root / f"mini-imagenet-cache-{self.split}.pkl"

    @property
    def cache_path(self) -> Path:
        return self.root / f"pymaml_miniimagenet_{self.split}_{self.image_size}px.pt"

    def _missing(self, what: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"MiniImagenet data not found: {what}. MiniImagenet is read from either layout:\n"
            f"  {self.root}/images/<file>.jpg with {self.root}/train.csv, val.csv, test.csv (Ravi & Larochelle's "
            f"split files, header filename,label, with the images made from ImageNet by their script or "
            f"unpacked from the usual MiniImagenet archive), or\n"
            f"  {self.root}/mini-imagenet-cache-train.pkl, -val.pkl, -test.pkl (the pickle caches of Ren et al. "
            f"2018, as learn2learn downloads them).\n"
            f"Found: {found_under(self.root)}")

    def _check_classes(self, found: dict, source: Path) -> None:
        """`found` {wnid: image count} must be the split's published classes with IMAGES_PER_CLASS each."""
        published = set(self.class_names)
        foreign = sorted(set(found) - published)
        if foreign:
            others = [s for s in self.SPLITS if s != self.split and foreign[0] in published_split("miniimagenet")[s]]
            hint = f" ({foreign[0]} belongs to the {others[0]} split)" if others else ""
            raise ValueError(f"{source} lists {len(foreign)} classes outside the {len(published)} classes of the "
                             f"MiniImagenet {self.split} split, e.g. {', '.join(foreign[:3])}{hint}")
        absent = sorted(published - set(found))
        if absent:
            raise ValueError(f"{source} is incomplete: {len(absent)} of the {len(published)} classes of the "
                             f"MiniImagenet {self.split} split are missing, e.g. {', '.join(absent[:3])}")
        short = [(name, found[name]) for name in self.class_names if found[name] != self.IMAGES_PER_CLASS]
        if short:
            listed = ", ".join(f"{name} ({count})" for name, count in short[:3])
            raise ValueError(f"{source}: {len(short)} classes do not have the {self.IMAGES_PER_CLASS} images of "
                             f"MiniImagenet, e.g. class (images): {listed}")

    def _read_csv(self) -> list[list[str]]:
        try:
            with open(self.csv_path, newline="") as file:
                rows = list(csv.reader(file))
        except (UnicodeDecodeError, csv.Error) as error:
            raise ValueError(f"{self.csv_path} is not a readable csv file ({error})") from error
        if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
            header = ",".join(rows[0]) if rows else "nothing"
            raise ValueError(f"{self.csv_path} does not start with the header filename,label of the MiniImagenet "
                             f"split files (it starts with {header!r})")
        body = [row for row in rows[1:] if row]
        malformed = [(number, row) for number, row in enumerate(rows[1:], start=2) if row and len(row) != 2]
        if malformed:
            number, row = malformed[0]
            raise ValueError(f"{self.csv_path} line {number} has {len(row)} fields, not filename,label: {row!r}")
        return [[name.strip(), label.strip()] for name, label in body]

    def _read_images_layout(self, cache: bool):
        if not self.csv_path.is_file():
            raise self._missing(f"{self.csv_path.name} missing under {self.root}")
        image_folder = self.root / "images"
        if not image_folder.is_dir():
            raise self._missing(f"{self.csv_path.name} found but the folder {image_folder} is missing")
        rows = self._read_csv()
        counts: dict[str, int] = {}
        for _, label in rows:
            counts[label] = counts.get(label, 0) + 1
        self._check_classes(counts, self.csv_path)
        absent = [(name, label) for name, label in rows if not (image_folder / name).is_file()]
        if absent:
            nested = (image_folder / absent[0][1] / absent[0][0]).is_file()
            hint = f" ({absent[0][1]}/{absent[0][0]} is there: move the images out of their class folders into " \
                   f"{image_folder})" if nested else ""
            raise self._missing(f"{len(absent)} of the {len(rows)} images that {self.csv_path.name} lists are "
                                f"missing from {image_folder}, e.g. {', '.join(name for name, _ in absent[:3])}{hint}")
        order = {name: position for position, name in enumerate(self.class_names)}
        rows = sorted(rows, key=lambda row: order[row[1]])          # stable: csv order within a class
        labels = torch.tensor([order[label] for _, label in rows], dtype=torch.int64)
        store = ImageCache(self.cache_path, "MiniImagenet", self.image_size, {"layout": "images", "rows": rows})
        cached = store.read() if cache else None
        if cached is not None:
            return cached["images"], labels
        images = torch.stack([self._decode(image_folder / name) for name, _ in rows])
        if cache:
            store.write(images=images)
        return images, labels

    def _decode(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"MiniImagenet: {path} is not a readable image ({error})") from error
        return self._resized(rgb)

    def _resized(self, rgb) -> torch.Tensor:
        """[3, S, S] uint8 from a PIL RGB image."""
        from PIL import Image

        size = (self.image_size, self.image_size)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.LANCZOS)
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return pixels.reshape(self.image_size, self.image_size, 3).permute(2, 0, 1).contiguous()

    def _read_pickle_layout(self, cache: bool):
        import numpy

        path = self.pickle_path
        if not path.is_file():
            raise self._missing(f"neither {self.csv_path.name} nor {path.name} is under {self.root}")
        stat = path.stat()
        store = ImageCache(self.cache_path, "MiniImagenet", self.image_size,
                           {"layout": "pickle", "file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        resize = self.image_size != self.PICKLE_SIZE
        cached = store.read() if cache and resize else None
        if cached is not None:
            return cached["images"], cached["labels"]
        content = load_array_pickle(path, "MiniImagenet cache", encoding="latin1")
        if not isinstance(content, dict) or not {"image_data", "class_dict"} <= set(content):
            keys = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
            raise ValueError(f"{path} is not a MiniImagenet cache: it holds {keys}, not a dict with image_data "
                             f"and class_dict")
        data, class_dict = content["image_data"], content["class_dict"]
        expected = f"uint8 [N, {self.PICKLE_SIZE}, {self.PICKLE_SIZE}, 3]"
        if not isinstance(data, numpy.ndarray) or data.dtype != numpy.uint8 or data.ndim != 4 or \
                data.shape[1:] != (self.PICKLE_SIZE, self.PICKLE_SIZE, 3):
            found = f"{data.dtype} {list(data.shape)}" if isinstance(data, numpy.ndarray) else type(data).__name__
            raise ValueError(f"{path}: image_data is {found}, not {expected}")
        if not isinstance(class_dict, dict):
            raise ValueError(f"{path}: class_dict is a {type(class_dict).__name__}, not a dict {{wnid: [rows]}}")
        rows_of = {}
        for wnid, rows in class_dict.items():
            rows = numpy.asarray(rows)
            if rows.ndim != 1 or (rows.size and (rows.dtype.kind not in "iu" or rows.min() < 0 or
                                                 rows.max() >= data.shape[0])):
                raise ValueError(f"{path}: the rows of class {wnid} are not indices into the {data.shape[0]} "
                                 f"images of image_data")
            rows_of[str(wnid)] = rows
        self._check_classes({wnid: len(rows) for wnid, rows in rows_of.items()}, path)
        rows = numpy.concatenate([rows_of[name] for name in self.class_names])
        labels = torch.arange(self.num_classes).repeat_interleave(self.IMAGES_PER_CLASS)
        if not resize:
            return torch.from_numpy(numpy.ascontiguousarray(data[rows].transpose(0, 3, 1, 2))), labels
        from PIL import Image

        images = torch.stack([self._resized(Image.fromarray(data[row])) for row in rows])
        if cache:
            store.write(images=images, labels=labels)
        return images, labels
