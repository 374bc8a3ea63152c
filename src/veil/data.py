"""Datasets -> uint8 tensors in memory; the splits; data.task's labels; whole-batch augmentation.

Every dataset becomes an `ImageSet`: uint8 images N x C x 32 x 32 and int64 labels. Training
code never sees files: it indexes these tensors (on the training device) batch by batch.

The splits carry the dataset's own (fine) labels. `load_splits(cfg, seed, labelling="task")` gives
the same images with data.task's coarser labels instead: what training reads. Stores and the attack
read the fine ones.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from veil.config import CIFAR10_CLASSES, DataConfig, task_groups
from veil.io import atomic_write_bytes

NATURAL = ("cifar10", "cifar100")  # datasets that get horizontal flips
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_CLASSES = 100_000  # labels above this without a `classes` array are a damaged file, not a dataset


class DataError(ValueError):
    """Data that cannot be used; the message names the file or item and what was expected."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | np.ndarray) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)


@dataclass
class Splits:
    defender: ImageSet  # trains obfuscator, classifier and the training reconstructor
    attacker: ImageSet  # the attacker's own images (Chosen Image Attack); disjoint from the rest
    test: ImageSet  # the users' images: accuracy and privacy are measured here
    name: str
    natural: bool  # horizontal flips make sense (not for digits)
    skipped: list[str] = field(default_factory=list)  # "file: reason" of unreadable images left out
    later_images: ImageSet | None = None  # training images in neither defender nor attacker (may be empty; see `later`)
    no_later: str = ""  # why the later split is empty, naming the keys to change
    spare_images: ImageSet | None = None  # the test pool's images not among the users' (see `validation`)
    no_spare: str = ""  # why there are none, naming the key to change
    task: str = "none"  # data.task the splits were read under
    labelling: str = "fine"  # fine: the dataset's own labels | task: data.task's (what training reads)

    @property
    def channels(self) -> int:
        return self.defender.images.shape[1]

    @property
    def num_classes(self) -> int:
        """Classes of the labels training reads. Asked of fine splits under a data.task it has no single answer
        (the classifier has the task's classes, the labels the dataset's), so it is refused."""
        if self.task != "none" and self.labelling == "fine":
            raise DataError(f"data.task is '{self.task}', but these splits carry the dataset's {len(self.defender.classes)} fine classes; "
                            f"training reads the task's with load_splits(cfg, seed, labelling='task')")
        return len(self.defender.classes)

    @property
    def later(self) -> ImageSet:
        """The later images: training images in neither the defender nor the attacker split, in a fixed seeded
        order (data.n_later of them, 0 = all); refused when there are none."""
        if self.later_images is None or len(self.later_images) == 0:
            raise DataError(self.no_later or "the later split is empty")
        return self.later_images

    @property
    def validation(self) -> ImageSet:
        """Images to pick a classifier's epoch by: the test pool's images that data.n_test left out of the users'
        split, in a fixed seeded order. Never trained on, attacked or scored, and apart from every training split
        (the official test images for a named dataset); refused when there are none."""
        if self.spare_images is None or len(self.spare_images) == 0:
            raise DataError(self.no_spare or "the validation split is empty")
        return self.spare_images


# ----------------------------------------------------------------------------- readers


def default_data_dir() -> Path:
    return Path(os.environ.get("VEIL_DATA_DIR", "data"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("VEIL_CACHE_DIR", Path.home() / ".cache" / "veil"))


def decode_jpegs(jpeg_bytes: np.ndarray, offsets: np.ndarray, where: str) -> np.ndarray:
    """Concatenated JPEG files -> N x H x W x 3 uint8 (the offline CIFAR-10 layout)."""
    from PIL import Image

    out = []
    for i in range(len(offsets) - 1):
        try:
            img = Image.open(io.BytesIO(jpeg_bytes[offsets[i] : offsets[i + 1]].tobytes()))
            out.append(np.asarray(img.convert("RGB")))
        except Exception as e:  # PIL raises many types for corrupt data
            raise DataError(f"{where}: image {i} is not a readable JPEG ({e})") from None
    return np.stack(out)


def _npz_array(z: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    # numpy and zipfile raise many types for a damaged member (bad CRC, truncated, object dtype).
    try:
        return np.asarray(z[key])
    except Exception as e:
        raise DataError(f"{path}: array '{key}' cannot be read ({type(e).__name__}: {e})") from None


def read_npz(path: Path, cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An .npz with `images` (N x H x W x C uint8) or `jpeg_bytes`+`offsets`, and `labels`."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, not an .npz archive with 'images' and 'labels' (save it with np.savez)")
    keys = set(z.files)
    if "labels" not in keys or not ({"images"} <= keys or {"jpeg_bytes", "offsets"} <= keys):
        raise DataError(f"{path}: expected arrays 'images' (or 'jpeg_bytes' and 'offsets') and 'labels', found {sorted(keys)}")
    labels = check_label_array(_npz_array(z, "labels", path), str(path))
    if "images" in keys:
        images = _npz_array(z, "images", path)
    else:
        images = _cached_jpeg_decode(path, z, cache_dir)
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8 (0..255), got {images.dtype} (scale floats in [0, 1] by 255 and cast)")
    if images.ndim == 3:  # N x H x W grayscale
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = " (channels first? Veil expects channels last: N x H x W x C)" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
        raise DataError(f"{path}: 'images' must be N x H x W x C with C = 1 (grey) or 3 (RGB), got shape {images.shape}{hint}")
    if 0 in images.shape[1:3]:
        raise DataError(f"{path}: 'images' are empty ({images.shape[1]}x{images.shape[2]} pixels)")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    if "classes" in keys:
        names = _npz_array(z, "classes", path)
        if names.ndim != 1:
            raise DataError(f"{path}: 'classes' must be a 1-D array of class names, got shape {names.shape}")
        classes = [str(c) for c in names]
    else:
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        if n_classes > MAX_CLASSES:
            raise DataError(f"{path}: labels go up to {n_classes - 1}; without a 'classes' array at most {MAX_CLASSES} classes are accepted")
        classes = [str(i) for i in range(n_classes)]
    return images, labels, classes


def check_label_array(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as a 1-D int64 array of class indices; one-hot rows or fractional values are refused."""
    if labels.ndim != 1:
        hint = " (one-hot? store the class index, e.g. labels.argmax(1))" if labels.ndim == 2 else ""
        raise DataError(f"{where}: 'labels' must be a 1-D array of class indices, got shape {labels.shape}{hint}")
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all() and np.abs(labels).max(initial=0) < 2**62:
        return labels.astype(np.int64)
    raise DataError(f"{where}: 'labels' must be whole class indices 0..K-1, got dtype {labels.dtype}")


def _cached_jpeg_decode(path: Path, z: np.lib.npyio.NpzFile, cache_dir: Path | None) -> np.ndarray:
    # Decoding 50k JPEGs takes ~10 s; cache the uint8 result keyed by the source file's identity.
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = (cache_dir or default_cache_dir()) / f"{path.stem}-{key}.npy"
    if cache.is_file():
        try:
            return np.load(cache, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    jpeg_bytes, offsets = _npz_array(z, "jpeg_bytes", path), _npz_array(z, "offsets", path)
    if jpeg_bytes.dtype != np.uint8 or jpeg_bytes.ndim != 1 or offsets.dtype.kind not in "iu" or offsets.ndim != 1 or len(offsets) < 1:
        raise DataError(f"{path}: 'jpeg_bytes' must be 1-D uint8 and 'offsets' 1-D integers, got {jpeg_bytes.dtype} {jpeg_bytes.shape} and {offsets.dtype} {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(jpeg_bytes) or (np.diff(offsets.astype(np.int64)) <= 0).any():
        raise DataError(f"{path}: 'offsets' must rise from 0 to len(jpeg_bytes) = {len(jpeg_bytes)}, one more entry than images")
    if len(offsets) == 1:
        raise DataError(f"{path}: 'jpeg_bytes' holds no images")
    images = decode_jpegs(jpeg_bytes, offsets, str(path))
    try:
        buf = io.BytesIO()
        np.save(buf, images, allow_pickle=False)
        atomic_write_bytes(cache, buf.getvalue())
    except OSError:
        pass  # caching is an optimisation; a read-only disk is fine
    return images


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for torchvision's CIFAR batches that can build numpy arrays and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain arrays are allowed")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return _ArrayUnpickler(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch file ({e})") from None


def read_torchvision_cifar(root: Path, name: str, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """torchvision's standard `cifar-10-batches-py` / `cifar-100-python` files, if present."""
    if name == "cifar10":
        folder, files, meta, label_key, names_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "batches.meta", "labels", "label_names"
        if not train:
            files = ["test_batch"]
    else:
        folder, files, meta, label_key, names_key = root / "cifar-100-python", ["train" if train else "test"], "meta", "fine_labels", "fine_label_names"
    if not all((folder / f).is_file() for f in files):
        return None
    data, labels = [], []
    for f in files:
        batch = _read_cifar_batch(folder / f)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    classes = [str(c) for c in _read_cifar_batch(folder / meta)[names_key]] if (folder / meta).is_file() else []
    images, labels = np.concatenate(data), np.concatenate(labels)
    return images, labels, classes or [str(i) for i in range(int(labels.max()) + 1)]


def read_torchvision_digits(root: Path, name: str, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError:
        return None
    return ds.data.numpy()[..., None].astype(np.uint8), ds.targets.numpy().astype(np.int64), list(ds.classes)


def read_named(cfg: DataConfig, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A named dataset's train or test split from data_dir, in whichever layout is there."""
    root = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    split = "train" if train else "test"
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    for candidate in (root / cfg.dataset / f"{split}.npz", root / cfg.dataset / f"{split}_jpeg.npz"):
        if candidate.is_file():
            return read_npz(candidate, cache)
    if cfg.dataset in ("cifar10", "cifar100"):
        found = read_torchvision_cifar(root, cfg.dataset, train)
        if found is None and cfg.download:
            import torchvision

            cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
            cls(str(root), train=train, download=True)
            found = read_torchvision_cifar(root, cfg.dataset, train)
    else:
        found = read_torchvision_digits(root, cfg.dataset, train, cfg.download)
    if found is None:
        raise DataError(
            f"no {split} split of '{cfg.dataset}' found under {root.resolve()}: looked for "
            f"{root / cfg.dataset / (split + '.npz')}, {root / cfg.dataset / (split + '_jpeg.npz')} and torchvision's "
            f"standard files. Point data.data_dir (or $VEIL_DATA_DIR) at a copy, or set data.download=true to fetch it."
        )
    return found


def read_folder(path: Path, image_size: int, on_bad_image: str = "error", skipped: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One sub-folder per class, images of any size resized to image_size x image_size.

    An unreadable file stops with its name (on_bad_image="error") or is left out and noted as
    "file: reason" in `skipped` ("skip"). Images are RGB unless every one of them is greyscale.
    """
    from PIL import Image

    if not path.is_dir():
        raise DataError(f"image folder not found: {path} (data.path should hold one sub-folder per class)")
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{path}: expected one sub-folder per class, found none")
    skipped = [] if skipped is None else skipped
    pictures, labels = [], []  # pictures: PIL images already resized, in their own L or RGB mode
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{d}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        n_before = len(labels)
        for f in files:
            try:
                with Image.open(f) as img:
                    img.load()
                    mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
                    pictures.append(img.convert(mode).resize((image_size, image_size), Image.BILINEAR))
            except Exception as e:  # PIL raises many types for corrupt data
                if on_bad_image != "skip":
                    raise DataError(f"{f}: not a readable image ({e}); set data.on_bad_image=skip to leave such files out") from None
                skipped.append(f"{f}: {e}")
                continue
            labels.append(label)
        if len(labels) == n_before:
            raise DataError(f"{d}: class folder holds no readable images ({len(files)} files, all skipped as unreadable)")
    mode = "L" if all(p.mode == "L" for p in pictures) else "RGB"
    images = [np.asarray(p.convert(mode), dtype=np.uint8) for p in pictures]
    return np.stack([a if a.ndim == 3 else a[..., None] for a in images]), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs]


# ----------------------------------------------------------------------------- split


def to_tensor_images(images: np.ndarray, image_size: int, where: str) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x S x S uint8, zero-padding smaller images (28 -> 32)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    h, w = x.shape[-2:]
    if h > image_size or w > image_size:
        raise DataError(f"{where}: images are {h}x{w}, larger than data.image_size={image_size}")
    if (h, w) != (image_size, image_size):
        top, left = (image_size - h) // 2, (image_size - w) // 2
        x = F.pad(x, (left, image_size - w - left, top, image_size - h - top))
    return x


def check_labels(labels: np.ndarray, classes: list[str], where: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{where}: labels must be in 0..{len(classes) - 1} for {len(classes)} classes, found {labels.min()}..{labels.max()}")


def task_table(task: str, classes: list[str], where: str) -> tuple[torch.Tensor, list[str]]:
    """data.task for a dataset's classes -> (int64 table: fine class -> the task's class) and the task's class names.
    A group given by indices is named by its members ('airplane+automobile+ship+truck')."""
    try:
        groups, names = task_groups(task, len(classes))
    except ValueError as e:
        raise DataError(f"{where}: data.task: {e}") from None
    if task == "cifar10-superclass" and not all(c.isdigit() for c in classes) and tuple(classes) != CIFAR10_CLASSES:
        raise DataError(f"{where}: data.task: 'cifar10-superclass' needs CIFAR-10's classes ({', '.join(CIFAR10_CLASSES)}), "
                        f"the data has {', '.join(classes)}; give the groups of class indices instead")
    table = torch.empty(len(classes), dtype=torch.long)
    for g, members in enumerate(groups):
        table[members] = g
    return table, names or ["+".join(classes[c] for c in members) for members in groups]


def load_splits(cfg: DataConfig, seed: int, labelling: str = "fine") -> Splits:
    """The disjoint splits: defender-train, attacker-train, test (users), and the later images, fixed by `seed`.

    labelling: fine (the dataset's own labels: stores, the attack, `veil growth`) | task (data.task's coarser ones: what
    training reads; the same as fine when data.task is none). The images are the same either way.
    """
    if labelling not in ("fine", "task"):
        raise ValueError(f"labelling must be 'fine' or 'task', got {labelling!r}")
    rng = np.random.default_rng(seed)
    skipped: list[str] = []
    if cfg.dataset in ("npz", "folder"):
        path = Path(cfg.path)
        if cfg.dataset == "npz":
            if not path.is_file():
                raise DataError(f"data.path: .npz file not found: {path}")
            images, labels, classes = read_npz(path, Path(cfg.cache_dir) if cfg.cache_dir else None)
        else:
            images, labels, classes = read_folder(path, cfg.image_size, cfg.on_bad_image, skipped)
        check_labels(labels, classes, str(path))
        order = rng.permutation(len(labels))
        n_test = int(round(len(order) * cfg.test_fraction))
        test_idx, train_idx = order[:n_test], order[n_test:]
        train = (images[train_idx], labels[train_idx])
        test = (images[test_idx], labels[test_idx])
        name, where = path.stem, str(path)
        natural = images.shape[-1] == 3
    else:
        tr_images, tr_labels, classes = read_named(cfg, train=True)
        te_images, te_labels, _ = read_named(cfg, train=False)
        check_labels(tr_labels, classes, f"{cfg.dataset} train")
        check_labels(te_labels, classes, f"{cfg.dataset} test")
        train = (tr_images, tr_labels)
        test = (te_images, te_labels)
        name = where = cfg.dataset
        natural = cfg.dataset in NATURAL

    # Attacker and defender draw from the training images, disjoint by construction.
    order = rng.permutation(len(train[1]))
    n_attacker = int(round(len(order) * cfg.attacker_fraction))
    attacker_idx, defender_idx = order[:n_attacker], order[n_attacker:]
    if cfg.n_attacker:
        attacker_idx = attacker_idx[: cfg.n_attacker]
    if cfg.n_defender:
        defender_idx = defender_idx[: cfg.n_defender]
    test_order = rng.permutation(len(test[1]))
    test_idx = test_order[: cfg.n_test] if cfg.n_test else test_order
    spare_idx = test_order[len(test_idx) :]  # the validation images: a slice of the same draw, so no split moves
    # The later images: what n_defender and n_attacker left of their pools, in an order drawn after every
    # draw above (so the three splits are what they were before the later split existed).
    pools = (len(order) - n_attacker, n_attacker)
    rest = np.concatenate([order[n_attacker + len(defender_idx) :], order[len(attacker_idx) : n_attacker]])
    later_idx = rest[rng.permutation(len(rest))]
    if cfg.n_later:
        later_idx = later_idx[: cfg.n_later]
    no_later = (
        f"{where}: the later split is empty: the defender split (data.n_defender = {cfg.n_defender}{': all' if not cfg.n_defender else ''}) "
        f"takes {len(defender_idx)} of its pool of {pools[0]} and the attacker split (data.n_attacker = {cfg.n_attacker}{': all' if not cfg.n_attacker else ''}) "
        f"{len(attacker_idx)} of its {pools[1]}, every one of the {len(order)} training images; set data.n_defender or data.n_attacker "
        f"below its pool to leave later images"
    )

    table, task_classes = task_table(cfg.task, classes, where) if cfg.task != "none" else (None, classes)  # checked whichever labels are read
    if labelling == "fine":
        table, task_classes = None, classes

    def make(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, what: str, empty_ok: bool = False) -> ImageSet:
        if len(idx) == 0 and not empty_ok:
            raise DataError(f"{where}: the {what} split is empty; use more images or other fractions")
        y = torch.from_numpy(labels[idx].copy())
        y = y if table is None else table[y]
        if len(idx) == 0:  # N x C x S x S with N = 0
            return ImageSet(torch.zeros((0, images.shape[-1], cfg.image_size, cfg.image_size), dtype=torch.uint8), y, task_classes)
        return ImageSet(to_tensor_images(images[idx], cfg.image_size, where), y, task_classes)

    return Splits(
        defender=make(*train, defender_idx, "defender-train"),
        attacker=make(*train, attacker_idx, "attacker-train"),
        test=make(*test, test_idx, "test"),
        name=name,
        natural=natural,
        skipped=skipped,
        later_images=make(*train, later_idx, "later", empty_ok=True),
        no_later=no_later,
        spare_images=make(*test, spare_idx, "validation", empty_ok=True),
        no_spare=(f"{where}: the validation split is empty: the users' split (data.n_test = {cfg.n_test}{': all' if not cfg.n_test else ''}) "
                  f"takes all {len(test_order)} test images; set data.n_test below {len(test_order)} to leave validation images"),
        task=cfg.task,
        labelling=labelling,
    )


def fingerprint(splits: Splits) -> str:
    """sha256 over the three splits' images, labels and class names: the same data, image for image.
    (The later images are not in it: a run's fingerprint does not change with data.n_later.)"""
    h = hashlib.sha256()
    for part in (splits.defender, splits.attacker, splits.test):
        h.update(f"{tuple(part.images.shape)}:{part.classes}".encode())
        h.update(part.images.cpu().contiguous().numpy().tobytes())
        h.update(part.labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- batches


def to_float(images: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 0..255 -> float 0..1, the scale every network and metric in Veil works on."""
    return images.to(dtype=torch.float32, memory_format=memory_format).div_(255)


def draw_augmentation(n: int, flip: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per image: crop offsets dy, dx in 0..8 (4-pixel padding) and, with `flip`, a mirror flag."""
    pad = 4
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    mirror = torch.rand(n, generator=generator, device=generator.device) < 0.5 if flip else None
    return dy, dx, mirror


def apply_augmentation(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mirror: torch.Tensor | None) -> torch.Tensor:
    """Crop (after 4-pixel zero padding) and mirror a whole uint8 batch with one gather, no Python per image."""
    n, c, h, w = images.shape
    pad = 4
    padded = F.pad(images, (pad, pad, pad, pad)).flatten(2)  # n x c x (h+8)(w+8)
    device = images.device
    rows = dy.to(device)[:, None] + torch.arange(h, device=device)  # n x h
    cols = dx.to(device)[:, None] + torch.arange(w, device=device)  # n x w
    if mirror is not None:
        cols = torch.where(mirror.to(device)[:, None], cols.flip(1), cols)
    # One flat source index per output pixel, shared by the channels (expand: no copy). A gather
    # over this is ~6x cheaper on CPU than indexing with four broadcast index tensors.
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).flatten(1)  # n x h*w
    return padded.gather(2, index[:, None, :].expand(n, c, h * w)).view(n, c, h, w)


def augment(images: torch.Tensor, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding (+ horizontal flip) for a whole uint8 batch at once."""
    return apply_augmentation(images, *draw_augmentation(len(images), flip, generator))


def shard(n: int, rank: int, world_size: int) -> slice:
    """Process `rank`'s contiguous part of n items (the first n % world_size processes get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def batches(
    data: ImageSet, batch_size: int, generator: torch.Generator | None = None, augment_flip: bool | None = None,
    rank: int = 0, world_size: int = 1, memory_format: torch.memory_format = torch.contiguous_format,
):
    """Yield (float images in [0, 1], labels). Shuffled and augmented when a generator is given.

    With world_size > 1 (a multi-process run) every process draws the same permutation and the
    same augmentation for the whole global batch and keeps its own contiguous 1/world_size of it,
    so the processes together see exactly what one process would.
    """
    n = len(data)
    if generator is not None:
        order = torch.randperm(n, generator=generator, device=generator.device).to(data.images.device)
    else:
        order = torch.arange(n, device=data.images.device)
    # Training drops a last partial batch: BatchNorm at 1x1 spatial size cannot take one image.
    stop = n - n % batch_size if generator is not None and n > batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        draws = draw_augmentation(len(idx), augment_flip, generator) if generator is not None and augment_flip is not None else None
        if world_size > 1:
            part = shard(len(idx), rank, world_size)
            idx = idx[part]
            draws = None if draws is None else tuple(None if d is None else d[part] for d in draws)
        images = data.images[idx]
        if draws is not None:
            images = apply_augmentation(images, *draws)
        yield to_float(images, memory_format), data.labels[idx]
