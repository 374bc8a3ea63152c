"""One config object for a Veil run: data, model, training; load, merge, validate, save.

A config file is YAML with the sections below. Every field has a one-line docstring (the
string under it) that doubles as documentation; `veil train --help-config` prints them all.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from veil.defences import DEFENCES, PHASE_B
from veil.errors import ConfigError
from veil.models.obfuscator import BOTTLENECKS, INPUT_NORMS, cut_channels
from veil.models.reconstructors import RECONSTRUCTORS, attackers, pool_names


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    """mnist | fashion-mnist | cifar10 | cifar100 | npz | folder."""
    data_dir: str = ""
    """Directory holding <dataset>/train.npz etc. or torchvision's files; '' = $VEIL_DATA_DIR or ./data."""
    path: str = ""
    """For dataset npz: the .npz file; for dataset folder: the folder with one sub-folder per class."""
    cache_dir: str = ""
    """Where decoded CIFAR-10 JPEGs are cached as uint8; '' = $VEIL_CACHE_DIR or ~/.cache/veil."""
    download: bool = False
    """Let torchvision download a named dataset into data_dir when no local copy is found."""
    image_size: int = 32
    """Side in pixels; 28x28 digits are zero-padded to 32x32, folder images are resized."""
    attacker_fraction: float = 0.2
    """Fraction of the training images set aside for the attacker (never seen by the defender)."""
    test_fraction: float = 0.2
    """For npz/folder data without a test split: fraction held out as the users' (test) images."""
    n_defender: int = 0
    """Keep at most this many defender-train images (0 = all)."""
    n_attacker: int = 0
    """Keep at most this many attacker-train images (0 = all)."""
    n_test: int = 0
    """Keep at most this many test images (0 = all)."""
    n_later: int = 0
    """Keep at most this many later images (0 = all): the training images in neither the defender nor the attacker
    split, never seen by f or the attacker; `veil growth` appends them to the defender store."""
    task: str = "none"
    """The labelling training uses (f, g and all of `veil train`), coarser than the dataset's: none | cifar10-superclass
    (vehicle: airplane, automobile, ship, truck; animal: the other six) | mnist-parity (even, odd) | groups of class
    indices, one per ';' and every class once (e.g. '0,1,8,9;2,3,4,5,6,7'). Stores and the attack keep the fine labels."""
    augment: bool = True
    """Random crop (4-pixel padding) on training batches, plus horizontal flip for natural images."""
    on_bad_image: str = "error"
    """An unreadable image file in a folder dataset: error (stop, naming it) | skip (leave it out, report the count)."""


@dataclass
class ModelConfig:
    width: float = 1.0
    """Channel multiplier for every network (1.0 = the paper's VGG16; 0.25 is CPU-sized)."""
    split: int = 2
    """Number of VGG16 blocks in the obfuscator (2 = conv64 conv64 pool conv128 conv128 pool; 5 = every block, 1x1
    maps for 32x32 images, the classifier is only the head)."""
    reconstructor: str = "simrec"
    """Training reconstructor of Table 1: simrec | urec1 | urec2 | resrec; or a pool, comma-separated, of those and
    the attack decoders (e.g. simrec,unet,resrec): each member trains on its own, a privacy term takes the strongest."""
    dropout: float = 0.5
    """Dropout before each hidden linear layer of the classifier head."""
    bottleneck: str = "none"
    """none | learned (a trained 1x1 convolution) | orthogonal (a fixed random orthogonal 1x1 projection, drawn from the seed): narrows the features to bottleneck_channels."""
    bottleneck_channels: int = 0
    """k, the channels a bottleneck keeps (1 .. the cut's channels); 0 with bottleneck none."""
    feature_bits: int = 0
    """Quantise the features to this many bits (1..16; straight-through in training); 0 = float features."""
    input_norm: str = "none"
    """none | image (subtract each image's mean, divide by its std, over all pixels and channels) | channel (the same
    per colour channel): the first step of f, so the features cannot tell an image's brightness, contrast or colour cast."""


@dataclass
class TrainConfig:
    defence: str = "adversarial"
    """adversarial (Algorithm 1) | nopeek | noise | none | reid | pool | classfloor | vib: the defence registry, veil/defences/."""
    lambda_privacy: float = 1.0
    """Lambda of Eq. 2: weight of the reconstruction PSNR (dB) against cross-entropy."""
    nopeek_alpha: float = 1.0
    """defence nopeek: weight of the distance correlation between images and features."""
    noise_sigma: float = 0.5
    """defence noise: standard deviation of the Gaussian noise added to the feature maps."""
    vib_beta: float = 0.01
    """defence vib: weight of the KL term (nats per item) against cross-entropy."""
    pretrain_epochs: int = 200
    """Epochs of obfuscator+classifier training on cross-entropy alone (Algorithm 1, first step)."""
    warmup_epochs: int = -1
    """Epochs of reconstructor training on the undefended obfuscator before round 1 (-1 = t_sub)."""
    t_main: int = 10
    """Adversarial rounds (T_main of Algorithm 1); each is phases (a), (b), (c)."""
    t_sub: int = 1
    """Epochs of each phase in a round (T_sub of Algorithm 1)."""
    t_reconstructor: int = 0
    """Epochs of phase (b), the reconstructor's, in a round (0 = t_sub): an adversary trained longer than f each round."""
    reinit_every: int = 0
    """Re-initialise the training reconstructor (every member of a pool) and its optimiser at the start of phase (b)
    of every k-th round after the first (0 = never): f must beat fresh adversaries, not one it has learnt to fool."""
    batch_size: int = 128
    """Images per optimisation step."""
    eval_batch_size: int = 500
    """Images per forward pass when evaluating."""
    optimizer: str = "adam"
    """adam | sgd (SGD uses Nesterov momentum 0.9)."""
    lr_obfuscator: float = 1e-3
    """Peak learning rate of the obfuscator."""
    lr_classifier: float = 1e-3
    """Peak learning rate of the classifier."""
    lr_reconstructor: float = 1e-3
    """Learning rate of the reconstructor."""
    adversarial_lr_scale: float = 0.1
    """Obfuscator and classifier learning rates in phases (a) and (c), as a fraction of their peak."""
    weight_decay: float = 5e-4
    """L2 weight decay of the obfuscator and classifier (the reconstructor has none)."""
    pretrain_schedule: str = "onecycle"
    """Learning-rate schedule of pretraining: onecycle (warm up, then anneal to 0) | step (x0.1 at 50% and 75%) | constant."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""
    test_flip: bool = False
    """Test accuracy from the logits of each test image and its mirror image, added (flip test-time augmentation;
    twice the evaluation's cost, changes no weight; a feature store's classifier sees one map per image and gets none of it).
    Ignored for data trained without horizontal flips (the digit and grey-scale sets), where a mirror image may be another image."""
    precision: str = "auto"
    """auto (bf16 on a CUDA GPU that supports it, else fp32; on a CPU bf16 is opt-in, docs/benchmarks.md) | fp32 | bf16 (autocast; weights, BatchNorm, losses fp32)."""
    channels_last: str = "auto"
    """Channels-last (NHWC) memory layout: auto (on for CUDA and CPU, where it measured faster) | on | off."""
    compile: bool = False
    """torch.compile every network (the first steps of each phase are slow while it compiles)."""
    sync_batchnorm: bool = True
    """Multi-process runs: BatchNorm statistics over the global batch (as one process), not per process."""

    def epochs_of(self, phase: str) -> int:
        """Epochs of one phase of a round: t_sub, or t_reconstructor (when set) for phase (b)."""
        return self.t_reconstructor or self.t_sub if phase == PHASE_B else self.t_sub


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    """Seed of the split, initialisation, data order and augmentation."""
    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    progress: bool = True
    """Show progress bars."""

    def get(self, dotted: str) -> object:
        """The value of a dotted key: cfg.get('train.lambda_privacy')."""
        obj: object = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj


SECTIONS = ("data", "model", "train")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "folder")
CLASS_COUNTS = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}  # the named datasets' classes
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# data.task's named labellings: the dataset they are meant for, the groups of fine classes (group g becomes
# class g), and the groups' names.
TASKS = {
    "cifar10-superclass": ("cifar10", [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]], ["vehicle", "animal"]),
    "mnist-parity": ("mnist", [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], ["even", "odd"]),
}
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("onecycle", "step", "constant")
BAD_IMAGE_ACTIONS = ("error", "skip")
MAX_PHASE_EPOCHS = 1_000_000  # the paper's runs have ~500; far more is a typo that would only hang
# Keys that may differ when a run is resumed: where things are and how they run, not what is trained.
# A moved data file is fine; its content is checked against the checkpoint's data fingerprint.
RESUME_MAY_CHANGE = ("device", "progress", "data.data_dir", "data.path", "data.cache_dir", "data.download", "train.precision", "train.channels_last", "train.compile")
PRECISIONS = ("auto", "fp32", "bf16")
SWITCHES = ("auto", "on", "off", "true", "false")


def task_groups(task: str, num_classes: int | None = None) -> tuple[list[list[int]], list[str] | None]:
    """data.task -> its groups of fine classes (group g holds the classes that become class g) and, for a named
    task, the groups' names (None for groups given as indices). `num_classes`, where known, must be covered
    exactly; without it the groups must cover 0..their largest index. Raises ValueError saying what is wrong
    (config.validate and veil.data name data.task in front of it)."""
    if task in TASKS:
        _, groups, names = TASKS[task]
        if num_classes is not None and num_classes != 10:
            raise ValueError(f"'{task}' groups 10 classes, the data has {num_classes}")
        return [list(g) for g in groups], list(names)
    shape = "none, " + ", ".join(TASKS) + " or groups of class indices, one per ';' (e.g. '0,1,8,9;2,3,4,5,6,7')"
    if ";" not in task:
        raise ValueError(f"must be {shape}, got '{task}'")
    groups = []
    for part in task.split(";"):
        items = [x.strip() for x in part.split(",")]
        if not all(re.fullmatch(r"\d+", x) for x in items):
            raise ValueError(f"group '{part.strip()}' of '{task}' is not a comma-separated list of class indices; must be {shape}")
        groups.append([int(x) for x in items])
    seen = [c for g in groups for c in g]
    repeated = sorted({c for c in seen if seen.count(c) > 1})
    if repeated:
        raise ValueError(f"class{'es' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} in more than one place of '{task}'; every class goes into exactly one group")
    top = num_classes if num_classes is not None else max(seen) + 1
    outside = sorted(c for c in seen if c >= top)
    if outside:
        raise ValueError(f"class{'es' if len(outside) > 1 else ''} {', '.join(map(str, outside))} out of range: the data has classes 0..{top - 1}")
    missing = sorted(set(range(top)) - set(seen))
    if missing:
        raise ValueError(f"class{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} in no group of '{task}'; every class goes into exactly one group")
    return groups, None


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring, read from the class source (the string under each field)."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value  # type: ignore[attr-defined]
    return docs


def valid_keys() -> list[str]:
    """Every dotted key a config file or override may set."""
    keys = []
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(getattr(Config(), f.name))]
        else:
            keys.append(f.name)
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys + [k.split(".")[-1] for k in keys], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown config key '{key}'.{hint} Valid keys: {', '.join(keys)}")


def _coerce(value: object, typ: object, key: str, where: str) -> object:
    """Check `value` against the field's annotated type, converting strings from the CLI."""
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if name == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if name == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)  # type: ignore[arg-type]
        if name == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # type: ignore[arg-type]
        if name == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    raise ConfigError(f"{where}: '{key}' must be {name}, got {value!r}")


def _set(cfg: Config, key: str, value: object, where: str) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] not in {f.name for f in dataclasses.fields(Config)}:
        # A bare leaf name is accepted when exactly one section has it: `lambda_privacy=0`.
        owners = [s for s in SECTIONS if parts[0] in {f.name for f in dataclasses.fields(getattr(cfg, s))}]
        if len(owners) != 1:
            raise _unknown_key(key, where)
        parts = [owners[0], parts[0]]
    target: object = cfg
    for part in parts[:-1]:
        if part not in SECTIONS or target is not cfg:
            raise _unknown_key(key, where)
        target = getattr(cfg, part)
    fields = {f.name: f for f in dataclasses.fields(target)}  # type: ignore[arg-type]
    if parts[-1] not in fields or parts[-1] in SECTIONS:
        raise _unknown_key(key, where)
    hints = typing.get_type_hints(type(target))
    setattr(target, parts[-1], _coerce(value, hints[parts[-1]], ".".join(parts), where))


def from_dict(raw: object, where: str = "config") -> Config:
    """Build a validated Config from a nested dict (as read from YAML)."""
    cfg = Config()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: config keys must be strings, got {key!r}")
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: section '{key}' must be a mapping, got {value!r}")
            for sub, v in value.items():
                _set(cfg, f"{key}.{sub}", v, where)
        else:
            _set(cfg, key, value, where)
    validate(cfg, where)
    return cfg


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file and apply `KEY=VALUE` overrides (dotted or unique leaf keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e})") from None
    cfg = from_dict(raw, str(path))
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like KEY=VALUE, e.g. train.lambda_privacy=0")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value  # not YAML (a path with odd characters, say): taken as the plain string
        _set(cfg, key.strip(), parsed, "override")
    validate(cfg, "override")
    return cfg


def validate(cfg: Config, where: str = "config") -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {msg}")

    d, m, t = cfg.data, cfg.model, cfg.train
    for name, section in (("data", d), ("model", m), ("train", t)):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            need(not isinstance(v, float) or math.isfinite(v), f"{name}.{f.name} must be a finite number, got {v}")
    need(d.dataset in DATASETS, f"data.dataset must be one of {', '.join(DATASETS)}, got '{d.dataset}'")
    need(d.dataset not in ("npz", "folder") or bool(d.path), f"data.path is required for dataset '{d.dataset}'")
    need(d.on_bad_image in BAD_IMAGE_ACTIONS, f"data.on_bad_image must be one of {', '.join(BAD_IMAGE_ACTIONS)}, got '{d.on_bad_image}'")
    need(0 < d.attacker_fraction < 1, f"data.attacker_fraction must be in (0, 1), got {d.attacker_fraction}")
    need(0 < d.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    for k in ("n_defender", "n_attacker", "n_test", "n_later"):
        need(getattr(d, k) >= 0, f"data.{k} must be >= 0, got {getattr(d, k)}")
    if d.task != "none":
        try:
            task_groups(d.task, CLASS_COUNTS.get(d.dataset))
        except ValueError as e:
            need(False, f"data.task: {e}")
        meant = TASKS[d.task][0] if d.task in TASKS else None
        need(meant is None or d.dataset in (meant, "npz", "folder"),
             f"data.task: '{d.task}' is a labelling of {meant}, not of data.dataset {d.dataset}; give its groups of class indices instead (e.g. '0,1,8,9;2,3,4,5,6,7')")
    need(0 < m.width <= 8, f"model.width must be in (0, 8] (1.0 = the paper's VGG16), got {m.width}")
    need(1 <= m.split <= 5, f"model.split must be 1..5 VGG blocks, got {m.split}")
    # VGG16 halves the image five times (the classifier needs >= 1x1 at the end) and the
    # reconstructors upsample the feature map back by 2**split, so the side must divide evenly.
    need(
        d.image_size >= 32 and d.image_size % 2**m.split == 0,
        f"data.image_size must be >= 32 and a multiple of {2**m.split} (2**model.split), got {d.image_size}",
    )
    pool = pool_names(m.reconstructor)
    if len(pool) == 1:
        need(m.reconstructor in RECONSTRUCTORS, f"model.reconstructor must be one of {', '.join(RECONSTRUCTORS)}, got '{m.reconstructor}' "
             f"(or a comma-separated pool of {', '.join(attackers())}, e.g. simrec,unet,resrec)")
    else:
        unknown = [n for n in pool if n not in attackers()]
        need(not unknown, f"model.reconstructor: a pool's members must be among {', '.join(attackers())}, got {', '.join(unknown)}")
        need(len(set(pool)) == len(pool), f"model.reconstructor: a pool names each member once, got '{m.reconstructor}'")
    need(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    need(m.bottleneck in BOTTLENECKS, f"model.bottleneck must be one of {', '.join(BOTTLENECKS)}, got '{m.bottleneck}'")
    cut = cut_channels(m.width, m.split)
    if m.bottleneck == "none":
        need(m.bottleneck_channels == 0, f"model.bottleneck_channels is {m.bottleneck_channels} but model.bottleneck is none; set model.bottleneck=learned or orthogonal")
    else:
        need(1 <= m.bottleneck_channels <= cut, f"model.bottleneck_channels must be in 1..{cut} (the channels at split {m.split}, width {m.width:g}), got {m.bottleneck_channels}")
    need(m.feature_bits == 0 or 1 <= m.feature_bits <= 16, f"model.feature_bits must be 0 (float) or 1..16, got {m.feature_bits}")
    need(m.input_norm in INPUT_NORMS, f"model.input_norm must be one of {', '.join(INPUT_NORMS)}, got '{m.input_norm}'")
    need(t.defence in DEFENCES, f"train.defence must be one of {', '.join(DEFENCES)}, got '{t.defence}'")
    need(t.nopeek_alpha >= 0 and t.noise_sigma >= 0 and t.vib_beta >= 0, "train.nopeek_alpha, train.noise_sigma and train.vib_beta must be >= 0")
    need(t.lambda_privacy >= 0, f"train.lambda_privacy must be >= 0, got {t.lambda_privacy}")
    need(t.defence != "vib" or m.feature_bits == 0, f"train.defence=vib needs float codes (model.feature_bits=0, got {m.feature_bits}): "
         "its unit noise would follow the quantiser, whose codes in [0, 1] cannot be scaled above it")
    for k in ("pretrain_epochs", "t_main", "t_sub", "t_reconstructor", "reinit_every"):
        need(getattr(t, k) >= 0, f"train.{k} must be >= 0, got {getattr(t, k)}")
    need(t.warmup_epochs >= -1, f"train.warmup_epochs must be >= -1, got {t.warmup_epochs}")
    phases = DEFENCES[t.defence].round_phases  # t.defence was checked above
    per_round = sum(t.epochs_of(ph) for ph in phases)
    n_steps = t.pretrain_epochs + 2 * (t.t_sub if t.warmup_epochs < 0 else t.warmup_epochs) + per_round * t.t_main
    need(n_steps <= MAX_PHASE_EPOCHS, f"the run would have {n_steps} phase-epochs (pretrain_epochs + 2 * warmup_epochs + t_main * {per_round} epochs a round: "
         f"t_sub per phase, t_reconstructor for phase (b)); at most {MAX_PHASE_EPOCHS} are allowed")
    need(t.batch_size >= 1 and t.eval_batch_size >= 1, "train.batch_size and train.eval_batch_size must be >= 1")
    need(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{t.optimizer}'")
    need(t.pretrain_schedule in SCHEDULES, f"train.pretrain_schedule must be one of {', '.join(SCHEDULES)}, got '{t.pretrain_schedule}'")
    for k in ("lr_obfuscator", "lr_classifier", "lr_reconstructor"):
        need(getattr(t, k) > 0, f"train.{k} must be > 0, got {getattr(t, k)}")
    need(t.adversarial_lr_scale > 0, f"train.adversarial_lr_scale must be > 0, got {t.adversarial_lr_scale}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, f"device must be auto, cpu or cuda[:N], got '{cfg.device}'")
    need(0 <= cfg.seed < 2**32, f"seed must be in 0..2**32-1, got {cfg.seed}")
    need(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got '{t.precision}'")
    need(str(t.channels_last).lower() in SWITCHES, f"train.channels_last must be auto, on or off, got '{t.channels_last}'")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(raw: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'t_main': 3}} -> {'train.t_main': 3}."""
    out: dict[str, object] = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(old: dict, new: dict, allowed: tuple[str, ...]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (to_dict, or as saved in a checkpoint),
    as 'key: old -> new', leaving out the `allowed` ones (e.g. RESUME_MAY_CHANGE). A key absent from
    one side counts as its default: runs made before a key existed stay loadable."""
    defaults = flatten(to_dict(Config()))
    a, b = {**defaults, **flatten(old)}, {**defaults, **flatten(new)}
    keys = [k for k in list(a) + [k for k in b if k not in a] if k not in allowed]
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys if a.get(k) != b.get(k)]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe_keys() -> str:
    """All keys with their defaults and docstrings, for `--help-config`."""
    lines = []
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            section = getattr(defaults, f.name)
            docs = field_docs(type(section))
            lines.append(f"{f.name}:")
            for g in dataclasses.fields(section):
                lines.append(f"  {g.name}: {getattr(section, g.name)!r}  # {docs.get(g.name, '')}")
        else:
            lines.append(f"{f.name}: {getattr(defaults, f.name)!r}  # {field_docs(Config).get(f.name, '')}")
    return "\n".join(lines)
