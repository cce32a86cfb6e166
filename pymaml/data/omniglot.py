"""Omniglot (Lake et al. 2015) as a class-indexed image set."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .fewshot import _positive_int


OMNIGLOT_FOLDERS = ("images_background", "images_evaluation")


class Omniglot:
    """The Omniglot characters (Lake et al. 2015) as a class-indexed image set for FewShot.

    Reads the layout of the dataset's two archives (images_background.zip and
    images_evaluation.zip from https://github.com/brendenlake/omniglot, folder python/),
    unzipped into `root`:

        root/images_background/<alphabet>/<character>/<drawing>.png   30 alphabets, 964 characters
        root/images_evaluation/<alphabet>/<character>/<drawing>.png   20 alphabets, 659 characters

    Characters are ordered by folder (background, then evaluation), then alphabet, then
    character name (Python string order); each character is one class (label = its position
    in the split) and its drawings are read in file-name order. Splits:
        "train": the first `train_characters` (1200) characters, the usual meta-training split
                 (all 964 background characters and the first 236 evaluation ones);
        "test": the other 423 characters;
        "all", "background", "evaluation": every character, or those of one folder.
    "train", "test" and "all" need both folders; "background" and "evaluation" only their own.

    The 105×105 drawings are decoded with Pillow, converted to grayscale and resized to
    image_size × image_size with Lanczos filtering; invert=True (default) makes strokes 255 and
    the background 0, as in Finn et al.'s code. `images` [M, 1, S, S] uint8, `labels` [M] int64,
    `class_names` ["<folder>/<alphabet>/<character>", ...].

    cache=True keeps the decoded, resized drawings of every character present in
    root/pymaml_omniglot_<S>px.pt (torch.save of uint8 tensors, about 25 MB for S = 28), so later
    loads skip the PNGs; it is rebuilt when the characters or drawings on disk change.
    """

    SPLITS = ("train", "test", "all", "background", "evaluation")
    CACHE_VERSION = 1

    def __init__(self, root, split: str = "train", image_size: int = 28, invert: bool = True, cache: bool = True,
                 train_characters: int = 1200):
        if split not in self.SPLITS:
            raise ValueError(f"unknown Omniglot split {split!r}; use one of {self.SPLITS}")
        self.image_size = _positive_int("image_size", image_size)
        train_characters = _positive_int("train_characters", train_characters)
        self.root = Path(root)
        self.split = split
        needed = (split,) if split in ("background", "evaluation") else ("background", "evaluation")
        missing = [f"images_{name}" for name in needed if not (self.root / f"images_{name}").is_dir()]
        if missing:
            raise FileNotFoundError(self._missing_message(missing))
        present = [folder for folder in OMNIGLOT_FOLDERS if (self.root / folder).is_dir()]
        names, images, counts = self._load(self._list_characters(present), [f"images_{name}" for name in needed], cache)
        if split == "train":
            keep = range(0, min(train_characters, len(names)))
        elif split == "test":
            keep = range(min(train_characters, len(names)), len(names))
        else:
            keep = range(len(names))
        if not keep:
            raise ValueError(f"the {split!r} split is empty: {len(names)} characters under {self.root} and "
                             f"train_characters={train_characters}")
        starts = [0] + torch.cumsum(torch.tensor(counts), 0).tolist()
        self.class_names = [names[c] for c in keep]
        self.images = torch.cat([images[starts[c]:starts[c + 1]] for c in keep]).unsqueeze(1)
        if invert:
            self.images = 255 - self.images
        self.labels = torch.repeat_interleave(torch.arange(len(keep)), torch.tensor([counts[c] for c in keep]))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _missing_message(self, missing) -> str:
        zips = [name for name in missing if (self.root / f"{name}.zip").is_file()]
        hint = f" ({', '.join(z + '.zip' for z in zips)} found there: unzip it in place)" if zips else ""
        return (f"Omniglot data not found: {', '.join(missing)} missing under {self.root}{hint}. Download "
                f"images_background.zip and images_evaluation.zip from https://github.com/brendenlake/omniglot "
                f"(folder python/) and unzip them into {self.root}, giving\n"
                f"  {self.root}/images_background/<alphabet>/<character>/<drawing>.png\n"
                f"  {self.root}/images_evaluation/<alphabet>/<character>/<drawing>.png")

    def _list_characters(self, folders) -> list[tuple[str, list[str]]]:
        """[("<folder>/<alphabet>/<character>", [png file names, sorted]), ...] in class order."""
        listing = []
        for folder in folders:
            for alphabet in sorted(p.name for p in (self.root / folder).iterdir() if p.is_dir()):
                for character in sorted(p.name for p in (self.root / folder / alphabet).iterdir() if p.is_dir()):
                    name = f"{folder}/{alphabet}/{character}"
                    files = sorted(f.name for f in (self.root / name).iterdir() if f.suffix.lower() == ".png")
                    if not files:
                        raise ValueError(f"Omniglot: no PNG drawings in {self.root / name}")
                    listing.append((name, files))
        if not listing:
            raise FileNotFoundError(f"Omniglot: no <alphabet>/<character>/ folders under {self.root}/{folders}")
        return listing

    @property
    def cache_path(self) -> Path:
        return self.root / f"pymaml_omniglot_{self.image_size}px.pt"

    def _load(self, listing, folders, cache: bool):
        """Names, the stacked uint8 drawings [M, S, S] (not inverted) and the drawing counts of the
        characters of `folders`; the cache holds every character in `listing` (all present)."""
        cached = self._read_cache() if cache else None
        if cached is None or list(cached["files"].items()) != listing:
            cached = self._decode_all(listing)
            if cache:
                self._write_cache(cached)
        names, images, counts, start = [], [], [], 0
        for name, files in listing:
            if name.split("/", 1)[0] in folders:
                names.append(name)
                images.append(cached["images"][start:start + len(files)])
                counts.append(len(files))
            start += len(files)
        if not names:
            raise FileNotFoundError(f"Omniglot: no <alphabet>/<character>/ folders under {self.root}/{folders}")
        return names, torch.cat(images), counts

    def _decode_all(self, listing) -> dict:
        from PIL import Image

        size = (self.image_size, self.image_size)
        drawings = []
        for name, files in listing:
            for file in files:
                with Image.open(self.root / name / file) as image:
                    gray = image.convert("L")
                    if gray.size != size:
                        gray = gray.resize(size, Image.LANCZOS)
                    drawings.append(torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(size))
        return {"version": self.CACHE_VERSION, "image_size": self.image_size, "files": dict(listing),
                "images": torch.stack(drawings)}

    def _read_cache(self):
        if not self.cache_path.is_file():
            return None
        try:
            cached = torch.load(self.cache_path, weights_only=True)
        except Exception as error:
            warnings.warn(f"Omniglot: ignoring the unreadable cache {self.cache_path} ({error}); decoding the PNGs")
            return None
        if cached.get("version") != self.CACHE_VERSION or cached.get("image_size") != self.image_size:
            return None
        return cached

    def _write_cache(self, cached: dict) -> None:
        partial = self.cache_path.with_name(self.cache_path.name + ".partial")
        try:
            torch.save(cached, partial)
            partial.replace(self.cache_path)
        except OSError as error:
            warnings.warn(f"Omniglot: could not write the cache {self.cache_path} ({error}); the PNGs will be "
                          f"decoded again next time")
