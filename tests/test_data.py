import pickle

import numpy as np
import pytest
import torch
from tests.conftest import DEMO_NPZ, shared_data_dir

from veil.config import DataConfig
from veil.data import DataError, apply_augmentation, augment, batches, load_splits, read_npz, to_tensor_images


def _ids(images: torch.Tensor) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) for x in images}


def test_demo_sample_decodes_to_real_cifar(tmp_path):
    images, labels, classes = read_npz(DEMO_NPZ, tmp_path)
    assert images.shape == (2000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [200] * 10
    assert classes[3] == "cat"
    assert 60 < images.mean() < 180 and images.std() > 30  # real photos, not noise or blank
    assert list(tmp_path.glob("*.npy")), "decoded JPEGs are cached"
    again, _, _ = read_npz(DEMO_NPZ, tmp_path)
    assert np.array_equal(images, again)


def test_split_is_disjoint_deterministic_and_seeded(tiny_npz):
    cfg = DataConfig(dataset="npz", path=str(tiny_npz), test_fraction=0.25, attacker_fraction=0.25)
    a, b, c = load_splits(cfg, 0), load_splits(cfg, 0), load_splits(cfg, 1)
    assert (len(a.defender), len(a.attacker), len(a.test)) == (135, 45, 60)
    sets = [_ids(a.defender.images), _ids(a.attacker.images), _ids(a.test.images)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert torch.equal(a.defender.images, b.defender.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.test.images, c.test.images)


def test_digits_are_padded_to_32():
    x = np.full((2, 28, 28, 1), 200, np.uint8)
    t = to_tensor_images(x, 32, "digits")
    assert t.shape == (2, 1, 32, 32)
    assert t[:, :, 2:30, 2:30].eq(200).all() and t[:, :, :2].eq(0).all() and t[:, :, 30:].eq(0).all()


def test_augment_crops_and_flips_whole_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32).to(torch.uint8)
    out = augment(x, flip=True, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # A crop at offset 4 (the padding: no shift) without a flip gives the images back, bit for bit;
    # a mirror flag flips its image alone. (Random pixels: x above repeats every 8 rows.)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    four = torch.full((2,), 4)
    assert torch.equal(apply_augmentation(images, four, four, None), images)
    assert torch.equal(apply_augmentation(images, four, four, torch.tensor([False, False])), images)
    assert torch.equal(apply_augmentation(images, four, four, torch.tensor([True, False])), torch.stack([images[0].flip(-1), images[1]]))
    g2 = torch.Generator().manual_seed(1)
    several = [augment(x, True, g2) for _ in range(20)]
    assert any(not torch.equal(s, x) for s in several)
    # Check one crop against a slow, obvious computation.
    g3 = torch.Generator().manual_seed(5)
    y = augment(x, flip=False, generator=g3)
    g3 = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 9, (2,), generator=g3)
    dx = torch.randint(0, 9, (2,), generator=g3)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        assert torch.equal(y[i], padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32])


def test_batches_cover_every_image_once_when_evaluating(tiny_npz):
    s = load_splits(DataConfig(dataset="npz", path=str(tiny_npz)), 0)
    seen = torch.cat([lab for _, lab in batches(s.test, 7)])
    assert torch.equal(seen, s.test.labels)
    imgs, _ = next(batches(s.test, 7))
    assert imgs.dtype == torch.float32 and 0 <= imgs.min() and imgs.max() <= 1


def _write_cifar100(root, n_train=20, n_test=10):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": [0] * n}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, fh)
    return folder


def test_cifar100_torchvision_layout(tmp_path):
    _write_cifar100(tmp_path)
    s = load_splits(DataConfig(dataset="cifar100", data_dir=str(tmp_path), attacker_fraction=0.25), 0)
    assert s.num_classes == 100 and s.channels == 3
    assert (len(s.defender), len(s.attacker), len(s.test)) == (15, 5, 10)
    assert s.natural


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = _write_cifar100(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "train", "wb") as fh:
        pickle.dump({"data": Evil()}, fh)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_splits(DataConfig(dataset="cifar100", data_dir=str(tmp_path)), 0)


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r"no train split of 'mnist' found under .*data.download=true"):
        load_splits(DataConfig(dataset="mnist", data_dir=str(tmp_path / "nowhere")), 0)


def test_image_folder(tmp_path):
    from PIL import Image

    for c, colour in (("cats", (200, 10, 10)), ("dogs", (10, 10, 200))):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.new("RGB", (40, 30), colour).save(tmp_path / c / f"{i}.png")
    s = load_splits(DataConfig(dataset="folder", path=str(tmp_path), test_fraction=0.2, attacker_fraction=0.25), 0)
    assert s.defender.classes == ["cats", "dogs"] and s.defender.images.shape[1:] == (3, 32, 32)
    assert len(s.defender) + len(s.attacker) + len(s.test) == 10
    red = s.defender.images[s.defender.labels == 0]
    assert (red[:, 0] > 150).all()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_digit_sets_when_available(name):
    root = shared_data_dir()
    if not (root / name / "train.npz").is_file():
        pytest.skip(f"no offline copy of {name} at {root}")
    s = load_splits(DataConfig(dataset=name, data_dir=str(root), n_defender=100, n_attacker=50, n_test=50), 0)
    assert s.defender.images.shape == (100, 1, 32, 32) and not s.natural
    assert len(s.test) == 50


# ----------------------------------------------------------------------------- the later split, data.task

# data.fingerprint of the three splits, computed before the later split existed: every measured figure depends on them.
SPLITS_BEFORE_LATER = {
    ("tiny", 0): "e7b2676b28182d4ad7f05e1d6f5928b2947396105996afbcb0e3365a716ccd57",
    ("tiny", 1): "20e2c37663bf5828d504d6e75a4aada86f4159925008d80e659b3d14d7a3fae6",
    ("demo", 3): "1416c2a3805274395fc0ecb216e5ee29f001ee00e90311848a27b2e5144155f7",
    ("mnist", 0): "0536247e14bfbc432e13b49583a12d6c2e9ddd5e38f1c5f5227c498451f421b9",
}


def test_the_three_splits_are_unchanged_by_the_later_split_and_the_task(tiny_npz, tmp_path):
    from veil.data import fingerprint

    for seed in (0, 1):
        for extra in ({}, {"n_later": 7}, {"task": "cifar10-superclass"}):
            cfg = DataConfig(dataset="npz", path=str(tiny_npz), test_fraction=0.25, attacker_fraction=0.25, **extra)
            assert fingerprint(load_splits(cfg, seed)) == SPLITS_BEFORE_LATER[("tiny", seed)], (seed, extra)
    demo = DataConfig(dataset="npz", path=str(DEMO_NPZ), cache_dir=str(tmp_path), n_defender=500, n_attacker=200, n_test=300)
    s = load_splits(demo, 3)
    assert fingerprint(s) == SPLITS_BEFORE_LATER[("demo", 3)] and (len(s.defender), len(s.attacker), len(s.test)) == (500, 200, 300)
    root = shared_data_dir()
    if (root / "mnist" / "train.npz").is_file():
        mnist = load_splits(DataConfig(dataset="mnist", data_dir=str(root), n_defender=1000, n_attacker=500, n_test=500, n_later=10), 0)
        assert fingerprint(mnist) == SPLITS_BEFORE_LATER[("mnist", 0)] and len(mnist.later) == 10


def test_the_later_split_is_the_rest_of_the_training_images_disjoint_and_seeded(tmp_path):
    # 2,000 demo images: 400 test, 1,600 training images, 320 in the attacker's pool and 1,280 in the defender's.
    base = {"dataset": "npz", "path": str(DEMO_NPZ), "cache_dir": str(tmp_path), "n_defender": 500, "n_attacker": 200}
    s = load_splits(DataConfig(**base), 3)
    assert len(s.later) == 1600 - 500 - 200 == 900
    sets = {k: _ids(getattr(s, k).images) for k in ("defender", "attacker", "test", "later")}
    assert len(sets["later"]) == 900  # 900 distinct images
    for a in sets:
        for b in sets:
            assert a == b or not (sets[a] & sets[b]), (a, b)
    everything = _ids(torch.from_numpy(read_npz(DEMO_NPZ, tmp_path)[0]).permute(0, 3, 1, 2))
    assert len(everything - sets["defender"] - sets["attacker"] - sets["test"] - sets["later"]) == 0  # every image is in one split
    assert np.bincount(s.later.labels.numpy(), minlength=10).min() > 50 and s.later.classes == s.defender.classes  # fine labels
    again, other = load_splits(DataConfig(**base), 3), load_splits(DataConfig(**base), 4)
    assert torch.equal(again.later.images, s.later.images) and torch.equal(again.later.labels, s.later.labels)
    assert not torch.equal(other.later.images[:10], s.later.images[:10])
    first = load_splits(DataConfig(**base, n_later=100), 3).later  # n_later takes the first of the same order
    assert len(first) == 100 and torch.equal(first.images, s.later.images[:100])


def test_an_empty_later_split_is_refused_when_asked_for(tiny_npz):
    s = load_splits(DataConfig(dataset="npz", path=str(tiny_npz), test_fraction=0.25, attacker_fraction=0.25, n_attacker=40), 0)
    assert len(s.later) == 5 and len(s.later_images) == 5  # the attacker's pool of 45 keeps 40: 5 left over
    full = load_splits(DataConfig(dataset="npz", path=str(tiny_npz), test_fraction=0.25, attacker_fraction=0.25), 0)
    assert len(full.later_images) == 0  # loading is fine: training never asks for it
    with pytest.raises(DataError, match=r"the later split is empty: the defender split \(data.n_defender = 0: all\) takes 135 of its pool of 135 and "
                                        r"the attacker split \(data.n_attacker = 0: all\) 45 of its 45, every one of the 180 training images"):
        _ = full.later


def test_the_validation_split_is_the_test_pool_the_users_left_and_moves_no_split(tiny_npz):
    from veil.data import fingerprint

    base = {"dataset": "npz", "path": str(tiny_npz), "test_fraction": 0.25, "attacker_fraction": 0.25}
    whole = load_splits(DataConfig(**base), 0)  # n_test 0: all 60 test images are users'
    with pytest.raises(DataError, match=r"the validation split is empty: the users' split \(data.n_test = 0: all\) takes all 60 test images; "
                                        r"set data.n_test below 60"):
        _ = whole.validation
    s = load_splits(DataConfig(**base, n_test=40), 0)
    assert (len(s.test), len(s.validation)) == (40, 20)
    # The users are the first 40 of the same draw, the validation images the other 20; no training split moves.
    assert torch.equal(s.test.images, whole.test.images[:40]) and torch.equal(s.validation.images, whole.test.images[40:])
    assert torch.equal(s.validation.labels, whole.test.labels[40:])
    for part in ("defender", "attacker", "later_images"):
        assert torch.equal(getattr(s, part).images, getattr(whole, part).images)
    assert fingerprint(s) != fingerprint(whole)  # the users' split is smaller, so the run's data is other data
    ids = {k: _ids(getattr(s, k).images) for k in ("defender", "attacker", "test", "validation")}
    assert len(ids["validation"]) == 20 and all(not (ids["validation"] & ids[k]) for k in ("defender", "attacker", "test"))


def test_task_maps_cifar10_to_vehicle_and_animal_for_training_only(tiny_npz):
    base = {"dataset": "npz", "path": str(tiny_npz), "test_fraction": 0.25, "attacker_fraction": 0.25, "n_defender": 90,
            "task": "cifar10-superclass"}
    fine, task = load_splits(DataConfig(**base), 0), load_splits(DataConfig(**base), 0, labelling="task")
    assert task.num_classes == 2 and task.defender.classes == ["vehicle", "animal"]
    assert fine.defender.classes[:2] == ["airplane", "automobile"] and len(fine.defender.classes) == 10
    for part in ("defender", "attacker", "test", "later"):
        a, b = getattr(fine, part), getattr(task, part)
        assert torch.equal(a.images, b.images)
        vehicle = torch.isin(a.labels, torch.tensor([0, 1, 8, 9]))  # airplane, automobile, ship, truck
        assert torch.equal(b.labels, torch.where(vehicle, 0, 1)) and vehicle.any() and (~vehicle).any()
    with pytest.raises(DataError, match=r"data.task is 'cifar10-superclass', but these splits carry the dataset's 10 fine classes"):
        _ = fine.num_classes
    groups = load_splits(DataConfig(**{**base, "task": "0,1,8,9;2,3,4,5,6,7"}), 0, labelling="task")
    assert groups.defender.classes == ["airplane+automobile+ship+truck", "bird+cat+deer+dog+frog+horse"]
    assert torch.equal(groups.test.labels, task.test.labels)


def test_mnist_parity_and_tasks_that_do_not_fit_the_data(tmp_path):
    rng = np.random.default_rng(0)
    digits = tmp_path / "digits.npz"
    np.savez(digits, images=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), labels=np.arange(60) % 10)
    s = load_splits(DataConfig(dataset="npz", path=str(digits), task="mnist-parity"), 0, labelling="task")
    fine = load_splits(DataConfig(dataset="npz", path=str(digits)), 0)
    assert s.defender.classes == ["even", "odd"] and torch.equal(s.test.labels, fine.test.labels % 2)
    named = tmp_path / "named.npz"  # ten classes, but not CIFAR-10's
    np.savez(named, images=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), labels=np.arange(60) % 10, classes=np.array([f"c{i}" for i in range(10)]))
    with pytest.raises(DataError, match=r"data.task: 'cifar10-superclass' needs CIFAR-10's classes"):
        load_splits(DataConfig(dataset="npz", path=str(named), task="cifar10-superclass"), 0, labelling="task")
    for labelling in ("fine", "task"):  # a task that does not fit the data is refused whichever labels are asked for
        with pytest.raises(DataError, match=r"digits.npz: data.task: class 9 in no group"):
            load_splits(DataConfig(dataset="npz", path=str(digits), task="0,1;2,3,4,5,6,7,8"), 0, labelling=labelling)
