"""pymaml.data.FewShot: N-way K-shot tasks from a class-indexed image set."""

import pytest
import torch

import pymaml
from pymaml.data import FewShot

CLASSES, PER_CLASS, SIZE = 7, 6, 5


def labelled_images(classes=CLASSES, per_class=PER_CLASS, size=SIZE, seed=0):
    """uint8 images [M, 1, S, S], each unique and with no rotational symmetry, labels shuffled."""
    generator = torch.Generator().manual_seed(seed)
    count = classes * per_class
    images = torch.randint(0, 256, (count, 1, size, size), generator=generator, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class) * 10 + 3   # labels need not be 0..C-1
    order = torch.randperm(count, generator=generator)
    return images[order], labels[order]


def identify(batch, images, labels):
    """For every support/query image: (dataset index, dataset label), undoing the task's rotation."""
    lookup = {images[m].numpy().tobytes(): m for m in range(images.shape[0])}
    found = []
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        rows = []
        for t in range(x.shape[0]):
            row = []
            for point in range(x.shape[1]):
                label = int(y[t, point])
                turns = int(batch.rotations[t, label]) // 90
                pixels = torch.rot90(x[t, point], k=-turns, dims=(-2, -1))
                key = (pixels * 255).round().to(torch.uint8).numpy().tobytes()
                index = lookup[key]
                row.append((index, int(labels[index])))
            rows.append(row)
        found.append(rows)
    return found


def test_shapes_dtypes_and_label_layout():
    images, labels = labelled_images()
    batch = FewShot((images, labels), ways=3, shots=2, queries=4, seed=1).sample(5)
    assert batch.support_x.shape == (5, 6, 1, SIZE, SIZE) and batch.query_x.shape == (5, 12, 1, SIZE, SIZE)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert 0.0 <= batch.support_x.min() and batch.support_x.max() <= 1.0
    assert torch.equal(batch.support_y, torch.tensor([0, 0, 1, 1, 2, 2]).expand(5, -1))
    assert torch.equal(batch.query_y, torch.arange(3).repeat_interleave(4).expand(5, -1))
    assert batch.classes.shape == (5, 3) and torch.equal(batch.rotations, torch.zeros(5, 3, dtype=torch.int64))
    assert len(batch.tasks) == 4 and batch.tasks[0] is batch.support_x


def test_every_image_belongs_to_its_label_class_and_support_and_query_are_disjoint():
    images, labels = labelled_images()
    batch = FewShot((images, labels), ways=4, shots=2, queries=3, seed=2).sample(20)
    support, query = identify(batch, images, labels)
    for t in range(20):
        classes = batch.classes[t].tolist()
        assert len(set(classes)) == 4
        for points, y in ((support[t], batch.support_y[t]), (query[t], batch.query_y[t])):
            assert [label for _, label in points] == [classes[int(c)] for c in y]
        indices = [index for index, _ in support[t] + query[t]]
        assert len(set(indices)) == len(indices)


def test_relabelling_and_coverage():
    images, labels = labelled_images()
    batch = FewShot((images, labels), ways=3, shots=1, queries=1, seed=0).sample(60)
    # label 0 names different classes in different tasks; every class and image shows up
    assert len(set(batch.classes[:, 0].tolist())) == CLASSES
    support, query = identify(batch, images, labels)
    used = {index for rows in (support, query) for row in rows for index, _ in row}
    assert len(used) == CLASSES * PER_CLASS


def test_seeded_and_task_indices_are_reproducible():
    images, labels = labelled_images()
    make = lambda seed: FewShot((images, labels), ways=3, shots=2, queries=2, seed=seed)
    sampler = make(4)
    first, second = sampler.sample(2), sampler.sample(3)
    assert sampler.next_task == 5
    together = make(4).batch(range(5))
    for a, b, c in zip(first, second, together):
        assert torch.equal(torch.cat([a, b]), c)
    single = make(4).batch([3])
    assert all(torch.equal(a[0], b[3]) for a, b in zip(single, together))
    other = make(5).batch(range(5))
    assert not torch.equal(other.support_x, together.support_x)


def test_rotations_are_extra_classes():
    images, labels = labelled_images()
    sampler = FewShot((images, labels), ways=5, shots=1, queries=1, rotations=(0, 90, 180, 270), seed=3)
    assert sampler.num_classes == 4 * CLASSES
    batch = sampler.sample(40)
    assert set(batch.rotations.unique().tolist()) == {0, 90, 180, 270}
    # identify() undoes each label's rotation, so finding every image checks the rotations
    support, query = identify(batch, images, labels)
    for t in range(40):
        assert [label for _, label in support[t]] == batch.classes[t].tolist()
    pairs = {(int(c), int(r)) for c, r in zip(batch.classes.reshape(-1), batch.rotations.reshape(-1))}
    assert len(pairs) > CLASSES   # the same character appears under several rotations
    for t in range(40):
        assert len(set(zip(batch.classes[t].tolist(), batch.rotations[t].tolist()))) == 5


def test_rotation_direction_is_counter_clockwise():
    image = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    image[0, 0, 0, 2] = 255   # top right
    batch = FewShot((image.repeat(2, 1, 1, 1), torch.zeros(2, dtype=torch.int64)), ways=1, shots=1, queries=1, rotations=(90,)).sample(1)
    assert batch.support_x[0, 0, 0, 0, 0] == 1.0 and batch.support_x.sum() == 1.0   # moved to the top left


def test_float_images_and_numpy_input_and_dtype():
    images, labels = labelled_images()
    scaled = images.double() / 7
    batch = FewShot((scaled.numpy(), labels.numpy()), ways=2, shots=1, queries=1, dtype=torch.float64).sample(3)
    assert batch.support_x.dtype == torch.float64
    assert any(torch.equal(batch.support_x[0, 0], scaled[m]) for m in range(scaled.shape[0]))
    unbatched = FewShot((images[:, 0], labels), ways=2, shots=1, queries=1).sample(1)
    assert unbatched.support_x.shape == (1, 2, 1, SIZE, SIZE)


def test_bad_input_raises():
    images, labels = labelled_images()
    data = (images, labels)
    with pytest.raises(ValueError, match="ways"):
        FewShot(data, ways=0, shots=1, queries=1)
    with pytest.raises(ValueError, match="queries"):
        FewShot(data, ways=2, shots=1, queries=0)
    with pytest.raises(ValueError, match="exceeds the 7 classes"):
        FewShot(data, ways=8, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"7 classes have fewer than shots \+ queries = 7 images"):
        FewShot(data, ways=2, shots=3, queries=4)
    with pytest.raises(TypeError, match="uint8 or floating"):
        FewShot((images.int(), labels), ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="labels must be"):
        FewShot((images, labels[:-1]), ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="labels must be"):
        FewShot((images, labels.float()), ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="NaN"):
        FewShot((images.float().index_fill(0, torch.tensor([0]), float("nan")), labels), ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="multiples of 90"):
        FewShot(data, ways=2, shots=1, queries=1, rotations=(0, 45))
    with pytest.raises(ValueError, match="square"):
        FewShot((images[..., :-1], labels), ways=2, shots=1, queries=1, rotations=(0, 90))
    with pytest.raises(ValueError, match="tasks"):
        FewShot(data, ways=2, shots=1, queries=1).sample(0)


def test_batches_train_pymaml_maml():
    images, labels = labelled_images(size=8)
    batch = FewShot((images, labels), ways=3, shots=2, queries=2, seed=0, dtype=torch.float64).sample(2)
    torch.manual_seed(0)
    model = pymaml.models.Conv4(ways=3, hidden=4, image_size=8).double()
    out = pymaml.MAML(model, inner_lr=0.1, inner_steps=1, loss="cross_entropy")(*batch.tasks)
    expected = pymaml.reference.meta_loss(model, *batch.tasks, inner_lr=0.1, inner_steps=1, loss="cross_entropy")
    assert torch.allclose(out.loss, expected, rtol=1e-10, atol=0)
