"""MiniImagenet, CIFAR-FS and FC100 read from small files written in each distributed format, with the
published class splits shipped in pymaml/data/splits."""

import csv
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pymaml.data import cifar100, miniimagenet
from pymaml.data import CIFARFS, FC100, FewShot, MiniImagenet
from pymaml.data.files import load_array_pickle, published_split

# The published splits, written out independently of pymaml/data/splits: MiniImagenet's val and test
# WordNet ids (Ravi & Larochelle's val.csv, test.csv), CIFAR-FS's val and test classes (Bertinetto et
# al.'s val.txt, test.txt) and FC100's superclass indices (Oreshkin et al.).
MINI_VAL = ["n01855672", "n02091244", "n02114548", "n02138441", "n02174001", "n02950826", "n02971356", "n02981792",
            "n03075370", "n03417042", "n03535780", "n03584254", "n03770439", "n03773504", "n03980874", "n09256479"]
MINI_TEST = ["n01930112", "n01981276", "n02099601", "n02110063", "n02110341", "n02116738", "n02129165", "n02219486",
             "n02443484", "n02871525", "n03127925", "n03146219", "n03272010", "n03544143", "n03775546", "n04146614",
             "n04149813", "n04418357", "n04522168", "n07613480"]
CIFARFS_VAL = ["otter", "motorcycle", "television", "lamp", "crocodile", "shark", "butterfly", "beaver", "beetle",
               "tractor", "flatfish", "maple_tree", "camel", "crab", "sea", "cattle"]
CIFARFS_TEST = ["baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
                "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm"]
FC100_SUPERCLASS_IDS = {"train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19], "val": [8, 11, 13, 16],
                        "test": [0, 7, 12, 14]}

# CIFAR-100's superclasses (meta's coarse_label_names order) and their fine classes: the archive's hierarchy.
CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
COARSE = list(CIFAR100)
FINE = sorted(name for names in CIFAR100.values() for name in names)
SUPERCLASS = {fine: COARSE.index(coarse) for coarse, names in CIFAR100.items() for fine in names}


def test_shipped_splits_are_the_published_ones():
    mini = published_split("miniimagenet")
    assert (len(mini["train"]), len(mini["val"]), len(mini["test"])) == (64, 16, 20)
    assert mini["val"] == MINI_VAL and mini["test"] == MINI_TEST
    assert len(set(mini["train"]) | set(MINI_VAL) | set(MINI_TEST)) == 100
    cifarfs = published_split("cifarfs")
    assert sorted(cifarfs["val"]) == sorted(CIFARFS_VAL) and sorted(cifarfs["test"]) == sorted(CIFARFS_TEST)
    assert sorted(cifarfs["train"] + cifarfs["val"] + cifarfs["test"]) == FINE and len(cifarfs["train"]) == 64
    fc100 = published_split("fc100")
    for split, ids in FC100_SUPERCLASS_IDS.items():
        assert fc100[split] == [COARSE[i] for i in ids]
    assert fc100["superclasses"] == CIFAR100


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_array_pickles_of_every_protocol_load(tmp_path, protocol):
    content = {b"data": np.arange(24, dtype=np.uint8).reshape(2, 12), "rows": [np.int64(3), 4], "name": b"x"}
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    loaded = load_array_pickle(path, "test", encoding="bytes")
    assert np.array_equal(loaded[b"data"], content[b"data"]) and loaded[b"data"].dtype == np.uint8
    assert loaded["rows"] == [3, 4] and loaded["name"] == b"x"


# ---- MiniImagenet ------------------------------------------------------------------------------------

PER_CLASS = 2


@pytest.fixture
def two_per_class(monkeypatch):
    monkeypatch.setattr(MiniImagenet, "IMAGES_PER_CLASS", PER_CLASS)


def mini_classes(split):
    return published_split("miniimagenet")[split]


def solid(number: int, size) -> np.ndarray:
    """An RGB image [H, W, 3] of its own colours, with a darker left half."""
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = (number * 37 % 256, number * 11 % 256, 255 - number % 256)
    pixels[:, : size[0] // 2] //= 2
    return pixels


def write_jpeg_tree(root, size=(12, 10), splits=("train", "val", "test")):
    """root/images/*.jpg and root/<split>.csv; returns {split: [(file, wnid), ...] in csv order}. Each
    csv lists its classes' images interleaved, so reading them in label order is not the csv order."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    listed = {}
    for split in splits:
        rows = [(f"{wnid}{index + 1:08d}.jpg", wnid) for index in range(PER_CLASS) for wnid in mini_classes(split)]
        for number, (name, _) in enumerate(rows):
            Image.fromarray(solid(number + 100 * len(listed), size)).save(root / "images" / name, quality=95)
        with open(root / f"{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
        listed[split] = rows
    return listed


def decoded(path, size) -> torch.Tensor:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("source_size,image_size", [((12, 10), 8), ((8, 8), 8)])
def test_miniimagenet_jpeg_layout(tmp_path, two_per_class, source_size, image_size):
    listed = write_jpeg_tree(tmp_path, size=source_size)
    for split, classes in (("train", 64), ("val", 16), ("test", 20)):
        data = MiniImagenet(tmp_path, split, image_size=image_size)
        assert data.layout == "images" and data.class_names == mini_classes(split) and data.num_classes == classes
        assert data.images.shape == (classes * PER_CLASS, 3, image_size, image_size)
        assert data.images.dtype == torch.uint8 and len(data) == classes * PER_CLASS
        assert torch.equal(data.labels, torch.arange(classes).repeat_interleave(PER_CLASS))
        in_label_order = sorted(listed[split], key=lambda row: data.class_names.index(row[1]))
        for m, (name, wnid) in enumerate(in_label_order):
            assert data.class_names[int(data.labels[m])] == wnid
            assert torch.equal(data.images[m], decoded(tmp_path / "images" / name, image_size))
    assert MiniImagenet(tmp_path, "val", image_size=image_size).class_names == MINI_VAL


def write_pickles(root, splits=("train", "val", "test"), size=84, seed=0):
    """root/mini-imagenet-cache-<split>.pkl with the rows of each class scattered and out of order;
    returns {split: (image_data, class_dict)}."""
    written = {}
    generator = np.random.default_rng(seed)
    for split in splits:
        classes = mini_classes(split)
        data = generator.integers(0, 256, (len(classes) * PER_CLASS, size, size, 3), dtype=np.uint8)
        rows = generator.permutation(len(data))
        class_dict = {wnid: [int(r) for r in rows[c::len(classes)]] for c, wnid in enumerate(classes)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as file:
            pickle.dump({"image_data": data, "class_dict": class_dict}, file, protocol=4)
        written[split] = (data, class_dict)
    return written


def test_miniimagenet_pickle_layout(tmp_path, two_per_class):
    written = write_pickles(tmp_path)
    for split in ("train", "val", "test"):
        data = MiniImagenet(tmp_path, split)
        image_data, class_dict = written[split]
        assert data.layout == "pickle" and data.class_names == mini_classes(split)
        rows = [row for wnid in data.class_names for row in class_dict[wnid]]
        assert torch.equal(data.images, torch.from_numpy(image_data[rows]).permute(0, 3, 1, 2))
        assert torch.equal(data.labels, torch.arange(data.num_classes).repeat_interleave(PER_CLASS))
    assert not list(tmp_path.glob("pymaml_*")), "84-pixel pickles are used as they are, without a cache"
    small = MiniImagenet(tmp_path, "test", image_size=20)
    image_data, class_dict = written["test"]
    first = Image.fromarray(image_data[class_dict[MINI_TEST[0]][0]]).resize((20, 20), Image.LANCZOS)
    assert torch.equal(small.images[0], torch.from_numpy(np.asarray(first).copy()).permute(2, 0, 1))
    assert small.cache_path == tmp_path / "pymaml_miniimagenet_test_20px.pt" and small.cache_path.is_file()


def test_miniimagenet_layout_choice(tmp_path, two_per_class):
    write_pickles(tmp_path, splits=("val",))
    write_jpeg_tree(tmp_path, splits=("val",))
    assert MiniImagenet(tmp_path, "val", image_size=8).layout == "images"
    from_pickle = MiniImagenet(tmp_path, "val", image_size=8, layout="pickle")
    assert from_pickle.layout == "pickle" and from_pickle.images.shape == (16 * PER_CLASS, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-train.pkl"):
        MiniImagenet(tmp_path, "train", layout="images")
    with pytest.raises(ValueError, match="unknown MiniImagenet layout 'zip'"):
        MiniImagenet(tmp_path, "val", layout="zip")
    with pytest.raises(ValueError, match="unknown MiniImagenet split 'validation'"):
        MiniImagenet(tmp_path, "validation")
    with pytest.raises(ValueError, match="image_size"):
        MiniImagenet(tmp_path, "val", image_size=0)


def test_miniimagenet_cache_is_written_used_and_refreshed(tmp_path, two_per_class, monkeypatch):
    listed = write_jpeg_tree(tmp_path, splits=("test",))
    first = MiniImagenet(tmp_path, "test", image_size=8)
    assert first.cache_path == tmp_path / "pymaml_miniimagenet_test_8px.pt" and first.cache_path.is_file()

    def no_decoding(self, path):
        raise AssertionError("decoded a JPEG although the cache is current")

    with monkeypatch.context() as patch:
        patch.setattr(MiniImagenet, "_decode", no_decoding)
        cached = MiniImagenet(tmp_path, "test", image_size=8)
        assert torch.equal(cached.images, first.images) and torch.equal(cached.labels, first.labels)
        with pytest.raises(AssertionError, match="decoded"):
            MiniImagenet(tmp_path, "test", image_size=6)   # another size has its own cache
    # the csv now lists the first two images of the first class the other way round
    rows = listed["test"]
    rows[0], rows[20] = rows[20], rows[0]
    with open(tmp_path / "test.csv", "w", newline="") as file:
        csv.writer(file).writerows([("filename", "label"), *rows])
    refreshed = MiniImagenet(tmp_path, "test", image_size=8)
    assert torch.equal(refreshed.images[0], first.images[1]) and torch.equal(refreshed.images[1], first.images[0])
    first.cache_path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="ignoring the unreadable cache"):
        rebuilt = MiniImagenet(tmp_path, "test", image_size=8)
    assert torch.equal(rebuilt.images, refreshed.images)
    uncached = tmp_path / "uncached"
    write_jpeg_tree(uncached, splits=("test",))
    MiniImagenet(uncached, "test", image_size=8, cache=False)
    assert not list(uncached.glob("pymaml_*"))

    write_pickles(tmp_path, splits=("val",))
    resized = MiniImagenet(tmp_path, "val", image_size=10)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled although the cache is current")

    with monkeypatch.context() as patch:
        patch.setattr(miniimagenet, "load_array_pickle", no_unpickling)
        assert torch.equal(MiniImagenet(tmp_path, "val", image_size=10).images, resized.images)
    write_pickles(tmp_path, splits=("val",), seed=1)   # the same name, new contents
    with monkeypatch.context() as patch:
        patch.setattr(miniimagenet, "load_array_pickle", no_unpickling)
        with pytest.raises(AssertionError, match="unpickled"):
            MiniImagenet(tmp_path, "val", image_size=10)


def test_miniimagenet_missing_files_say_what_is_expected(tmp_path, two_per_class):
    root = tmp_path / "mini"
    with pytest.raises(FileNotFoundError) as error:
        MiniImagenet(root)
    message = str(error.value)
    for expected in (f"{root}/images/<file>.jpg", "train.csv, val.csv, test.csv", "Ravi & Larochelle",
                     "mini-imagenet-cache-train.pkl", "Ren et al.", f"Found: {root} does not exist"):
        assert expected in message
    root.mkdir()
    (root / "mini-imagenet.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"(?s)neither train.csv nor mini-imagenet-cache-train.pkl .*"
                                                r"Found: .* holds mini-imagenet.tar.gz"):
        MiniImagenet(root)
    write_jpeg_tree(root, splits=("train",))
    (root / "images" / f"{mini_classes('train')[3]}00000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of the 128 images that train.csv lists are missing from "
                                                rf"{root}/images, e.g. {mini_classes('train')[3]}00000002.jpg"):
        MiniImagenet(root, image_size=8)
    for image in (root / "images").iterdir():
        image.unlink()
    first_class, first_image = mini_classes("train")[0], f"{mini_classes('train')[0]}00000001.jpg"
    (root / "images" / first_class).mkdir()
    Image.fromarray(solid(0, (12, 10))).save(root / "images" / first_class / first_image)
    with pytest.raises(FileNotFoundError, match=rf"\({first_class}/{first_image} is there: move the images out "
                                                rf"of their class folders into {root}/images\)"):
        MiniImagenet(root, image_size=8)
    (root / "images" / first_class / first_image).unlink()
    (root / "images" / first_class).rmdir()
    (root / "images").rmdir()
    with pytest.raises(FileNotFoundError, match=rf"train.csv found but the folder {root}/images is missing"):
        MiniImagenet(root, image_size=8)


def rewrite_csv(path, rows):
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows(rows)


def test_miniimagenet_wrong_csv_files(tmp_path, two_per_class):
    listed = write_jpeg_tree(tmp_path, splits=("train", "val"))
    path = tmp_path / "train.csv"
    rows = listed["train"]
    rewrite_csv(path, [("file", "class"), *rows])
    with pytest.raises(ValueError, match=rf"{path} does not start with the header filename,label"):
        MiniImagenet(tmp_path, image_size=8)
    rewrite_csv(path, [("filename", "label"), *rows[:5], (rows[5][0],), *rows[6:]])
    with pytest.raises(ValueError, match=rf"{path} line 7 has 1 fields"):
        MiniImagenet(tmp_path, image_size=8)
    rewrite_csv(path, [("filename", "label"), *rows, *listed["val"]])
    with pytest.raises(ValueError, match=rf"{path} lists 16 classes outside the 64 classes of the MiniImagenet "
                                         rf"train split, e.g. .*belongs to the val split"):
        MiniImagenet(tmp_path, image_size=8)
    rewrite_csv(path, [("filename", "label"), *[row for row in rows if row[1] != mini_classes("train")[7]]])
    with pytest.raises(ValueError, match=rf"{path} is incomplete: 1 of the 64 classes .* missing, e.g. "
                                         rf"{mini_classes('train')[7]}"):
        MiniImagenet(tmp_path, image_size=8)
    rewrite_csv(path, [("filename", "label"), *rows[1:]])
    with pytest.raises(ValueError, match=rf"1 classes do not have the 2 images of MiniImagenet, e.g. class "
                                         rf"\(images\): {rows[0][1]} \(1\)"):
        MiniImagenet(tmp_path, image_size=8)
    rewrite_csv(path, [("filename", "label"), *rows])
    broken = tmp_path / "images" / rows[9][0]
    broken.write_bytes(b"\xff\xd8 not a JPEG")
    with pytest.raises(ValueError, match=rf"{broken} is not a readable image"):
        MiniImagenet(tmp_path, image_size=8)


class Exploit:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


@pytest.mark.parametrize("content,expected", [
    (b"\x80\x04 truncated", "is not a readable MiniImagenet cache pickle"),
    (pickle.dumps({"image_data": Exploit(), "class_dict": {}}), "refers to builtins.print"),
    (pickle.dumps([1, 2]), "holds list, not a dict with image_data and class_dict"),
    (pickle.dumps({"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {}}),
     r"image_data is uint8 \[2, 84, 84\], not uint8 \[N, 84, 84, 3\]"),
    (pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {MINI_VAL[0]: [0, 2]}}),
     f"the rows of class {MINI_VAL[0]} are not indices into the 2 images"),
    (pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {MINI_VAL[0]: [0, 1]}}),
     "is incomplete: 15 of the 16 classes"),
])
def test_miniimagenet_corrupt_pickles_name_the_file(tmp_path, two_per_class, capsys, content, expected):
    path = tmp_path / "mini-imagenet-cache-val.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as error:
        MiniImagenet(tmp_path, "val")
    assert str(path) in str(error.value)
    assert "unpickled code ran" not in capsys.readouterr().out


# ---- CIFAR-FS and FC100 ------------------------------------------------------------------------------

TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 1


@pytest.fixture
def small_archive(monkeypatch):
    monkeypatch.setattr(cifar100._CIFAR100Split, "IMAGES_PER_CLASS",
                        {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS})


def write_cifar100(root, seed=0):
    """root/cifar-100-python/{train,test,meta} as the python archive has them (bytes keys and names),
    the images of each file in shuffled class order; returns {part: (data, fine labels)}."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    written = {}
    for part, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        fine = generator.permutation(np.repeat(np.arange(100), per_class))
        data = generator.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        content = {b"batch_label": f"{part}ing batch 1 of 1".encode(), b"filenames": [b"x.png"] * len(fine),
                   b"fine_labels": fine.tolist(), b"coarse_labels": [SUPERCLASS[FINE[f]] for f in fine],
                   b"data": data}
        (folder / part).write_bytes(pickle.dumps(content, protocol=2))
        written[part] = (data, fine)
    meta = {b"fine_label_names": [n.encode() for n in FINE], b"coarse_label_names": [n.encode() for n in COARSE]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def expected_cifar(written, class_names):
    images = []
    for name in class_names:
        for part in ("train", "test"):
            data, fine = written[part]
            images.append(data[fine == FINE.index(name)])
    return torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("split,classes", [("train", 64), ("val", 16), ("test", 20)])
def test_cifarfs_reads_the_archive_by_published_class(tmp_path, small_archive, split, classes):
    written = write_cifar100(tmp_path)
    data = CIFARFS(tmp_path, split)
    published = {"val": CIFARFS_VAL, "test": CIFARFS_TEST,
                 "train": [name for name in FINE if name not in CIFARFS_VAL + CIFARFS_TEST]}[split]
    assert data.class_names == sorted(published, key=FINE.index) and data.num_classes == classes
    per_class = TRAIN_PER_CLASS + TEST_PER_CLASS
    assert data.images.dtype == torch.uint8 and data.images.shape == (classes * per_class, 3, 32, 32)
    assert torch.equal(data.images, expected_cifar(written, data.class_names))
    assert torch.equal(data.labels, torch.arange(classes).repeat_interleave(per_class))
    # the first pixel of row 0 is its red value, pixel 1024 its green one
    first_train_row = int(np.flatnonzero(written["train"][1] == FINE.index(data.class_names[0]))[0])
    assert data.images[0, 1, 0, 0] == written["train"][0][first_train_row, 1024]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_fc100_reads_the_archive_by_published_superclass(tmp_path, small_archive, split):
    written = write_cifar100(tmp_path)
    data = FC100(tmp_path, split)
    superclasses = [COARSE[i] for i in FC100_SUPERCLASS_IDS[split]]
    assert data.superclass_names == superclasses
    assert data.class_names == [name for name in FINE if COARSE[SUPERCLASS[name]] in superclasses]
    assert data.num_classes == 5 * len(superclasses) and data.class_superclasses == [
        COARSE[SUPERCLASS[name]] for name in data.class_names]
    per_class = TRAIN_PER_CLASS + TEST_PER_CLASS
    assert torch.equal(data.images, expected_cifar(written, data.class_names))
    assert torch.equal(data.labels, torch.arange(data.num_classes).repeat_interleave(per_class))


def test_cifar_splits_are_disjoint_and_cover_the_archive(tmp_path, small_archive):
    write_cifar100(tmp_path)
    for dataset in (CIFARFS, FC100):
        names = [dataset(tmp_path, split).class_names for split in ("train", "val", "test")]
        assert sorted(sum(names, [])) == FINE
    with pytest.raises(ValueError, match="unknown CIFAR-FS split 'all'"):
        CIFARFS(tmp_path, "all")
    with pytest.raises(ValueError, match="unknown FC100 split 'validation'"):
        FC100(tmp_path, "validation")


def test_cifar_tasks_for_fewshot(tmp_path, small_archive):
    write_cifar100(tmp_path)
    data = CIFARFS(tmp_path, "test")
    sampler = FewShot(data, ways=5, shots=2, queries=1, seed=0, dtype=torch.float64)
    batch = sampler.sample(2)
    assert batch.support_x.shape == (2, 10, 3, 32, 32) and batch.query_x.shape == (2, 5, 3, 32, 32)
    for t in range(2):
        for label in range(5):
            images = data.images[data.labels == int(batch.classes[t, label])].double() / 255
            assert any(torch.equal(batch.query_x[t, label], image) for image in images)


def test_cifar_missing_files_say_what_is_expected(tmp_path, small_archive):
    root = tmp_path / "cifar"
    with pytest.raises(FileNotFoundError) as error:
        CIFARFS(root, "train")
    message = str(error.value)
    for expected in ("cifar-100-python/train, cifar-100-python/test, cifar-100-python/meta missing",
                     "cifar-100-python.tar.gz", "Krizhevsky", f"{root}/cifar-100-python/meta",
                     f"Found: {root} does not exist"):
        assert expected in message
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"\(cifar-100-python.tar.gz is there: unpack it in place\)"):
        FC100(root, "test")
    write_cifar100(root)
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)FC100 data not found: cifar-100-python/meta missing.*"
                                                r"Found: .*cifar-100-python holds test, train"):
        FC100(root, "test")


def corrupt(root, part, **changes):
    path = root / "cifar-100-python" / part
    content = pickle.loads(path.read_bytes(), encoding="bytes")
    for key, value in changes.items():
        if value is None:
            del content[key.encode()]
        else:
            content[key.encode()] = value
    path.write_bytes(pickle.dumps(content, protocol=2))
    return path


@pytest.mark.parametrize("part,change,expected", [
    ("train", None, "is not a readable CIFAR-100 pickle"),
    ("meta", {"fine_label_names": [n.encode() for n in FINE[:99]] + [b"apple_pie"]},
     "fine_label_names are not CIFAR-100's 100 names in their order .*entry 99 is 'apple_pie'"),
    ("meta", {"coarse_label_names": None}, "has no coarse_label_names"),
    ("meta", {"fine_label_names": 5}, "fine_label_names is a int, not a list of names"),
    ("meta", {"coarse_label_names": [n.encode() for n in COARSE[:19]]},
     "coarse_label_names are not CIFAR-100's 20 names .*entry 19 is missing, CIFAR-100's is 'vehicles_2'"),
    ("meta", {"coarse_label_names": [n.encode() for n in COARSE] + [b"more"]},
     "coarse_label_names has 21 names, CIFAR-100 has 20"),
    ("test", {"data": np.zeros((100, 32, 32, 3), np.uint8)},
     r"data is uint8 \[100, 32, 32, 3\], not uint8 \[N, 3072\]"),
    ("test", {"fine_labels": list(range(99)) + [100]}, "fine_labels are not 100 integers in 0..99"),
    ("test", {"coarse_labels": [0] * 100},
     r"image \d+ is labelled '\w+' in superclass 'aquatic_mammals', which is not CIFAR-100's superclass of it"),
    ("test", {"fine_labels": None}, "has no fine_labels"),
    ("train", {"fine_labels": [0] * 200, "coarse_labels": [SUPERCLASS[FINE[0]]] * 200},
     "is incomplete: 100 classes do not have the 2 images of CIFAR-100's train file"),
])
def test_cifar_corrupt_files_name_the_file(tmp_path, small_archive, part, change, expected):
    write_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / part
    if change is None:
        path.write_bytes(path.read_bytes()[:1000])
    else:
        corrupt(tmp_path, part, **change)
    for dataset in (CIFARFS, FC100):
        with pytest.raises(ValueError, match=expected) as error:
            dataset(tmp_path, "val")
        assert str(path) in str(error.value)
