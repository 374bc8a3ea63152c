"""`veil growth`: is a feature store worth more than its labels? The paper's reason for keeping one, measured.

A store is worth keeping if a model trained on it *later* can learn more than the model that made it.
`growth(run_dir, settings)` stores the run's defender images (N items) through its final obfuscator,
and the same with the later images appended (N + M: training images that neither f nor the attacker
saw, data.n_later), trains the store classifier on each (one per head given) and scores it on the
stored test images. Beside it, on the same images: the image store (the whole VGG16 trained on the
raw images with the store classifier's optimiser, schedule and epochs), the label store (the
class the run's undefended classifier reads from each test image: one byte, it cannot grow) and its
variant the logits store (that classifier's logits as float16, an MLP trained on them at N and N + M).
Into RUN/growth/:

    inputs.json                       the obfuscator's fingerprint, N, M and the data they were drawn from
    stores/defender, stores/defender+later, stores/test (and stores/val)   deleted at the end unless keep_stores
    classifiers/store-HEAD-n/, classifiers/store-HEAD-n+m/   `veil train-classifier` directories
    classifiers/image-n/, classifiers/image-n+m/             settings.json, metrics.jsonl, the weights, summary.json
                                      (or in --image-dir, shared by measurements on the same data)
    classifiers/logits-n/, classifiers/logits-n+m/           the logits store's MLP: summary.json
    growth.json, growth.md            per store: accuracy at N and at N + M, gain, growth ratio, bytes per item

The growth ratio is a store's gain divided by the image store's gain (the image store's is 1 by
construction). Each classifier is scored at its last epoch, or, with `validation`, at the epoch that reads
the validation split best (the test images data.n_test left out of the users': never trained on, attacked or
scored; stores/val is their store): the same rule for every store, so that one whose classifier over-fits its
kept draws is not scored after it has. growth.json keeps the last epoch's accuracies beside the picked ones.
Every classifier directory is kept: a rerun skips each one finished with the same
settings and trains again one that is missing, half made or made otherwise. The stores are made only
when a classifier still needs them; a half-made one is resumed by `veil obfuscate` (and its append).
A growth folder made from another obfuscator is refused.

With data.task set, the run's networks learnt the task's coarse labels while the stores, the image
store and the test keep the fine ones: the label store's accuracy is then that of reading each
stored coarse class as the fine class most frequent in it among the defender images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from veil import runtime
from veil.config import Config
from veil.data import ImageSet, Splits, load_splits, task_table
from veil.data import fingerprint as data_fingerprint
from veil.defences import PRETRAIN
from veil.errors import StoreError
from veil.io import atomic_write_json, atomic_write_text, save_tensors
from veil.models import build_networks
from veil.models.obfuscator import fingerprint
from veil.progress import progress_bar
from veil.rundir import Run, load_run
from veil.runtime import read_classes, read_logits, resolve_device, resolve_precision
from veil.store.classify import HEADS, HeadConfig, check_head_config, kept_accuracy, kept_epoch, train_classifier
from veil.store.format import MANIFEST, STORED_DTYPES, read_manifest
from veil.store.obfuscate import obfuscate
from veil.train import Step, evaluate, make_optimizers, plan, pretrain_lr_factor, train_obfuscator_classifier
from veil.version import __version__

INPUTS, RESULT, TABLE = "inputs.json", "growth.json", "growth.md"
SIZES = ("n", "n+m")  # the two stores each classifier is trained on: the defender images, and those plus the later ones
HOW = ("device", "channels_last", "progress")  # HeadConfig fields that change how a classifier runs, not what it learns


@dataclass
class GrowthConfig:
    epochs: int = 30
    """Epochs of every classifier: each store classifier and the image store's VGG16."""
    heads: str = "vgg16"
    """Store classifier heads, comma-separated (veil train-classifier --head: vgg16, small, vgg16-wide)."""
    batch_size: int = 128
    """Items per optimisation step of every classifier (veil train-classifier's default)."""
    out: str = ""
    """Folder of the measurement ('' = RUN/growth)."""
    image_dir: str = ""
    """Folder of the image store's two classifiers ('' = OUT/classifiers). The image store does not depend on the
    obfuscator, so measurements of runs on the same data and settings can share it (veil sweep --growth does):
    a finished classifier there with the same settings is kept, one with other settings trained again."""
    validation: bool = False
    """Score every classifier (store, image and logits store) at the epoch with the best accuracy on the validation
    split (data.n_test's leftover test images) instead of at its last epoch."""
    keep_stores: bool = False
    """Keep the three stores at the end (by default deleted; a rerun that needs them makes them again)."""
    seed: int = 0
    """Seed of every classifier's initialisation, batch order and augmentation."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    progress: bool = True
    """Show progress bars."""


def head_names(settings: GrowthConfig) -> list[str]:
    heads = [h.strip() for h in settings.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in HEADS]
    if not heads or unknown:
        raise StoreError(f"--head: {', '.join(unknown) or 'none given'}; give one or more of {', '.join(HEADS)}, comma-separated")
    if len(set(heads)) != len(heads):
        raise StoreError(f"--head names a head twice: {settings.heads}")
    return heads


def head_config(settings: GrowthConfig, head: str) -> HeadConfig:
    """The store classifier of one head: veil train-classifier's defaults but for the head, epochs, batch, seed and device."""
    return HeadConfig(head=head, epochs=settings.epochs, batch_size=settings.batch_size, seed=settings.seed, device=settings.device,
                      progress=settings.progress)


# ----------------------------------------------------------------------------- the folder's inputs


def _images_digest(images: ImageSet) -> str:
    h = hashlib.sha256()
    h.update(images.images.cpu().contiguous().numpy().tobytes())
    h.update(images.labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_made_from(out: Path, run_dir: Path, fp: str) -> dict | None:
    """out/inputs.json as written by an earlier call (None if there is none); refused, naming it, when it was made
    from another obfuscator (the run retrained since, or another run's folder)."""
    path = out / INPUTS
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not readable JSON ({e}); remove {out} to measure again") from None
    if old.get("obfuscator_fingerprint") != fp:
        raise StoreError(f"{path}: this growth folder was made from obfuscator {str(old.get('obfuscator_fingerprint'))[:16]}..., but {run_dir} "
                         f"has obfuscator {fp[:16]}...; remove {out} or give another --out")
    return old


def check_inputs(out: Path, run_dir: Path, fp: str, splits: Splits) -> dict:
    """out/inputs.json: what this folder measures. Written on the first call; later calls must match it."""
    inputs = {"run": str(run_dir), "obfuscator_fingerprint": fp, "data_fingerprint": data_fingerprint(splits),
              "later_fingerprint": _images_digest(splits.later), "n": len(splits.defender), "m": len(splits.later), "test_items": len(splits.test)}
    old = check_made_from(out, run_dir, fp)
    if old is not None:
        for key in ("data_fingerprint", "later_fingerprint", "n", "m", "test_items"):
            if old.get(key) != inputs[key]:
                raise StoreError(f"{out / INPUTS}: made on other images ({key}: {old.get(key)} -> {inputs[key]}); remove {out} or give another --out")
        return old
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / INPUTS, inputs)
    return inputs


# ----------------------------------------------------------------------------- the stores


def _appended(path: Path, fp: str, n: int, m: int) -> bool:
    """The N + M store is whole: N defender items and the M later ones appended, by this obfuscator."""
    if not (path / MANIFEST).is_file():
        return False
    manifest = read_manifest(path)
    if manifest["obfuscator"]["fingerprint"] != fp:
        raise StoreError(f"{path / MANIFEST}: a store of obfuscator {manifest['obfuscator']['fingerprint'][:16]}..., not of this run's {fp[:16]}...; "
                         f"remove {path}")
    later = [a for a in manifest.get("appends", []) if a["dataset"]["split"] == "later"]
    if manifest["complete"] and manifest["count"] == n + m and later and later == manifest["appends"][-1:] and later[0]["count"] == m:
        return True
    if manifest["complete"] and manifest["count"] != n:  # neither the defender part nor the whole: not ours to finish
        shutil.rmtree(path)
    return False


def make_stores(run_dir: Path, out: Path, fp: str, n: int, m: int, classes: list[str], seed: int, device: str, log,  # noqa: ANN001
                validation: bool = False) -> dict[str, Path]:
    """out/stores/: the defender store (N items), the same with the later images appended (N + M), the test store and,
    with validation, the validation store. Each is resumed where a kill left it; one already whole is left as it is."""
    stores = out / "stores"
    paths = {"n": stores / "defender", "n+m": stores / "defender+later", "test": stores / "test"} | ({"val": stores / "val"} if validation else {})
    quiet = lambda *_: None  # noqa: E731
    torch.manual_seed(seed)  # the noise defence draws its noise while storing
    for key, spec in (("n", "run:defender"), ("test", "run:test")) + ((("val", "run:validation"),) if validation else ()):
        obfuscate(run_dir, spec, paths[key], device=device, progress=False, log=quiet)
    if not _appended(paths["n+m"], fp, n, m):
        obfuscate(run_dir, "run:defender", paths["n+m"], device=device, progress=False, log=quiet)
        obfuscate(run_dir, "run:later", append=paths["n+m"], device=device, progress=False, log=quiet)
    for key, path in paths.items():
        manifest = read_manifest(path)
        want = {"n": n, "n+m": n + m}.get(key, manifest["count"])
        if manifest["count"] != want or manifest["dataset"]["classes"] != classes:
            raise StoreError(f"{path / MANIFEST}: {manifest['count']} items of classes {manifest['dataset']['classes']}, expected {want} of {classes}")
    log(f"veil growth: stores in {stores} (defender {n}, defender + later {n + m}, test{', validation' if validation else ''})")
    return paths


def bytes_per_item(manifest: dict) -> int:
    """What one stored feature map takes: its values times the stored type's bytes (labels and ids aside)."""
    values = int(np.prod(manifest["features"]["shape"]))
    return values * torch.empty((), dtype=STORED_DTYPES[manifest["features"]["dtype"]]).element_size()


# ----------------------------------------------------------------------------- classifiers


def finished_store_classifier(d: Path, want: HeadConfig, fp: str, n_train: int, n_test: int, n_val: int | None = None) -> dict | None:
    """d's summary when it is a finished `veil train-classifier` directory made with `want` (every field but HOW) on
    n_train items of this obfuscator's store, scored on n_test, its epoch picked on n_val validation items (None: the
    last epoch kept); else None (missing, half made, damaged or made otherwise)."""
    try:
        summary = json.loads((d / "summary.json").read_text())
        meta = json.loads((d / "classifier.json").read_text())
        saved = yaml.safe_load((d / "config.yaml").read_text()) or {}
        same = all(saved.get(k) == v for k, v in asdict(want).items() if k not in HOW)
        if (same and meta["obfuscator"]["fingerprint"] == fp and summary["train_items"] == n_train and summary["test_items"] == n_test
                and summary.get("val_items") == n_val):
            return summary
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        pass
    return None


def image_config(run_cfg: Config, head: HeadConfig) -> Config:
    """The image store's classifier: what `veil train` pretrains with model.split=2 model.bottleneck=none
    model.feature_bits=0 (the run's f at the paper's cut, no defence layer, then g: the whole VGG16), on the store
    classifier's settings (Adam, one-cycle, its learning rate, weight decay, batch, dropout, label smoothing and
    epochs), with veil.data's crop (and flip, for natural images)."""
    model = dataclasses.replace(run_cfg.model, split=2, bottleneck="none", bottleneck_channels=0, feature_bits=0, dropout=head.dropout,
                                reconstructor="simrec")  # r is built beside f and g, never trained: the smallest one
    train = dataclasses.replace(
        run_cfg.train, defence="none", optimizer="adam", lr_obfuscator=head.lr, lr_classifier=head.lr, weight_decay=head.weight_decay,
        batch_size=head.batch_size, label_smoothing=head.label_smoothing, pretrain_schedule="onecycle", pretrain_epochs=head.epochs,
        precision=head.precision, channels_last=head.channels_last, compile=False,
    )
    return dataclasses.replace(run_cfg, model=model, train=train, data=dataclasses.replace(run_cfg.data, augment=True), seed=head.seed,
                               device=head.device, progress=head.progress)


def image_settings(cfg: Config, natural: bool, n_train: int, n_test: int, n_val: int | None = None) -> dict:
    """What an image classifier learns from (a finished one with other settings is trained again). The precision is
    the one `auto` resolves to on this device: an image store made in bf16 is not reused where auto means fp32.
    n_val: validation images its epoch is picked on (None: the last epoch; then the key is absent, as it was before)."""
    t = cfg.train
    return ({"val_items": n_val} if n_val is not None else {}) | {"model": asdict(cfg.model), "optimizer": t.optimizer, "lr": t.lr_obfuscator, "weight_decay": t.weight_decay, "batch_size": t.batch_size,
            "label_smoothing": t.label_smoothing, "schedule": t.pretrain_schedule, "epochs": t.pretrain_epochs,
            "precision": resolve_precision(t.precision, resolve_device(cfg.device)),
            "augment": "crop+flip" if natural else "crop",
            "seed": cfg.seed, "train_items": n_train, "test_items": n_test}


def finished_summary(d: Path, want: dict) -> dict | None:
    """d/summary.json when it was made with the settings `want` (an image store's or a logits store's classifier), else None."""
    try:
        summary = json.loads((d / "summary.json").read_text())
        return summary if summary.get("settings") == want else None
    except (OSError, ValueError):
        return None


def train_image_classifier(images: ImageSet, test: ImageSet, natural: bool, cfg: Config, out: Path, val: ImageSet | None = None) -> dict:
    """Train the whole VGG16 from scratch on raw images: `veil train`'s pretraining (train_obfuscator_classifier and
    evaluate, seeded per epoch as a run's steps are) for cfg.train.pretrain_epochs epochs. With `val`, each epoch is
    read on it too and the summary names the epoch that reads it best (kept_epoch, kept_test_accuracy; the weights
    saved are the last epoch's). Writes out/ and returns its summary."""
    device = resolve_device(cfg.device)
    rt = runtime.resolve(cfg, device)
    settings = image_settings(cfg, natural, len(images), len(test), None if val is None else len(val))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "settings.json", settings)
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg.model, images.images.shape[1], len(images.classes), cfg.data.image_size, None, cfg.seed)  # r: built, never trained
    runtime.prepare_networks(nets, rt)
    opt = make_optimizers(nets, cfg.train)[PRETRAIN]
    data, test = images.to(device), test.to(device)
    val = None if val is None else val.to(device)
    n_epochs, batch = cfg.train.pretrain_epochs, cfg.train.batch_size
    steps_per_epoch = max(1, len(data) // batch) if len(data) > batch else 1
    metrics, start = [], time.perf_counter()
    for epoch in range(1, n_epochs + 1):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch - 1)  # as a run's step: (seed, index) alone
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch - 1)
        t0 = time.perf_counter()
        with progress_bar(steps_per_epoch, f"{out.name} e{epoch}", cfg.progress) as bar:
            record = train_obfuscator_classifier(nets, opt, data, natural, cfg, generator, Step(PRETRAIN, 0, epoch), None,
                                                 pretrain_lr_factor("onecycle", epoch, n_epochs, steps_per_epoch), bar, rt)
        record.update(evaluate(nets, test, cfg.train.eval_batch_size, with_reconstructor=False, rt=rt))
        if val is not None:
            record["val_accuracy"] = evaluate(nets, val, cfg.train.eval_batch_size, with_reconstructor=False, rt=rt)["test_accuracy"]
        metrics.append({"epoch": epoch, **record, "seconds": round(time.perf_counter() - t0, 3)})
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics))
    save_tensors(out / "obfuscator.safetensors", nets["obfuscator"].state_dict())
    save_tensors(out / "classifier.safetensors", nets["classifier"].state_dict())
    summary = {"settings": settings, "train_items": len(images), "test_items": len(test), "final_train_accuracy": metrics[-1]["train_accuracy"],
               "final_test_accuracy": metrics[-1]["test_accuracy"], **kept_epoch(metrics), "epochs": n_epochs, "seconds": round(time.perf_counter() - start, 1),
               "seed": cfg.seed, "veil_version": __version__, "torch_version": torch.__version__}
    atomic_write_json(out / "summary.json", summary)  # last: a directory without it is half made
    return summary


@torch.no_grad()
def label_store(run: Run, splits: Splits, batch_size: int) -> dict:
    """The label store: the run's undefended classifier's class of each test image. Its accuracy is that classifier's
    test accuracy; under a data.task its coarse class is read as the fine class most frequent in it among the
    defender images (task_accuracy: against the coarse labels)."""
    g = run.undefended_classifier
    predicted = read_classes(run.undefended_obfuscator, g, splits.test.images.to(next(g.parameters()).device), batch_size).cpu()
    truth = splits.test.labels
    task = run.config.data.task
    if task == "none":
        return {"accuracy": int((predicted == truth).sum()) / len(truth), "task_accuracy": None}
    table, _ = task_table(task, splits.test.classes, splits.name)
    fine = splits.defender.labels
    groups = int(table.max()) + 1
    decode = torch.stack([torch.bincount(fine[table[fine] == c], minlength=len(table)).argmax() for c in range(groups)])
    return {"accuracy": int((decode[predicted] == truth).sum()) / len(truth), "task_accuracy": int((predicted == table[truth]).sum()) / len(truth)}


LOGITS_HIDDEN = 256  # the logits store's classifier: an MLP of two hidden layers on the kept logits


def logits_settings(head: HeadConfig, n_logits: int, n_train: int, n_test: int, n_val: int | None = None) -> dict:
    return ({"val_items": n_val} if n_val is not None else {}) | {"model": f"mlp {n_logits}-{LOGITS_HIDDEN}-{LOGITS_HIDDEN}-classes", "kept_as": "float16", "optimizer": "adam", "schedule": "torch OneCycleLR",
            "lr": head.lr, "weight_decay": head.weight_decay, "batch_size": head.batch_size, "epochs": head.epochs, "seed": head.seed,
            "train_items": n_train, "test_items": n_test}


def train_logits_classifier(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int, head: HeadConfig,
                            out: Path, log=print, val: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:  # noqa: ANN001
    """An MLP trained from scratch on kept logits (x: N x K float) with the store classifier's Adam, peak learning rate,
    weight decay, batch and epochs, under torch's OneCycleLR (not train.onecycle_factor, the store classifier's own
    warm-up and cosine: the measured logits figures were made so); scored on test_x after every epoch, and on the
    validation logits and labels `val` if given (kept_epoch). Writes out/summary.json and returns it (a finished one
    with the same settings is kept)."""
    settings = logits_settings(head, x.shape[1], len(x), len(test_x), None if val is None else len(val[0]))
    done = finished_summary(out, settings)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    log(f"veil growth: training {out.name} (an MLP on {len(x)} kept logits)")
    began = time.perf_counter()
    torch.manual_seed(head.seed)
    h = LOGITS_HIDDEN
    mlp = nn.Sequential(nn.Linear(x.shape[1], h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, num_classes))
    opt = torch.optim.Adam(mlp.parameters(), lr=head.lr, weight_decay=head.weight_decay)
    steps = max(1, len(x) // head.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=head.lr, total_steps=steps * head.epochs)
    generator = torch.Generator().manual_seed(head.seed)
    metrics = []
    for epoch in range(1, head.epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps):
            batch = order[i * head.batch_size : (i + 1) * head.batch_size]
            loss = F.cross_entropy(mlp(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        with torch.no_grad():
            record = {"epoch": epoch, "test_accuracy": (mlp(test_x).argmax(1) == test_y).float().mean().item()}
            if val is not None:
                record["val_accuracy"] = (mlp(val[0]).argmax(1) == val[1]).float().mean().item()
        metrics.append(record)
    summary = {"settings": settings, "train_items": len(x), "test_items": len(test_x), "final_test_accuracy": metrics[-1]["test_accuracy"],
               **kept_epoch(metrics), "metrics": metrics, "epochs": head.epochs,
               "seconds": round(time.perf_counter() - began, 1), "seed": head.seed, "veil_version": __version__, "torch_version": torch.__version__}
    atomic_write_json(out / "summary.json", summary)
    return summary


def logits_store(run: Run, splits: Splits, later: ImageSet, head: HeadConfig, classifiers: Path, log=print,  # noqa: ANN001
                 validation: bool = False) -> tuple[dict[str, dict], int]:
    """The logits store, the label store's variant: the run's undefended classifier's logits of each image kept as
    float16, and an MLP trained on them at N and at N + M (train_logits_classifier; it can grow a little: how sure the
    classifier was says something the class does not), its epoch picked on the validation split's logits if asked.
    Returns {size: summary} for the two sizes, and the logits kept per item."""
    f, g = run.undefended_obfuscator, run.undefended_classifier
    device = next(g.parameters()).device
    read = lambda images: read_logits(f, g, images.to(device), run.config.train.eval_batch_size).half().float().cpu()  # noqa: E731
    defender, extra, test = read(splits.defender.images), read(later.images), read(splits.test.images)
    classes = len(splits.test.classes)
    x = {"n": defender, "n+m": torch.cat([defender, extra])}
    y = {"n": splits.defender.labels, "n+m": torch.cat([splits.defender.labels, later.labels])}
    val = (read(splits.validation.images), splits.validation.labels) if validation else None
    return {size: train_logits_classifier(x[size], y[size], test, splits.test.labels, classes, head, classifiers / f"logits-{size}", log, val)
            for size in SIZES}, test.shape[1]


# ----------------------------------------------------------------------------- the measurement


def _row(name: str, kind: str, bytes_item: int, dirs: list[str] | None, summaries: list[dict] | None = None, fixed: float | None = None) -> dict:
    """One store's line: from the summaries of its classifiers at N and N + M (the kept epoch's accuracy, beside the last
    epoch's), or, for a store that trains nothing (the label store), its one `fixed` accuracy at both sizes."""
    at_n, at_nm = (kept_accuracy(summaries[0]), kept_accuracy(summaries[1])) if summaries else (fixed, fixed)
    row = {"name": name, "kind": kind, "bytes_per_item": bytes_item, "accuracy_at_n": at_n, "accuracy_at_n_plus_m": at_nm,
           "gain": at_nm - at_n, "classifiers": dirs}
    if summaries:
        row |= {"kept_epochs": [s.get("kept_epoch", s.get("epochs")) for s in summaries],
                "last_epoch_accuracy_at_n": summaries[0]["final_test_accuracy"], "last_epoch_accuracy_at_n_plus_m": summaries[1]["final_test_accuracy"]}
    return row


def command_line(run_dir: Path, settings: GrowthConfig) -> str:
    parts = ["veil growth", str(run_dir), f"--epochs {settings.epochs}", f"--head {settings.heads}", f"--batch-size {settings.batch_size}",
             f"--seed {settings.seed}"] + (["--validation"] if settings.validation else [])
    return " ".join(parts + ([f"--out {settings.out}"] if settings.out else []) + ([f"--image-dir {settings.image_dir}"] if settings.image_dir else [])
                    + (["--keep-stores"] if settings.keep_stores else []))


def growth(run_dir: str | Path, settings: GrowthConfig, log=print) -> dict:  # noqa: ANN001
    """Measure how much each kind of store gains from the later images (module docstring); write growth.json and
    growth.md into settings.out (default RUN/growth) and return growth.json's content."""
    run_dir = Path(run_dir)
    heads = head_names(settings)
    for h in heads:
        check_head_config(head_config(settings, h))
    began = time.perf_counter()
    device = resolve_device(settings.device)
    run = load_run(run_dir, device)
    total = len(plan(run.config.train))
    if run.step < total:
        raise StoreError(f"{run_dir}: training has not finished (step {run.step} of {total}); finish it with `veil train --resume {run_dir}`")
    if run.undefended_obfuscator is None or run.undefended_classifier is None:
        raise StoreError(f"{run_dir}: no checkpoints/undefended/ obfuscator and classifier (the label store is their prediction)")
    fp = fingerprint(run.obfuscator)
    out = Path(settings.out) if settings.out else run_dir / "growth"
    check_made_from(out, run_dir, fp)  # before the data is read: another obfuscator's folder fails fast
    cfg = run.config
    splits = load_splits(cfg.data, cfg.seed)  # the fine labels, as the stores keep them
    later = splits.later  # refused when empty, naming data.n_defender and data.n_attacker
    n, m, n_test = len(splits.defender), len(later), len(splits.test)
    val = splits.validation if settings.validation else None  # refused when empty, naming data.n_test
    n_val = None if val is None else len(val)
    check_inputs(out, run_dir, fp, splits)
    log(f"veil growth: {run_dir} ({splits.name}{', task ' + cfg.data.task if cfg.data.task != 'none' else ''}): N = {n} defender images, "
        f"M = {m} later ones, {n_test} test images; heads {', '.join(heads)}, {settings.epochs} epochs each, "
        + (f"each scored at the epoch that reads {n_val} validation images best" if val is not None else "each scored at its last epoch"))
    classifiers = out / "classifiers"
    stores: dict[str, Path] | None = None
    results: dict[str, dict] = {}

    for h in heads:
        want = head_config(settings, h)
        for size, n_train in zip(SIZES, (n, n + m)):
            d = classifiers / f"store-{h}-{size}"
            summary = finished_store_classifier(d, want, fp, n_train, n_test, n_val)
            if summary is None:
                if stores is None:
                    stores = make_stores(run_dir, out, fp, n, m, splits.defender.classes, cfg.seed, settings.device, log, val is not None)
                shutil.rmtree(d, ignore_errors=True)  # half made, or made otherwise: trained again
                log(f"veil growth: training {d.name} on {n_train} stored items ({h} head)")
                summary = train_classifier(stores[size], d, want, test_store=stores["test"], log=lambda *_: None, val_store=stores.get("val"))
            else:
                log(f"veil growth: {d.name} already trained with these settings; kept")
            results[f"store-{h}-{size}"] = summary
    if stores is not None:
        bytes_store = bytes_per_item(read_manifest(stores["n"]))
        if not settings.keep_stores:
            shutil.rmtree(out / "stores")  # the classifiers are kept; a rerun that needs the stores makes them again
    else:
        meta = json.loads((classifiers / f"store-{heads[0]}-n" / "classifier.json").read_text())
        bytes_store = bytes_per_item({"features": meta["features"]})

    image_cfg = image_config(cfg, head_config(settings, "vgg16"))
    image_dir = Path(settings.image_dir) if settings.image_dir else classifiers
    for size, n_train in zip(SIZES, (n, n + m)):
        d = image_dir / f"image-{size}"
        summary = finished_summary(d, image_settings(image_cfg, splits.natural, n_train, n_test, n_val))
        if summary is None:
            shutil.rmtree(d, ignore_errors=True)
            images = splits.defender if size == "n" else ImageSet(torch.cat([splits.defender.images, later.images]),
                                                                  torch.cat([splits.defender.labels, later.labels]), later.classes)
            log(f"veil growth: training {d.name} (the whole VGG16) on {n_train} images")
            summary = train_image_classifier(images, splits.test, splits.natural, image_cfg, d, val)
        else:
            log(f"veil growth: {d.name} already trained with these settings; kept")
        results[f"image-{size}"] = summary

    labels = label_store(run, splits, cfg.train.eval_batch_size)
    pair = lambda key: [results[f"{key}-{s}"] for s in SIZES]  # noqa: E731 (a store's classifiers at N and N + M)
    rows = [_row(f"features, {h} head", "features", bytes_store, [f"classifiers/store-{h}-{s}" for s in SIZES], pair(f"store-{h}")) | {"head": h}
            for h in heads]
    image = _row("image (the whole VGG16)", "image", splits.test.images[0].numel(),
                 [str(image_dir / f"image-{s}") if settings.image_dir else f"classifiers/image-{s}" for s in SIZES], pair("image")) | {"head": "vgg16 (whole network)"}
    label = _row("label (the undefended classifier's class)", "label", 1, None, fixed=labels["accuracy"]) | {"head": None,
                                                                                                                            "task_accuracy": labels["task_accuracy"]}
    logits, n_logits = logits_store(run, splits, later, head_config(settings, "vgg16"), classifiers, log, val is not None)
    rows += [image, label, _row("logits (the undefended classifier's logits, float16)", "logits", 2 * n_logits,
                                [f"classifiers/logits-{s}" for s in SIZES], [logits[s] for s in SIZES])
             | {"head": f"mlp, {LOGITS_HIDDEN} x 2 hidden"}]
    for r in rows:
        # The image store's is exactly 1; `or 0.0`: no -0.0 for a store that did not move (the label store).
        r["growth_ratio"] = (r["gain"] / image["gain"]) or 0.0 if image["gain"] else None
    result = {
        "run": str(run_dir), "obfuscator_fingerprint": fp, "dataset": splits.name, "task": cfg.data.task, "classes": len(splits.test.classes),
        "n": n, "m": m, "test_items": n_test, "validation_items": n_val, "epochs": settings.epochs, "heads": heads, "stores": rows,
        "store_classifier": {k: v for k, v in asdict(head_config(settings, heads[0])).items() if k not in (*HOW, "head")},
        "command": command_line(run_dir, settings), "seed": settings.seed, "date": time.strftime("%Y-%m-%d"), "device": str(device),
        "seconds": round(time.perf_counter() - began, 1), "veil_version": __version__, "torch_version": torch.__version__,
    }
    atomic_write_json(out / RESULT, result)
    atomic_write_text(out / TABLE, markdown(result))
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def markdown(result: dict) -> str:
    lines = [
        f"# Growth of the stores of {result['run']}",
        "",
        f"{result['dataset']}{', trained on task ' + result['task'] if result['task'] != 'none' else ''}: N = {result['n']} defender images, "
        f"M = {result['m']} later images (never seen by the obfuscator or the attacker), scored on {result['test_items']} test images "
        f"({result['classes']} classes); every classifier {result['epochs']} epochs, seed {result['seed']}; "
        + (f"each scored at the epoch that reads the {result['validation_items']} validation images best (kept epochs at N and N + M in brackets; "
           "the last epoch's accuracies in growth.json)." if result.get("validation_items") else "each scored at its last epoch."),
        "",
        "| store | bytes per item | accuracy at N | accuracy at N + M | gain (points) | growth ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    picked = bool(result.get("validation_items"))
    for r in result["stores"]:
        ratio = "n/a" if r["growth_ratio"] is None else f"{r['growth_ratio']:.2f}"
        at = [_pct(r["accuracy_at_n"]), _pct(r["accuracy_at_n_plus_m"])]
        if picked and r.get("kept_epochs"):
            at = [f"{a} ({e})" for a, e in zip(at, r["kept_epochs"])]
        lines.append(f"| {r['name']} | {r['bytes_per_item']} | {at[0]} | {at[1]} | {100 * r['gain']:+.2f} | {ratio} |")
    lines += [
        "",
        "Growth ratio: a store's gain from the M later images divided by the image store's gain (the same training on the raw images).",
        "",
        f"`{result['command']}` ({result['date']}, {result['device']}, {result['seconds']:.0f} s, veil {result['veil_version']}, torch {result['torch_version']})",
        "",
    ]
    return "\n".join(lines)
