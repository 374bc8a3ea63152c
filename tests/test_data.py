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
