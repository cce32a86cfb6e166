"""pymaml.data.Omniglot on a miniature tree of real PNG files in the dataset's layout."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import pymaml
from pymaml.data import FewShot, Omniglot

SOURCE = 21   # drawing side in the miniature (Omniglot's is 105)
# folder -> alphabet -> characters; listed unsorted on purpose
TREE = {
    "images_background": {"Latin": ["character02", "character01"], "Greek": ["character01", "character03"]},
    "images_evaluation": {"Tibetan": ["character02", "character01"], "Atlantean": ["character01"]},
}
ORDER = ["images_background/Greek/character01", "images_background/Greek/character03",
         "images_background/Latin/character01", "images_background/Latin/character02",
         "images_evaluation/Atlantean/character01",
         "images_evaluation/Tibetan/character01", "images_evaluation/Tibetan/character02"]
DRAWINGS = 3


def png_bytes(pixels: np.ndarray, bit_depth: int) -> bytes:
    """A grayscale PNG (colour type 0) of uint8 pixels; bit_depth 1 stores pixels > 127 as white."""
    height, width = pixels.shape
    if bit_depth == 1:
        rows = np.packbits(pixels > 127, axis=1)
    else:
        rows = pixels.astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)   # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def drawing(character: int, index: int) -> np.ndarray:
    """White page, a black block whose place depends on the character and the drawing."""
    pixels = np.full((SOURCE, SOURCE), 255, np.uint8)
    top, left = 2 * character, 3 * index
    pixels[top:top + 6, left:left + 9] = 0
    return pixels


def write_tree(root, folders=("images_background", "images_evaluation"), bit_depth=1):
    """Writes the miniature; returns {class name: [source drawings]} in ORDER."""
    sources = {}
    for folder in folders:
        for alphabet, characters in TREE[folder].items():
            for character in characters:
                name = f"{folder}/{alphabet}/{character}"
                directory = root / name
                directory.mkdir(parents=True)
                number = ORDER.index(name)
                sources[name] = []
                for index in reversed(range(DRAWINGS)):
                    pixels = drawing(number, index)
                    (directory / f"{1000 + number:04d}_{index + 1:02d}.png").write_bytes(png_bytes(pixels, bit_depth))
                    sources[name].insert(0, pixels)
    (root / "images_background" / "README.txt").write_text("not a folder, not a drawing")
    return sources


def expected_image(pixels: np.ndarray, size: int) -> torch.Tensor:
    resized = np.asarray(Image.fromarray(pixels).resize((size, size), Image.LANCZOS))
    return 255 - torch.from_numpy(resized.copy())


@pytest.mark.parametrize("bit_depth", [1, 8])
def test_loads_sorted_resized_and_inverted(tmp_path, bit_depth):
    sources = write_tree(tmp_path, bit_depth=bit_depth)
    data = Omniglot(tmp_path, split="all", image_size=7)
    assert data.class_names == ORDER and data.num_classes == 7 and len(data) == 7 * DRAWINGS
    assert data.images.shape == (7 * DRAWINGS, 1, 7, 7) and data.images.dtype == torch.uint8
    assert torch.equal(data.labels, torch.arange(7).repeat_interleave(DRAWINGS))
    for m in range(len(data)):
        source = sources[ORDER[m // DRAWINGS]][m % DRAWINGS]
        assert torch.equal(data.images[m, 0], expected_image(source, 7))
    # strokes are 255 on a 0 background; the 6×9 block shrinks to about 2×3 pixels
    assert data.images[0, 0, 0, 0] > 200 and data.images[0, 0, -1, -1] == 0
    raw = Omniglot(tmp_path, split="all", image_size=SOURCE, invert=False, cache=False)
    assert torch.equal(raw.images[4, 0], torch.from_numpy(sources[ORDER[1]][1]))


def test_splits(tmp_path):
    write_tree(tmp_path)
    train = Omniglot(tmp_path, "train", image_size=7, train_characters=5)
    test = Omniglot(tmp_path, "test", image_size=7, train_characters=5)
    assert train.class_names == ORDER[:5] and test.class_names == ORDER[5:]
    assert torch.equal(test.labels, torch.arange(2).repeat_interleave(DRAWINGS))
    everything = Omniglot(tmp_path, "all", image_size=7)
    assert torch.equal(torch.cat([train.images, test.images]), everything.images)
    assert Omniglot(tmp_path, "train", image_size=7).class_names == ORDER   # 1200 > 7 characters
    assert Omniglot(tmp_path, "background", image_size=7).class_names == ORDER[:4]
    evaluation = Omniglot(tmp_path, "evaluation", image_size=7)
    assert evaluation.class_names == ORDER[4:] and torch.equal(evaluation.images, everything.images[4 * DRAWINGS:])
    with pytest.raises(ValueError, match="'test' split is empty"):
        Omniglot(tmp_path, "test", image_size=7)
    with pytest.raises(ValueError, match="unknown Omniglot split 'val'"):
        Omniglot(tmp_path, "val")
    with pytest.raises(ValueError, match="image_size"):
        Omniglot(tmp_path, "all", image_size=0)


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        Omniglot(tmp_path / "omniglot")
    message = str(error.value)
    assert "images_background, images_evaluation missing" in message and str(tmp_path / "omniglot") in message
    assert "/images_background/<alphabet>/<character>/<drawing>.png" in message
    write_tree(tmp_path, folders=("images_background",))
    assert Omniglot(tmp_path, "background", image_size=7).num_classes == 4
    (tmp_path / "images_evaluation.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"images_evaluation missing .*images_evaluation\.zip found"):
        Omniglot(tmp_path, "train")
    (tmp_path / "images_evaluation" / "Tibetan" / "character01").mkdir(parents=True)
    with pytest.raises(ValueError, match="no PNG drawings in .*Tibetan/character01"):
        Omniglot(tmp_path, "evaluation")


def test_cache_is_written_used_and_refreshed(tmp_path, monkeypatch):
    write_tree(tmp_path)
    first = Omniglot(tmp_path, "all", image_size=7)
    assert first.cache_path == tmp_path / "pymaml_omniglot_7px.pt" and first.cache_path.is_file()

    def no_decoding(self, listing):
        raise AssertionError("decoded the PNGs although the cache is current")

    with monkeypatch.context() as patch:
        patch.setattr(Omniglot, "_decode_all", no_decoding)
        cached = Omniglot(tmp_path, "train", image_size=7, train_characters=5)
        assert torch.equal(cached.images, first.images[: 5 * DRAWINGS])
        with pytest.raises(AssertionError, match="decoded"):
            Omniglot(tmp_path, "all", image_size=14)   # another size has its own cache
    extra = tmp_path / "images_evaluation" / "Tibetan" / "character03"
    extra.mkdir()
    (extra / "0001_01.png").write_bytes(png_bytes(drawing(9, 0), 1))
    refreshed = Omniglot(tmp_path, "all", image_size=7)
    assert refreshed.num_classes == 8 and torch.equal(refreshed.images[-1, 0], expected_image(drawing(9, 0), 7))


def test_fewshot_tasks_with_rotations_train_maml(tmp_path):
    write_tree(tmp_path)
    data = Omniglot(tmp_path, "train", image_size=8, train_characters=5)
    sampler = FewShot(data, ways=3, shots=1, queries=2, rotations=(0, 90, 180, 270), seed=0, dtype=torch.float64)
    assert sampler.num_classes == 20
    batch = sampler.sample(2)
    assert batch.support_x.shape == (2, 3, 1, 8, 8) and batch.query_y.shape == (2, 6)
    for t in range(2):
        for label in range(3):
            character, degrees = int(batch.classes[t, label]), int(batch.rotations[t, label])
            drawings = data.images[data.labels == character].double() / 255
            image = torch.rot90(batch.support_x[t, label], k=-degrees // 90, dims=(-2, -1))
            assert any(torch.equal(image, candidate) for candidate in drawings)
    torch.manual_seed(0)
    model = pymaml.models.Conv4(ways=3, hidden=4, image_size=8).double()
    out = pymaml.MAML(model, inner_lr=0.4, inner_steps=1, loss="cross_entropy")(*batch.tasks)
    expected = pymaml.reference.meta_loss(model, *batch.tasks, inner_lr=0.4, inner_steps=1, loss="cross_entropy")
    assert torch.allclose(out.loss, expected, rtol=1e-10, atol=0)
