import math

import pytest
import torch

from fewshot_fixtures import make_folder, make_miniimagenet, make_omniglot, one_thread  # noqa: F401
from reptile_fused.data import (
    DatasetError,
    ImageClasses,
    SineTasks,
    TaskSampler,
    inner_batches,
    load_folder,
    load_miniimagenet,
    load_omniglot,
)
from reptile_fused.data.omniglot import split_sizes


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    return make_omniglot(tmp_path_factory.mktemp("omniglot"), background=(3, 2), evaluation=(2, 1))


# ---------------------------------------------------------------- Omniglot


def test_authors_split_sizes_on_full_omniglot():
    assert split_sizes(1623) == (1200, 423)


def test_omniglot_authors_split(omniglot_root):
    data = load_omniglot(omniglot_root)
    n_train, n_test = split_sizes(8)
    assert (n_train, n_test) == (6, 2)
    train, test = data["train"], data["test"]
    assert train.num_base_classes == 6 and test.num_base_classes == 2
    assert train.num_classes == 24, "train characters get 3 extra rotated classes each"
    assert test.num_classes == 2, "test characters are not augmented"
    assert set(train.names).isdisjoint(test.names)
    assert len(set(train.names) | set(test.names)) == 8
    assert train.image_shape == (1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert set(train.images.unique().tolist()) <= {0, 255}, "1-bit PNGs stay binary, as in the authors' loader"
    assert train.counts().tolist() == [4] * 6


def test_omniglot_split_is_fixed_by_seed(omniglot_root):
    a = load_omniglot(omniglot_root)["train"].names
    b = load_omniglot(omniglot_root)["train"].names
    assert a == b
    others = [load_omniglot(omniglot_root, split_seed=s)["test"].names for s in range(1, 6)]
    assert any(o != load_omniglot(omniglot_root)["test"].names for o in others)


def test_omniglot_background_split(omniglot_root):
    data = load_omniglot(omniglot_root, split="background")
    assert data["train"].num_base_classes == 5 and data["test"].num_base_classes == 3
    assert all("/images_background/background_alphabet" in n for n in data["train"].names)
    assert all("/images_evaluation/evaluation_alphabet" in n for n in data["test"].names)


def test_omniglot_subset_with_one_folder(tmp_path):
    root = make_omniglot(tmp_path, background=(4,), evaluation=())
    assert not (root / "images_evaluation").exists()
    data = load_omniglot(root)
    assert data["train"].num_base_classes + data["test"].num_base_classes == 4
    assert data["train"].num_base_classes == split_sizes(4)[0]


@pytest.mark.parametrize("breakage, message", [
    ("missing_root", "not found"),
    ("no_folders", "neither images_background/ nor images_evaluation/"),
    ("empty_alphabet", "no character folders"),
    ("empty_character", "no .png images"),
    ("bad_png", "cannot read image"),
    ("background_without_eval", "images_evaluation"),
])
def test_omniglot_errors(tmp_path, breakage, message):
    root = tmp_path / "omni"
    split = "authors"
    if breakage == "missing_root":
        bad = root
    elif breakage == "no_folders":
        root.mkdir()
        (root / "something_else").mkdir()
        bad = root
    else:
        make_omniglot(root, background=(2,), evaluation=(1,), drawings=2)
        alphabet = root / "images_background" / "background_alphabet0"
        if breakage == "empty_alphabet":
            bad = root / "images_evaluation" / "empty_alphabet"
            bad.mkdir()
        elif breakage == "empty_character":
            bad = alphabet / "character99"
            bad.mkdir()
        elif breakage == "bad_png":
            bad = alphabet / "character01" / "broken.png"
            bad.write_bytes(b"not a png at all")
        else:
            import shutil
            shutil.rmtree(root / "images_evaluation")
            bad = root / "images_evaluation"
            split = "background"
    with pytest.raises(DatasetError) as err:
        load_omniglot(root, split=split)
    assert str(bad) in str(err.value)
    assert message in str(err.value)


# ---------------------------------------------------------------- Mini-ImageNet


def test_miniimagenet_layout(tmp_path):
    root = make_miniimagenet(tmp_path, classes=(4, 2, 3), per_class=3, size=40)
    data = load_miniimagenet(root)
    assert [data[s].num_classes for s in ("train", "val", "test")] == [4, 2, 3]
    for s in data.values():
        assert s.image_shape == (3, 84, 84), "images are resized to 84x84"
        assert s.counts().tolist() == [3] * s.num_base_classes
    assert set(data["train"].names).isdisjoint(data["test"].names)


def _break_mini(root, breakage):
    if breakage == "missing_csv":
        (root / "val.csv").unlink()
        return root / "val.csv", "not found"
    if breakage == "bad_header":
        lines = (root / "train.csv").read_text().splitlines()
        (root / "train.csv").write_text("\n".join(["file,class"] + lines[1:]))
        return root / "train.csv", "expected 'filename,label'"
    if breakage == "missing_image":
        name = (root / "test.csv").read_text().splitlines()[1].split(",")[0]
        (root / "images" / name).unlink()
        return root / "images" / name, "not found"
    if breakage == "bad_row":
        with open(root / "train.csv", "a") as f:
            f.write("a.jpg,b,c\n")
        return root / "train.csv", "expected filename,label"
    if breakage == "no_images_dir":
        import shutil
        shutil.rmtree(root / "images")
        return root / "images", "not found"
    raise AssertionError(breakage)


@pytest.mark.parametrize("breakage", ["missing_csv", "bad_header", "missing_image", "bad_row", "no_images_dir"])
def test_miniimagenet_errors(tmp_path, breakage):
    root = make_miniimagenet(tmp_path, classes=(2, 1, 1), per_class=2, size=16)
    path, message = _break_mini(root, breakage)
    with pytest.raises(DatasetError) as err:
        load_miniimagenet(root)
    assert str(path) in str(err.value) and message in str(err.value)


# ---------------------------------------------------------------- folder of folders


def test_folder_split_by_fraction(tmp_path):
    root = make_folder(tmp_path, classes=6, per_class=4, size=20)
    data = load_folder(root, image_size=16, channels=1)
    assert data["train"].num_classes == 5 and data["test"].num_classes == 1
    assert data["train"].image_shape == (1, 16, 16)
    again = load_folder(root, image_size=16, channels=1)
    assert again["test"].names == data["test"].names


def test_folder_presplit(tmp_path):
    root = make_folder(tmp_path, per_class=3, size=12, presplit={"train": 3, "val": 1, "test": 2})
    data = load_folder(root, image_size=12, channels=3)
    assert {k: v.num_classes for k, v in data.items()} == {"train": 3, "val": 1, "test": 2}
    assert data["test"].image_shape == (3, 12, 12)


@pytest.mark.parametrize("breakage", ["empty_class", "no_classes", "one_class", "bad_image"])
def test_folder_errors(tmp_path, breakage):
    root = tmp_path / "data"
    if breakage == "no_classes":
        root.mkdir()
        bad, message = root, "no class folders"
    elif breakage == "one_class":
        make_folder(root, classes=1, per_class=2, size=8)
        bad, message = root, "at least 2"
    else:
        make_folder(root, classes=3, per_class=2, size=8)
        if breakage == "empty_class":
            bad, message = root / "empty", "no image files"
            bad.mkdir()
        else:
            bad, message = root / "class_000" / "zz.jpg", "cannot read image"
            bad.write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError) as err:
        load_folder(root, image_size=8, channels=3)
    assert str(bad) in str(err.value) and message in str(err.value)


# ---------------------------------------------------------------- task sampler


def _numbered_classes(n_classes=6, per_class=5, rotations=(0,), size=4):
    """Every image is constant-free: pixel (0, 0) holds the class, pixel (0, 1) the example index."""
    images = torch.randint(0, 256, (n_classes * per_class, 1, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    for c in range(n_classes):
        for k in range(per_class):
            images[c * per_class + k, 0, 0, 0] = c
            images[c * per_class + k, 0, 0, 1] = k
    offsets = torch.arange(n_classes + 1) * per_class
    return ImageClasses(images, offsets, [f"class{c}" for c in range(n_classes)], rotations)


def test_sampler_shapes_and_labels():
    classes = _numbered_classes()
    task = TaskSampler(classes, ways=3, shots=2, queries=1, generator=torch.Generator().manual_seed(1)).sample()
    assert task.support_x.shape == (6, 1, 4, 4) and task.query_x.shape == (3, 1, 4, 4)
    assert task.support_x.dtype == torch.float32
    assert 0.0 <= task.support_x.min() and task.support_x.max() <= 1.0
    assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2] and task.query_y.tolist() == [0, 1, 2]

    def pixels(x):
        return (x[:, 0, 0, :2] * 255).round().long()

    s, q = pixels(task.support_x), pixels(task.query_x)
    for label in range(3):
        cls = s[task.support_y == label, 0]
        assert (cls == cls[0]).all(), "one class per label"
        assert (q[task.query_y == label, 0] == cls[0]).all(), "query shares the support's class"
        ids = set(s[task.support_y == label, 1].tolist()) | set(q[task.query_y == label, 1].tolist())
        assert len(ids) == 3, "support and query examples are distinct"


def test_sampler_permutes_labels_and_is_seeded():
    classes = _numbered_classes()
    sampler = TaskSampler(classes, ways=3, shots=1, generator=torch.Generator().manual_seed(2))
    labels_of_class = {}
    for _ in range(60):
        task = sampler.sample()
        for label, c in enumerate((task.support_x[:, 0, 0, 0] * 255).round().long().tolist()):
            labels_of_class.setdefault(c, set()).add(label)
    assert len(labels_of_class) == 6, "every class is drawn"
    assert all(len(v) == 3 for v in labels_of_class.values()), "each class appears under every label"
    a = TaskSampler(classes, 3, 2, 1, generator=torch.Generator().manual_seed(5)).sample()
    b = TaskSampler(classes, 3, 2, 1, generator=torch.Generator().manual_seed(5)).sample()
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_sampler_rotations_are_extra_classes():
    classes = _numbered_classes(n_classes=2, per_class=3, rotations=(0, 1, 2, 3))
    assert classes.num_classes == 8
    sampler = TaskSampler(classes, ways=8, shots=3, generator=torch.Generator().manual_seed(0))
    task = sampler.sample()
    raw = classes.images.float() / 255
    seen = set()
    for label in range(8):
        x = task.support_x[task.support_y == label]
        found = None
        for base in range(2):
            for k in range(4):
                rotated = torch.rot90(raw[base * 3:(base + 1) * 3], k, dims=(-2, -1))
                if all(any(torch.equal(xi, r) for r in rotated) for xi in x):
                    found = (base, k)
        assert found is not None, "every sampled class is a quarter-turn of a base class"
        seen.add(found)
    assert len(seen) == 8, "the 8 classes are the 2 characters in 4 rotations"


def test_sampler_too_few_classes_or_examples():
    classes = _numbered_classes(n_classes=4, per_class=3)
    with pytest.raises(DatasetError, match="4 classes, but 5-way"):
        TaskSampler(classes, ways=5, shots=1)
    with pytest.raises(DatasetError, match=r"class0: 3 images, but tasks need 4 per class"):
        TaskSampler(classes, ways=2, shots=3, queries=1)


def test_inner_batches_follow_passes():
    g = torch.Generator().manual_seed(0)
    batches = inner_batches(5, 3, 4, g)
    assert batches.shape == (4, 3) and batches.dtype == torch.int64
    flat = batches.flatten()
    assert sorted(flat[:5].tolist()) == list(range(5)), "first pass is a permutation"
    assert sorted(flat[5:10].tolist()) == list(range(5)), "second pass too"
    big = inner_batches(5, 25, 2, g)
    assert all(sorted(torch.bincount(b, minlength=5).tolist()) == [5] * 5 for b in big), \
        "a batch larger than the task repeats each example"
    assert inner_batches(5, 3, 0, g).shape == (0, 3)
    with pytest.raises(ValueError):
        inner_batches(0, 3, 1, g)


# ---------------------------------------------------------------- sine waves


def test_sine_tasks_ranges_and_seed():
    tasks = SineTasks()
    g = torch.Generator().manual_seed(0)
    drawn = [tasks.sample(g) for _ in range(200)]
    assert all(0.1 <= t.amplitude <= 5.0 and 0.0 <= t.phase <= 2 * math.pi for t in drawn)
    x, y = drawn[0].sample(10, g)
    assert x.shape == (10, 1) and y.shape == (10, 1)
    assert (x.abs() <= 5).all()
    torch.testing.assert_close(y, drawn[0].amplitude * torch.sin(x + drawn[0].phase))
    g2 = torch.Generator().manual_seed(0)
    assert [SineTasks().sample(g2) for _ in range(200)] == drawn
