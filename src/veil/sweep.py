"""`veil sweep`: one run per defence strength, each attacked, and the utility-privacy frontier.

    veil sweep --config FILE --lambdas 0,0.1,0.3,1,3 --out DIR [KEY=VALUE ...]
        DIR/sweep.json          the points (defence, strength, run directory) and the settings
        DIR/lambda-<value>/     one `veil train` run directory each, attacked into its attack/
        DIR/frontier.csv/.json  test accuracy against the strongest attacker's PSNR and re-identification
        DIR/frontier.png        the same as a plot
        DIR/ceilings.json       the undefended attack (the ceiling), made once per pretrained split
        DIR/<point>/store-classifier/   with --store-classifier N: a classifier trained from scratch
                                for N epochs on the point's stored features (`veil obfuscate` +
                                `veil train-classifier`, its other settings by --store KEY=VALUE),
                                its test accuracy beside the in-run one
        DIR/<point>/growth/     with --growth N: `veil growth`'s measurement (N and N + M stored items)
        DIR/image-store/        the image store's two classifiers, trained once for every point's growth

The frontier ends with the reference rows: the image store, the label store and the logits store (report/frontier.py).

Resumable: a finished run is skipped, a partial run resumed, an attacked run not attacked again.
A point is (defence, strength): the paper's adversarial training (lambda, Eq. 2), NoPeek (alpha)
or feature noise (sigma); one sweep directory may hold several defences, and its frontier shows
one line per defence. Any defence of the registry (veil/defences/) can be swept; one without a
strength (none) is a single point, `--lambdas 0`. Points that start from the same pretraining share
their undefended obfuscator, which is attacked once (CEILINGS_FILE).

Two accuracies, because they answer two questions: the in-run one is the classifier trained
alongside the obfuscator (for the adversarial defence, after the last obfuscator-only phase); the
store one is what a user of the feature store gets, a fresh classifier trained on one stored
feature map per image (for the noise defence: one noise draw, fixed).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from veil import config as config_mod
from veil.attack.harness import attack, saved_attack
from veil.attack.settings import AttackConfig, resolve_settings
from veil.config import ConfigError
from veil.defences import get_defence, strength_overrides
from veil.errors import StoreError
from veil.io import atomic_write_json, atomic_write_text
from veil.models.obfuscator import fingerprint
from veil.report.frontier import frontier_rows, write_frontier
from veil.rundir import load_run, read_metrics
from veil.store.classify import HeadConfig, check_head_config, shift_cells, train_classifier, trained_shift_cells
from veil.store.growth import GrowthConfig, growth, head_names
from veil.store.obfuscate import obfuscate
from veil.sweepdir import CEILINGS_FILE, COST_FILE, GROWTH, IMAGE_STORE, STORE_CLASSIFIER, SWEEP_FILE, Point, point_name, read_sweep
from veil.train import Stopped, finished_pretraining, fork, plan, pretrains_alike, train

# How a run executes and where its data live, not what it trains: an existing point may differ in
# these, as `veil train --resume` allows.
SWEEP_MAY_CHANGE = config_mod.RESUME_MAY_CHANGE
DATA_LOCATION = tuple(k for k in SWEEP_MAY_CHANGE if k.startswith("data."))  # data.path, data.data_dir, ...

def parse_strengths(text: str) -> list[float]:
    """'0,0.1,1' -> [0.0, 0.1, 1.0], in the given order, without repeats."""
    values: list[float] = []
    for item in text.split(","):
        item = item.strip()
        try:
            v = float(item)
        except ValueError:
            raise ConfigError(f"--lambdas: '{item}' is not a number; expected a comma-separated list such as 0,0.1,1") from None
        if v < 0:
            raise ConfigError(f"--lambdas: strengths must be >= 0, got {v:g}")
        if v not in values:
            values.append(v)
    if not values:
        raise ConfigError("--lambdas: expected at least one value, e.g. 0,1")
    return values


def parse_key_values(items: list[str], settings: type, flag: str, example: str, exclude: tuple[str, ...] = ()) -> dict:
    """['max_epochs=5', 'whitebox=false'] -> {'max_epochs': 5, 'whitebox': False}, typed as the fields of the
    dataclass `settings` (`exclude`: fields the option may not set); errors name `flag`."""
    hints = typing.get_type_hints(settings)
    names = [f.name for f in dataclasses.fields(settings) if f.name not in exclude]
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ConfigError(f"{flag} '{item}' must look like KEY=VALUE, e.g. {flag} {example}")
        if key == "epochs" and "epochs" in exclude:
            raise ConfigError(f"{flag}: the epochs are --store-classifier EPOCHS")
        if key not in names:
            raise ConfigError(f"{flag}: unknown setting '{key}'; valid: {', '.join(names)}")
        raw = value if hints[key] is str else yaml.safe_load(value)
        out[key] = config_mod._coerce(raw, hints[key], key, flag)
    return out


def parse_attack_settings(items: list[str]) -> dict:
    """['max_epochs=5', 'whitebox=false'] -> {'max_epochs': 5, 'whitebox': False}, typed as AttackConfig's fields."""
    return parse_key_values(items, AttackConfig, "--attack", "max_epochs=5")


# ----------------------------------------------------------------------------- an existing run


def check_same_config(run_dir: Path, cfg: config_mod.Config) -> None:
    """A run directory resumed by the sweep must have been made from the same config."""
    existing = config_mod.load(run_dir / "config.yaml")
    differ = config_mod.changed_keys(config_mod.to_dict(existing), config_mod.to_dict(cfg), SWEEP_MAY_CHANGE)
    if differ:
        raise ConfigError(f"{run_dir} was trained with another config (run -> sweep: {'; '.join(differ)}); use another --out or remove that run")


def follow_moved_data(run_dir: Path, cfg: config_mod.Config, log) -> None:  # noqa: ANN001
    """Point an existing run's config.yaml at where the sweep's config says the data live now (DATA_LOCATION),
    so that its attack and store classifier, which read config.yaml, find them."""
    existing = config_mod.load(run_dir / "config.yaml")
    moved = []
    for key in DATA_LOCATION:
        name = key.split(".")[1]
        old, new = getattr(existing.data, name), getattr(cfg.data, name)
        if old != new:
            moved.append(f"{key}: {old!r} -> {new!r}")
            setattr(existing.data, name, new)
    if moved:
        atomic_write_text(run_dir / "config.yaml", config_mod.to_yaml(existing))
        log(f"veil sweep: {run_dir.name}: the data moved ({'; '.join(moved)}); its config.yaml now says so")


# ----------------------------------------------------------------------------- the sweep


def harness_attack(settings: dict, log, ceilings: Path | None = None) -> Callable[[Path], None]:  # noqa: ANN001
    """`veil attack` with the given settings (AttackConfig field -> value), checked before any training.
    With `ceilings`, runs that share their undefended obfuscator share its attack (see veil.attack.attack)."""
    resolved = resolve_settings(settings)
    return lambda run_dir: attack(run_dir, resolved, log, ceilings=ceilings)


def attacked_with(run_dir: Path, settings: dict | None) -> bool:
    """The run has an attack.json; with harness settings given, made with the same ones against the run's
    current obfuscator (a run resumed or retrained since is attacked again)."""
    if not (run_dir / "attack" / "attack.json").is_file():
        return False
    if settings is None:
        return True
    saved, _ = saved_attack(run_dir, resolve_settings(settings), fingerprint(load_run(run_dir).obfuscator))
    return saved is not None


# HeadConfig fields --store may not set: the sweep's own (epochs: --store-classifier EPOCHS).
STORE_FIXED = ("epochs", "progress")
# HeadConfig fields that change how a store classifier runs, not what it learns: a result made with
# others is kept.
STORE_HOW = ("device", "channels_last", "progress")


def parse_store_settings(items: list[str]) -> dict:
    """['shift=0', 'head=small'] -> {'shift': 0, 'head': 'small'}, typed as HeadConfig's fields (veil train-classifier's
    settings; sweep checks their values)."""
    return parse_key_values(items, HeadConfig, "--store", "shift=0", STORE_FIXED)


def store_head(cfg: config_mod.Config, epochs: int, settings: dict | None = None) -> HeadConfig:
    """The store classifier's settings at a point: --store's, the run's seed and device unless --store sets them."""
    return HeadConfig(**{"seed": cfg.seed, "device": cfg.device, **(settings or {}), "epochs": epochs, "progress": False})


def store_classifier(run_dir: Path, epochs: int, log=print, settings: dict | None = None) -> dict:  # noqa: ANN001
    """Store the run's defender and test images as features, train a classifier from scratch on the
    first for `epochs` epochs (its other settings: `settings`, HeadConfig field -> value), and score it
    on the second: RUN_DIR/store-classifier/summary.json.
    The stores are temporary (rebuilt by a rerun); the classifier and its metrics are kept."""
    cfg = config_mod.load(run_dir / "config.yaml")
    out, stores = run_dir / STORE_CLASSIFIER, run_dir / (STORE_CLASSIFIER + "-stores")
    shutil.rmtree(out, ignore_errors=True)  # an interrupted one starts again
    shutil.rmtree(stores, ignore_errors=True)
    torch.manual_seed(cfg.seed)  # the noise defence draws its noise while storing
    for split in ("defender", "test"):
        obfuscate(run_dir, f"run:{split}", stores / split, device=cfg.device, progress=False, log=log)
    head = store_head(cfg, epochs, settings)
    summary = train_classifier(stores / "defender", out, head, test_store=stores / "test", log=lambda *_: None)
    shutil.rmtree(stores)
    log(f"veil sweep: {run_dir.name}: a classifier trained on its stored features reaches {summary['final_test_accuracy']:.2%} "
        f"({epochs} epochs, head {head.head}, shift {head.shift} px = {summary['shift_cells']} cell{'' if summary['shift_cells'] == 1 else 's'}, {summary['seconds']:.0f} s)")
    return summary


def pretraining_donor(out: Path, points: list[Point], point: Point, cfg: config_mod.Config) -> Path | None:
    """Another point of the sweep whose finished pretraining this point would repeat bit for bit (train.fork)."""
    for q in points:
        other = out / q.name
        if q.name != point.name and (other / "config.yaml").is_file() and finished_pretraining(other) \
                and pretrains_alike(config_mod.load(other / "config.yaml"), cfg):
            return other
    return None


def read_cost(run_dir: Path) -> dict:
    """RUN_DIR/cost.json: wall seconds this point has cost the sweep, per part (train, attack, store_classifier)
    and in total. Training counts every run of `train` (a resumed point adds up); a forked point's pretraining
    was paid by its donor."""
    path = Path(run_dir) / COST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def add_cost(run_dir: Path, part: str, seconds: float, replace: bool = False) -> None:
    """Count `seconds` of wall time against `part` (replace: a redone attack or store classifier counts once)."""
    cost = {k: v for k, v in read_cost(run_dir).items() if k != "total"}
    cost[part] = round(seconds + (0.0 if replace else cost.get(part, 0.0)), 1)
    cost["total"] = round(sum(cost.values()), 1)
    atomic_write_json(Path(run_dir) / COST_FILE, cost)


def format_cost(cost: dict) -> str:
    parts = [f"{k.replace('_', ' ')} {cost[k]:.0f} s" for k in ("train", "attack", "store_classifier") if k in cost]
    return ", ".join(parts) + f"; total {cost.get('total', 0):.0f} s" if parts else "not recorded (made before costs were kept)"


def store_classified_with(run_dir: Path, head: HeadConfig) -> bool:
    """RUN_DIR/store-classifier is finished and was trained with `head`: every HeadConfig field but STORE_HOW
    as its config.yaml records it, the shift in pixels as its summary records it. One made before the shift was
    given in pixels recorded it in cells only (classify.trained_shift_cells) and counts as made with `head`
    where `head`'s shift is that many cells at its split (split 2 at the default 4 pixels: its one cell)."""
    d = run_dir / STORE_CLASSIFIER
    if not all((d / name).is_file() for name in ("summary.json", "config.yaml", "classifier.json")):
        return False
    try:
        summary, meta = json.loads((d / "summary.json").read_text()), json.loads((d / "classifier.json").read_text())
        saved = yaml.safe_load((d / "config.yaml").read_text()) or {}
        split = meta["obfuscator"]["split"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return False  # damaged: trained again
    want, defaults = asdict(head), asdict(HeadConfig())
    if any(saved.get(k, defaults[k]) != v for k, v in want.items() if k not in STORE_HOW and k != "shift"):
        return False
    if "shift_pixels" in summary:
        return summary["shift_pixels"] == head.shift
    return trained_shift_cells(summary, saved) == shift_cells(head.shift, split)


def sweep(
    config_path: str | Path,
    strengths: list[float],
    out: str | Path,
    overrides: list[str] | None = None,
    defence: str = "adversarial",
    attack_settings: dict | None = None,
    attack: Callable[[Path], None] | None = None,
    store_epochs: int = 0,
    store_settings: dict | None = None,
    share_pretraining: bool = True,
    growth_epochs: int = 0,
    growth_heads: str = "vgg16",
    growth_validation: bool = False,
    log=print,  # noqa: ANN001
) -> list[dict]:
    """Train and attack one run per strength into `out` (resumable); write and return the frontier.

    `attack_settings` are `veil attack`'s settings (AttackConfig field -> value) for every point;
    `attack` replaces the harness by any function that writes RUN_DIR/attack/attack.json.
    `store_epochs` > 0 also trains a classifier on each point's stored features (store_classifier), with
    `store_settings` (veil train-classifier's settings, HeadConfig field -> value, see parse_store_settings);
    one already trained with other settings (store_classified_with) is trained again.
    `share_pretraining`: a point whose pretraining another point of the sweep has already done is forked
    from it (train.fork) rather than pretrained again.
    `growth_epochs` > 0 also measures each point's growth (`veil growth` with that many epochs and `growth_heads`,
    into RUN/growth/), the image store's two classifiers trained once into DIR/image-store/ for every point; with
    `growth_validation` every classifier is scored at the epoch that reads the validation split best.
    """
    if store_epochs < 0:
        raise ConfigError(f"--store-classifier must be >= 0 epochs, got {store_epochs}")
    store_settings = dict(store_settings or {})
    if store_settings and not store_epochs:
        raise ConfigError("--store sets the store classifier, which needs --store-classifier EPOCHS")
    if store_epochs:
        try:
            check_head_config(HeadConfig(**{**store_settings, "epochs": store_epochs}))  # before any training
        except (StoreError, TypeError) as e:
            raise ConfigError(f"--store: {e}") from None
    if growth_epochs < 0:
        raise ConfigError(f"--growth must be >= 0 epochs, got {growth_epochs}")
    if growth_epochs:
        try:
            head_names(GrowthConfig(heads=growth_heads))
        except StoreError as e:
            raise ConfigError(f"--growth-head: {e}") from None
    if growth_validation and not growth_epochs:
        raise ConfigError("--growth-validation picks the epochs of --growth's classifiers; give --growth EPOCHS too")
    out = Path(out)
    d = get_defence(defence)
    if not d.strength_key and strengths != [0.0]:
        raise ConfigError(f"--defence {defence} has no strength: it is one point, give --lambdas 0")
    overrides = list(overrides or [])
    asked = [Point(defence, s, point_name(defence, s)) for s in strengths]
    settings = None if attack else dict(attack_settings or {})
    attack = attack or harness_attack(settings, log, out / CEILINGS_FILE)  # bad attack settings fail before any training
    # Every config is built and every existing run checked before anything is written.
    configs = {p.name: config_mod.load(config_path, overrides + strength_overrides(defence, p.strength)) for p in asked}
    for p in asked:
        if (out / p.name / "config.yaml").is_file():
            check_same_config(out / p.name, configs[p.name])
    if growth_validation and any(c.data.n_test == 0 for c in configs.values()):  # every test image is a user's: none left to pick epochs on
        raise ConfigError("--growth-validation needs validation images, the test images data.n_test leaves out of the users', "
                          "but data.n_test is 0 (all); set data.n_test below the test split's size")
    points = asked
    if (out / SWEEP_FILE).is_file():  # a resumed or extended sweep keeps its earlier points
        earlier = read_sweep(out)["points"]
        points = earlier + [p for p in asked if p.name not in {e.name for e in earlier}]
    points = sorted(points, key=lambda p: (p.defence, p.strength))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SWEEP_FILE, {
        "config": str(config_path), "overrides": overrides, "attack_settings": settings,
        "store_classifier": {"epochs": store_epochs, "settings": store_settings} if store_epochs else None,
        "growth": {"epochs": growth_epochs, "heads": growth_heads, "validation": growth_validation} if growth_epochs else None,
        "points": [asdict(p) for p in points],
    })

    for p in asked:
        cfg, run_dir = configs[p.name], out / p.name
        if (run_dir / "config.yaml").is_file():
            follow_moved_data(run_dir, cfg, log)
        if (run_dir / "summary.json").is_file():
            log(f"veil sweep: {p.name} already trained")
        else:
            resume = (run_dir / "config.yaml").is_file()
            donor = None if resume or not share_pretraining else pretraining_donor(out, points, p, cfg)
            what = f"{'resuming' if resume else 'training'} {p.name}" + (f" ({d.strength_label} = {p.strength:g})" if d.strength_key else "")
            if donor is not None:
                forked = fork(donor, cfg, run_dir)
                what += f" from {donor.name}'s pretraining (its {forked['step']} epochs not repeated)"
                resume = True
            log(f"veil sweep: {what}")
            began = time.perf_counter()
            try:
                trained = train(cfg, run_dir, resume=resume, log=log)
            except Stopped as e:  # SIGTERM/SIGINT: the sweep, not `veil train --resume`, continues it
                done, total = len(read_metrics(run_dir)), len(plan(cfg.train))
                raise Stopped(f"stopped during {p.name} after step {done} of {total} (saved); run the same `veil sweep` command again to continue",
                              e.signum) from None
            finally:
                if (run_dir / "config.yaml").is_file():
                    add_cost(run_dir, "train", time.perf_counter() - began)
            if not trained:
                log(f"veil sweep: stopped during {p.name}; run the same command again to continue")
                return []
        if attacked_with(run_dir, settings):
            log(f"veil sweep: {p.name} already attacked")
        else:
            log(f"veil sweep: attacking {p.name}")
            began = time.perf_counter()
            attack(run_dir)
            add_cost(run_dir, "attack", time.perf_counter() - began, replace=True)
        if store_epochs and store_classified_with(run_dir, store_head(cfg, store_epochs, store_settings)):
            log(f"veil sweep: {p.name}'s store classifier already trained with these settings")
        elif store_epochs:
            began = time.perf_counter()
            store_classifier(run_dir, store_epochs, log, store_settings)
            add_cost(run_dir, "store_classifier", time.perf_counter() - began, replace=True)
        if growth_epochs:  # resumable by itself: finished classifiers are kept, the shared image store trained once
            began = time.perf_counter()
            growth(run_dir, GrowthConfig(epochs=growth_epochs, heads=growth_heads, out=str(run_dir / GROWTH), image_dir=str(out / IMAGE_STORE),
                                         validation=growth_validation, device=cfg.device, progress=False), log=log)
            add_cost(run_dir, "growth", time.perf_counter() - began)
        cost = read_cost(run_dir)
        log(f"veil sweep: {p.name} cost {format_cost(cost)}")
    rows = frontier_rows(out)
    write_frontier(out, rows)
    log(f"veil sweep: wrote {out / 'frontier.csv'}" + (f" and {out / 'frontier.png'}" if (out / "frontier.png").is_file() else ""))
    return rows
