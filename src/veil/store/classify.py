"""A classifier trained from a feature store alone, and predictions for new images or a store.

The GDPR motivation (paper, Introduction): once the images are gone, the obfuscated features
are what is left to retrain on, e.g. when the model changes. `train_classifier` reads only a
store, never an image, and writes a classifier directory:

    OUT/config.yaml              the resolved HeadConfig (its shift in pixels)
    OUT/classifier.safetensors   the head's weights
    OUT/classifier.json          head, classes, feature shape, the store's obfuscator fingerprint, the shift
    OUT/metrics.jsonl            one line per epoch (train loss and accuracy, test accuracy, validation accuracy)
    OUT/summary.json             final test accuracy, the kept epoch and its accuracies, the shift (shift_pixels, shift_cells),
                                 seconds, versions

With a validation store (`--val-store`: items of the same obfuscator that are neither trained on nor scored,
e.g. `veil obfuscate --data run:validation`), the head of the epoch with the best validation accuracy
(the earliest of equals) is the one kept, saved and scored (kept_epoch, kept_test_accuracy): a store whose
classifier over-fits, such as one noisy draw kept per image, is scored before it does, and the choice
never looks at the test store. Without one the last epoch's head is kept.

A classifier directory written before the shift was given in pixels has `shift: 1` in its
config.yaml meaning one *cell*, and no shift_cells in its summary.json (trained_shift_cells).

`predict` puts new images through a run's obfuscator and then a classifier (the run's own, or
one trained from a store), or classifies a store's features directly. A store or classifier
made by another obfuscator is refused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from veil.config import PRECISIONS
from veil.data import to_float, to_tensor_images
from veil.errors import StoreError
from veil.io import CheckpointError, atomic_write_json, atomic_write_text, load_module, save_tensors
from veil.models import Classifier, init_xavier
from veil.models.obfuscator import conv_bn_relu, fingerprint
from veil.progress import progress_bar
from veil.rundir import load_run
from veil.runtime import OFF, ON, autocast, memory_format, precision_note, resolve_device, resolve_precision
from veil.store.dataset import StoreDataset, open_store
from veil.store.format import DTYPES, check_fingerprint, verify
from veil.store.obfuscate import load_image
from veil.train import onecycle_factor
from veil.version import __version__

# ----------------------------------------------------------------------------- heads


def vgg16_head(channels: int, num_classes: int, width: float, split: int, dropout: float) -> nn.Module:
    """The paper's classifier g: the rest of VGG16-BN and its 512-512-classes head (veil.models.Classifier)."""
    return init_xavier(Classifier(num_classes, width, split, dropout, channels))


def small_head(channels: int, num_classes: int, width: float, split: int, dropout: float) -> nn.Module:
    """A lighter head: two 3x3 conv blocks (2C channels), global average pooling, one linear layer."""
    c = 2 * channels
    return init_xavier(nn.Sequential(
        *conv_bn_relu(channels, c), nn.MaxPool2d(2, ceil_mode=True), *conv_bn_relu(c, c),  # ceil: a 1x1 map (split 5) stays 1x1
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes),
    ))


def vgg16_wide_head(channels: int, num_classes: int, width: float, split: int, dropout: float) -> nn.Module:
    """A larger head: the rest of VGG16-BN at twice the run's width (about 4x vgg16's parameters), a model structure the run never trained."""
    return init_xavier(Classifier(num_classes, 2 * width, split, dropout, channels))


HEADS = {"vgg16": vgg16_head, "small": small_head, "vgg16-wide": vgg16_wide_head}


def build_head(name: str, features: dict, obfuscator: dict, num_classes: int, dropout: float) -> nn.Module:
    if name not in HEADS:
        raise StoreError(f"unknown head '{name}'; valid: {', '.join(HEADS)}")
    return HEADS[name](features["shape"][0], num_classes, obfuscator["width"], obfuscator["split"], dropout)


@dataclass
class HeadConfig:
    head: str = "vgg16"
    """vgg16 (the paper's classifier g, the rest of VGG16-BN) | small (two conv blocks and a linear layer) | vgg16-wide (vgg16 at twice the width)."""
    epochs: int = 30
    """Passes over the store."""
    batch_size: int = 128
    """Items per optimisation step."""
    lr: float = 2e-3
    """Peak learning rate (Adam, one-cycle: linear warm-up, then cosine to 0)."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    dropout: float = 0.0
    """Dropout before each hidden linear layer of the head."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    shift: int = 4
    """Random shift of each item by up to this many pixels of the input image (4: its 4-pixel crop), as shift // 2**split feature-map cells, zero-filled: none where one cell is larger."""
    memory_mb: int = 1024
    """Features held in memory at once (MiB); a larger store is read a few shards at a time, shuffled within them."""
    seed: int = 0
    """Seed of initialisation, shard order, batch order and shifts."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    channels_last: str = "auto"
    """NHWC layout of the head (auto | on | off; auto: on for CPU and CUDA, where it runs faster)."""
    precision: str = "auto"
    """auto | fp32 | bf16: bf16 autocast for the head's forward passes (weights, optimiser and loss stay float32);
    auto picks as train.precision does (bf16 on a CUDA device that has it, fp32 on a CPU). summary.json records it."""
    progress: bool = True
    """Show progress bars."""


def check_head_config(cfg: HeadConfig) -> None:
    if cfg.head not in HEADS:
        raise StoreError(f"--head must be one of {', '.join(HEADS)}, got '{cfg.head}'")
    for key in ("epochs", "batch_size", "memory_mb"):
        if getattr(cfg, key) < 1:
            raise StoreError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if str(cfg.channels_last).lower() not in ("auto", *ON, *OFF):
        raise StoreError(f"--channels-last must be auto, on or off, got '{cfg.channels_last}'")
    if cfg.precision not in PRECISIONS:
        raise StoreError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{cfg.precision}'")
    if cfg.shift < 0:
        raise StoreError(f"--shift must be >= 0 pixels, got {cfg.shift}")
    for key, ok, want in (("lr", cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
                          ("dropout", 0 <= cfg.dropout < 1, "in [0, 1)"), ("label_smoothing", 0 <= cfg.label_smoothing < 1, "in [0, 1)")):
        value = getattr(cfg, key)
        if not math.isfinite(value) or not ok:  # NaN fails every comparison, inf passes some
            raise StoreError(f"--{key.replace('_', '-')} must be a finite number {want}, got {value}")
    if not 0 <= cfg.seed < 2**32:
        raise StoreError(f"--seed must be in 0..2**32-1, got {cfg.seed}")


def shift_cells(pixels: int, split: int) -> int:
    """A shift of the image by up to `pixels` as feature-map cells at `split`: one cell is 2**split pixels
    (the obfuscator's 2x2 pools), so 4 pixels are 1 cell at split 2 and 0 (no shift) at splits 3 to 5."""
    return pixels >> split


def trained_shift_cells(summary: dict, config: dict) -> int:
    """The shift in cells a classifier directory was trained with: its summary's shift_cells, or, for one
    written before the shift was given in pixels, its config.yaml's shift (then counted in cells; default 1)."""
    return int(summary["shift_cells"]) if "shift_cells" in summary else int(config.get("shift", 1))


# ----------------------------------------------------------------------------- reading a store for training


def shard_groups(data: StoreDataset, memory_mb: int, generator: torch.Generator | None):  # noqa: ANN201
    """Yield (features, labels) of groups of whole shards that fit memory_mb, shards in random order if a generator is given."""
    manifest, n = data.manifest, data.num_shards
    per_group = max(1, (memory_mb << 20) // max(1, _item_bytes(manifest) * manifest["shard_size"]))
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for g in range(0, n, per_group):
        shards = [data.shard(i) for i in order[g : g + per_group]]
        yield torch.cat([s["features"] for s in shards]), torch.cat([s["labels"] for s in shards])


def _dtype(manifest: dict) -> torch.dtype:
    """The features' type once read (a quantised store's codes are read back as float32)."""
    return torch.float32 if manifest["features"].get("bits") else DTYPES[manifest["features"]["dtype"]]


def random_shift(features: torch.Tensor, cells: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each feature map by up to `cells` in x and y, zero-filled: the image's random crop, seen after the obfuscator.

    The obfuscator is convolutions and 2x2 pools, so shifting an image by 2**split pixels shifts
    its feature map by about one cell (exactly, away from the borders). 0 cells: the features as
    they are, and nothing drawn from the generator.
    """
    if cells == 0:
        return features
    n, c, h, w = features.shape
    padded = F.pad(features, (cells, cells, cells, cells))
    dy = torch.randint(0, 2 * cells + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * cells + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # n x 1 x h x 1
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # n x 1 x 1 x w
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def store_accuracy(head: nn.Module, data: StoreDataset, device: torch.device, batch_size: int = 500, precision: str = "fp32") -> float:
    head.eval()
    correct, total = 0, 0
    for k in range(data.num_shards):
        shard = data.shard(k)
        for s in range(0, len(shard["labels"]), batch_size):
            with autocast(precision, device):
                logits = head(shard["features"][s : s + batch_size].to(device).float())
            correct += (logits.argmax(1).cpu() == shard["labels"][s : s + batch_size]).sum().item()
            total += len(logits)
    return correct / max(1, total)


def _same_store_kind(train: dict, test: dict, test_path: Path) -> None:
    check_fingerprint(test, train["obfuscator"]["fingerprint"], str(test_path), "the training store")
    for key, a, b in (("classes", train["dataset"]["classes"], test["dataset"]["classes"]), ("feature shape", train["features"]["shape"], test["features"]["shape"])):
        if a != b:
            raise StoreError(f"{test_path}: {key} {b} differ from the training store's {a}")


# ----------------------------------------------------------------------------- training


def kept_epoch(metrics: list[dict]) -> dict:
    """The epoch a classifier is scored at, from its per-epoch records: the one with the best val_accuracy (the earliest
    of equals) when they have one, else the last; with its validation and test accuracy (None where not read)."""
    best = max(metrics, key=lambda r: (r["val_accuracy"], -r["epoch"])) if "val_accuracy" in metrics[0] else metrics[-1]
    return {"kept_epoch": best["epoch"], "kept_val_accuracy": best.get("val_accuracy"), "kept_test_accuracy": best.get("test_accuracy")}


def kept_accuracy(summary: dict) -> float | None:
    """The test accuracy of the head a classifier directory kept (summaries written before heads were picked on a
    validation store kept the last epoch's)."""
    return summary.get("kept_test_accuracy", summary.get("final_test_accuracy"))


def _other_store(path: str | Path, train: dict, progress: bool) -> tuple[dict, StoreDataset]:
    """A test or validation store, checked in full and against the training store's obfuscator, classes and shape."""
    manifest = verify(path, progress=progress)
    _same_store_kind(train, manifest, Path(path))
    return manifest, open_store(path, dtype=None, cache_shards=1)


def train_classifier(store: str | Path, out: str | Path, cfg: HeadConfig, test_store: str | Path | None = None, log=print,  # noqa: ANN001
                     val_store: str | Path | None = None) -> dict:
    """Train a classifier head on a store's features alone; report accuracy on a test store. With a validation store,
    keep the head of the epoch that reads it best (module docstring). Returns the summary."""
    check_head_config(cfg)
    out = Path(out)
    if (out / "classifier.safetensors").exists() or (out / "config.yaml").exists():
        raise StoreError(f"{out} already holds a classifier; choose another --out")
    manifest = verify(store, progress=cfg.progress)  # every checksum, before anything is trained on it
    data = open_store(store, dtype=None, cache_shards=1)  # the reader users get (veil.open_store), a shard at a time
    test_manifest, test_data = _other_store(test_store, manifest, cfg.progress) if test_store is not None else (None, None)
    val_manifest, val_data = _other_store(val_store, manifest, cfg.progress) if val_store is not None else (None, None)
    device = resolve_device(cfg.device)
    classes = manifest["dataset"]["classes"]
    split = manifest["obfuscator"]["split"]
    cells = shift_cells(cfg.shift, split)
    precision, precision_why = resolve_precision(cfg.precision, device), precision_note(cfg.precision, device, "--precision bf16")
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, manifest["features"], manifest["obfuscator"], len(classes), cfg.dropout)
    layout = memory_format(cfg.channels_last, device)
    head.to(device, memory_format=layout)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    n = manifest["count"]
    steps_per_epoch = max(1, n // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    log(f"veil train-classifier: {n} items of {manifest['dataset']['name']} ({manifest['dataset']['split']}), head {cfg.head}, "
        f"{sum(p.numel() for p in head.parameters()):,} parameters, {cfg.epochs} epochs, "
        f"shift {cfg.shift} px = {cells} cell{'' if cells == 1 else 's'} of {1 << split} px, device {device}, "
        f"{precision_why}")
    # Small stores are read once; larger ones a few shards at a time, every epoch.
    cached = None
    if len(manifest["shards"]) <= 1 or n * _item_bytes(manifest) <= cfg.memory_mb << 20:
        cached = next(shard_groups(data, 1 << 40, None))
    step, metrics, start = 0, [], time.perf_counter()
    kept_weights = None  # the head of the epoch kept_epoch picks so far (with a validation store)
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        sums, seen, t0 = torch.zeros(2), 0, time.perf_counter()
        groups = [cached] if cached is not None else shard_groups(data, cfg.memory_mb, generator)
        with progress_bar(steps_per_epoch, f"epoch {epoch}", cfg.progress) as bar:
            for features, labels in groups:
                order = torch.randperm(len(labels), generator=generator)
                # Drop a last partial batch: BatchNorm at 1x1 spatial size cannot train on one item.
                stop = len(order) - len(order) % cfg.batch_size if len(order) > cfg.batch_size else len(order)
                for s in range(0, stop, cfg.batch_size):
                    idx = order[s : s + cfg.batch_size]
                    x = features[idx].float()
                    x = random_shift(x, cells, generator)  # 0 cells: unchanged
                    x, y = x.to(device, memory_format=layout), labels[idx].to(device)
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * onecycle_factor(min(step, total_steps - 1), total_steps)
                    with autocast(precision, device):
                        logits = head(x).float()
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if not torch.isfinite(loss):
                        raise StoreError(f"non-finite loss in epoch {epoch}; lower --lr")
                    sums += torch.stack([loss.detach().cpu() * len(y), (logits.argmax(1) == y).sum().cpu().float()])
                    seen += len(y)
                    step += 1
                    bar.update(1)
        record = {"epoch": epoch, "loss": sums[0].item() / max(1, seen), "train_accuracy": sums[1].item() / max(1, seen)}
        if test_manifest is not None:
            record["test_accuracy"] = store_accuracy(head, test_data, device, precision=precision)
        if val_data is not None:
            record["val_accuracy"] = store_accuracy(head, val_data, device, precision=precision)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        metrics.append(record)
        if val_data is not None and kept_epoch(metrics)["kept_epoch"] == epoch:
            kept_weights = {k: v.detach().clone() for k, v in head.state_dict().items()}
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics))
        log("  ".join([f"[{epoch}/{cfg.epochs}]", f"loss {record['loss']:.3f}", f"train_accuracy {record['train_accuracy']:.2%}"]
                      + ([f"test_accuracy {record['test_accuracy']:.2%}"] if "test_accuracy" in record else [])
                      + ([f"val_accuracy {record['val_accuracy']:.2%}"] if "val_accuracy" in record else []) + [f"{record['seconds']:.1f}s"]))

    kept = kept_epoch(metrics)
    if kept_weights is not None:
        head.load_state_dict(kept_weights)
    save_tensors(out / "classifier.safetensors", head.state_dict())
    atomic_write_json(out / "classifier.json", {
        "head": cfg.head,
        "classes": classes,
        "dropout": cfg.dropout,
        "shift_pixels": cfg.shift,
        "shift_cells": cells,
        "epoch": kept["kept_epoch"],
        "features": manifest["features"],
        "obfuscator": manifest["obfuscator"],
        "train_store": {"dataset": manifest["dataset"], "count": n},
        "test_store": None if test_manifest is None else {"dataset": test_manifest["dataset"], "count": test_manifest["count"]},
        "val_store": None if val_manifest is None else {"dataset": val_manifest["dataset"], "count": val_manifest["count"]},
    })
    summary = {
        "head": cfg.head,
        "train_items": n,
        "final_train_accuracy": metrics[-1]["train_accuracy"],
        "final_test_accuracy": metrics[-1].get("test_accuracy"),
        "test_items": None if test_manifest is None else test_manifest["count"],
        "val_items": None if val_manifest is None else val_manifest["count"],
        **kept,
        "epochs": cfg.epochs,
        "shift_pixels": cfg.shift,
        "shift_cells": cells,
        "precision": precision_why,
        "seconds": round(time.perf_counter() - start, 1),
        "seed": cfg.seed,
        "veil_version": __version__,
        "torch_version": torch.__version__,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _item_bytes(manifest: dict) -> int:
    return torch.empty((), dtype=_dtype(manifest)).element_size() * int(torch.tensor(manifest["features"]["shape"]).prod())


# ----------------------------------------------------------------------------- predicting


@dataclass
class Prediction:
    item: str  # the image's path as given, or the store item's opaque id (hex)
    label: int
    name: str
    confidence: float  # softmax probability of the predicted class
    true_label: int | None = None


def load_classifier(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """A classifier directory written by train_classifier: the head in eval mode and its classifier.json."""
    path = Path(path)
    meta_path = path / "classifier.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a classifier directory (no classifier.json; made by `veil train-classifier`)")
    try:
        meta = json.loads(meta_path.read_text())
        head = build_head(meta["head"], meta["features"], meta["obfuscator"], len(meta["classes"]), meta["dropout"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: damaged ({e})") from None
    load_module(head, path / "classifier.safetensors")
    return head.to(device).eval(), meta


def _classifier_for(run, classifier_dir: str | Path | None, device: torch.device) -> tuple[nn.Module, list[str], str]:  # noqa: ANN001
    """The run's own classifier, or one trained from a store made by this run's obfuscator."""
    fp = fingerprint(run.obfuscator)
    if classifier_dir is None:
        return run.classifier, run.class_names or [str(i) for i in range(run.num_classes)], fp
    head, meta = load_classifier(classifier_dir, device)
    if meta["obfuscator"]["fingerprint"] != fp:
        raise StoreError(f"{classifier_dir}: trained on features of obfuscator {meta['obfuscator']['fingerprint'][:16]}..., "
                         f"but {run.path} has obfuscator {fp[:16]}...")
    return head, meta["classes"], fp


def _predictions(logits: torch.Tensor, items: list[str], classes: list[str], true: torch.Tensor | None) -> list[Prediction]:
    probs = logits.float().softmax(1).cpu()
    conf, label = probs.max(1)
    return [
        Prediction(items[i], int(label[i]), classes[int(label[i])] if int(label[i]) < len(classes) else str(int(label[i])), float(conf[i]),
                   None if true is None else int(true[i]))
        for i in range(len(items))
    ]


def _label_map(store_classes: list[str], classes: list[str], store: str | Path) -> torch.Tensor:
    """Store label -> the classifier's index of the same class name (a store's labels index its own class list),
    so that a prediction is compared with the item's class by name; a store class the classifier lacks is refused."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in store_classes if name not in index]
    if unknown:
        raise StoreError(f"{store}: class{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:5]))} of the store "
                         f"{'are' if len(unknown) > 1 else 'is'} not among the classifier's {len(classes)} classes ({', '.join(classes[:10])}"
                         f"{', ...' if len(classes) > 10 else ''}); its predictions cannot be scored against the store's labels")
    return torch.tensor([index[name] for name in store_classes], dtype=torch.int64)


@torch.inference_mode()
def predict(run_dir: str | Path, images: list[str] | None = None, store: str | Path | None = None, classifier: str | Path | None = None,
            device: str = "auto", batch_size: int = 500) -> list[Prediction]:
    """Class and confidence of image files (obfuscator, then classifier) or of a store's items (classifier only).
    A store item's true_label is its class as the classifier numbers it (matched by name: the store may list its
    classes in another order, or fewer of them); a store with a class the classifier lacks is refused."""
    if (images and store) or not (images or store):
        raise StoreError("give image files or --store STORE (not both)")
    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    head, classes, fp = _classifier_for(run, classifier, dev)
    out: list[Prediction] = []
    if store is not None:
        manifest = verify(store, fingerprint=fp)  # a store from another obfuscator is refused here
        to_classifier = _label_map(manifest["dataset"]["classes"], classes, store)
        data = open_store(store, dtype=None, cache_shards=1)
        for k in range(data.num_shards):
            shard = data.shard(k)
            for s in range(0, len(shard["labels"]), batch_size):
                logits = head(shard["features"][s : s + batch_size].to(dev).float())
                ids = [row.numpy().tobytes().hex() for row in shard["ids"][s : s + batch_size]]
                out += _predictions(logits, ids, classes, to_classifier[shard["labels"][s : s + batch_size]])
        return out
    size = run.config.data.image_size
    mode = "L" if run.channels == 1 else "RGB"
    # Images the size of the run's data or smaller are zero-padded (as 28x28 digits are), larger ones
    # resized; a run trained on an image folder saw every image resized, so predict resizes too.
    pad_small = run.config.data.dataset != "folder"
    for s in range(0, len(images), batch_size):
        paths = images[s : s + batch_size]
        arrays = []
        for p in paths:
            if not Path(p).is_file():
                raise StoreError(f"image not found: {p}")
            arr = load_image(Path(p), mode, size, pad_small)
            arrays.append(to_tensor_images(arr[None], size, p)[0])
        x = to_float(torch.stack(arrays).to(dev))
        out += _predictions(head(run.obfuscator(x)), list(paths), classes, None)
    return out


def accuracy_of(predictions: list[Prediction]) -> float | None:
    known = [p for p in predictions if p.true_label is not None]
    return sum(p.label == p.true_label for p in known) / len(known) if known else None
