"""`veil sweep`: one run per defence strength, each attacked, and the utility-privacy frontier.

    veil sweep --config FILE --lambdas 0,0.1,0.3,1,3 --out DIR [KEY=VALUE ...]
        DIR/sweep.json          the points (defence, strength, run directory) and the settings
        DIR/lambda-<value>/     one `veil train` run directory each, attacked into its attack/
        DIR/frontier.csv/.json  test accuracy against the strongest attacker's PSNR and re-identification
        DIR/frontier.png        the same as a plot
        DIR/ceilings.json       the undefended attack (the ceiling), made once per pretrained split
        DIR/<point>/store-classifier/   with --store-classifier N: a classifier trained from scratch
                                for N epochs on the point's stored features (`veil obfuscate` +
                                `veil train-classifier`), its test accuracy beside the in-run one

Resumable: a finished run is skipped, a partial run resumed, an attacked run not attacked again.
A point is (defence, strength): the paper's adversarial training (lambda, Eq. 2), NoPeek (alpha)
or feature noise (sigma); one sweep directory may hold several defences, and its frontier shows
one line per defence; any defence of the registry (veil/defences/) with a strength can be swept. Points that start from the same pretraining share
their undefended obfuscator, which is attacked once (CEILINGS_FILE).

Two accuracies, because they answer two questions: the in-run one is the classifier trained
alongside the obfuscator (for the adversarial defence, after the last obfuscator-only phase); the
store one is what a user of the feature store gets, a fresh classifier trained on one stored
feature map per image (for the noise defence: one noise draw, fixed).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from veil import config as config_mod
from veil.config import ConfigError
from veil.defences import DEFENCES, get_defence, point_symbol, strength_label, strength_overrides
from veil.io import atomic_write_bytes, atomic_write_json, atomic_write_text

SWEEP_FILE = "sweep.json"
CEILINGS_FILE = "ceilings.json"  # the undefended attacks, one per distinct undefended obfuscator
STORE_CLASSIFIER = "store-classifier"  # in each run: the classifier trained on its stored features


@dataclass(frozen=True)
class Point:
    defence: str
    strength: float
    name: str  # the run directory inside the sweep directory


def point_name(defence: str, strength: float) -> str:
    return f"{get_defence(defence).strength_label}-{strength:g}"


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


def parse_attack_settings(items: list[str]) -> dict:
    """['max_epochs=5', 'whitebox=false'] -> {'max_epochs': 5, 'whitebox': False}, typed as AttackConfig's fields."""
    import dataclasses
    import typing

    import yaml

    from veil.attack import AttackConfig

    hints = typing.get_type_hints(AttackConfig)
    names = [f.name for f in dataclasses.fields(AttackConfig)]
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ConfigError(f"--attack '{item}' must look like KEY=VALUE, e.g. --attack max_epochs=5")
        if key not in names:
            raise ConfigError(f"--attack: unknown setting '{key}'; valid: {', '.join(names)}")
        raw = value if hints[key] is str else yaml.safe_load(value)
        out[key] = config_mod._coerce(raw, hints[key], key, "--attack")
    return out


# ----------------------------------------------------------------------------- sweep file


def read_sweep(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        data = json.loads(path.read_text())
        points = [Point(p["defence"], float(p["strength"]), p["name"]) for p in data["points"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable sweep file ({type(e).__name__}: {e})") from None
    data["points"] = points
    return data


def sweep_runs(sweep_dir: Path) -> list[Path]:
    """The run directories of a sweep that exist, in the sweep's order."""
    return [Path(sweep_dir) / p.name for p in read_sweep(sweep_dir)["points"] if (Path(sweep_dir) / p.name / "config.yaml").is_file()]


def check_same_config(run_dir: Path, cfg: config_mod.Config) -> None:
    """A run directory resumed by the sweep must have been made from the same config."""
    existing = config_mod.load(run_dir / "config.yaml")
    allowed = {"device", "progress"}  # how a run executes, not what it trains
    differ = []
    for key in config_mod.valid_keys():
        a, b = _get(existing, key), _get(cfg, key)
        if key not in allowed and a != b:
            differ.append(f"{key}: run has {a!r}, sweep asks {b!r}")
    if differ:
        raise ConfigError(f"{run_dir} was trained with another config ({'; '.join(differ)}); use another --out or remove that run")


def _get(cfg: config_mod.Config, dotted: str) -> object:
    obj: object = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- the sweep


def harness_attack(settings: dict, log, ceilings: Path | None = None) -> Callable[[Path], None]:  # noqa: ANN001
    """`veil attack` with the given settings (AttackConfig field -> value), checked before any training.
    With `ceilings`, runs that share their undefended obfuscator share its attack (see veil.attack.attack)."""
    from veil.attack import attack, resolve_settings

    resolved = resolve_settings(settings)
    return lambda run_dir: attack(run_dir, resolved, log, ceilings=ceilings)


def attacked_with(run_dir: Path, settings: dict | None) -> bool:
    """The run has an attack.json; with harness settings given, made with the same ones."""
    path = run_dir / "attack" / "attack.json"
    if not path.is_file():
        return False
    if settings is None:
        return True
    import dataclasses

    from veil.attack import NOT_RESULTS, resolve_settings

    wanted = {k: v for k, v in dataclasses.asdict(resolve_settings(settings)).items() if k not in NOT_RESULTS}
    try:
        saved = json.loads(path.read_text()).get("settings", {})
    except json.JSONDecodeError:
        return False
    return {k: v for k, v in saved.items() if k not in NOT_RESULTS} == wanted


def store_classifier(run_dir: Path, epochs: int, log=print) -> dict:  # noqa: ANN001
    """Store the run's defender and test images as features, train a classifier from scratch on the
    first for `epochs` epochs, and score it on the second: RUN_DIR/store-classifier/summary.json.
    The stores are temporary (rebuilt by a rerun); the classifier and its metrics are kept."""
    import shutil

    import torch

    from veil.classify import HeadConfig, train_classifier
    from veil.store import obfuscate

    cfg = config_mod.load(run_dir / "config.yaml")
    out, stores = run_dir / STORE_CLASSIFIER, run_dir / (STORE_CLASSIFIER + "-stores")
    shutil.rmtree(out, ignore_errors=True)  # an interrupted one starts again
    shutil.rmtree(stores, ignore_errors=True)
    torch.manual_seed(cfg.seed)  # the noise defence draws its noise while storing
    for split in ("defender", "test"):
        obfuscate(run_dir, f"run:{split}", stores / split, device=cfg.device, progress=False, log=log)
    head = HeadConfig(epochs=epochs, seed=cfg.seed, device=cfg.device, progress=False)
    summary = train_classifier(stores / "defender", out, head, test_store=stores / "test", log=lambda *_: None)
    shutil.rmtree(stores)
    log(f"veil sweep: {run_dir.name}: a classifier trained on its stored features reaches {summary['final_test_accuracy']:.2%} "
        f"({epochs} epochs, {summary['seconds']:.0f} s)")
    return summary


def store_classified_with(run_dir: Path, epochs: int) -> bool:
    path = run_dir / STORE_CLASSIFIER / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("epochs") == epochs


def sweep(
    config_path: str | Path,
    strengths: list[float],
    out: str | Path,
    overrides: list[str] | None = None,
    defence: str = "adversarial",
    attack_settings: dict | None = None,
    attack: Callable[[Path], None] | None = None,
    store_epochs: int = 0,
    log=print,  # noqa: ANN001
) -> list[dict]:
    """Train and attack one run per strength into `out` (resumable); write and return the frontier.

    `attack_settings` are `veil attack`'s settings (AttackConfig field -> value) for every point;
    `attack` replaces the harness by any function that writes RUN_DIR/attack/attack.json.
    `store_epochs` > 0 also trains a classifier on each point's stored features (store_classifier).
    """
    from veil.train import train

    if store_epochs < 0:
        raise ConfigError(f"--store-classifier must be >= 0 epochs, got {store_epochs}")
    out = Path(out)
    d = get_defence(defence)
    if not d.strength_key:
        raise ConfigError(f"--defence {defence} has no strength to sweep; valid: {', '.join(n for n, x in DEFENCES.items() if x.strength_key)}")
    overrides = list(overrides or [])
    asked = [Point(defence, s, point_name(defence, s)) for s in strengths]
    settings = None if attack else dict(attack_settings or {})
    attack = attack or harness_attack(settings, log, out / CEILINGS_FILE)  # bad attack settings fail before any training
    # Every config is built and every existing run checked before anything is written.
    configs = {p.name: config_mod.load(config_path, overrides + strength_overrides(defence, p.strength)) for p in asked}
    for p in asked:
        if (out / p.name / "config.yaml").is_file():
            check_same_config(out / p.name, configs[p.name])
    points = asked
    if (out / SWEEP_FILE).is_file():  # a resumed or extended sweep keeps its earlier points
        earlier = read_sweep(out)["points"]
        points = earlier + [p for p in asked if p.name not in {e.name for e in earlier}]
    points = sorted(points, key=lambda p: (p.defence, p.strength))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SWEEP_FILE, {
        "config": str(config_path), "overrides": overrides, "attack_settings": settings,
        "points": [asdict(p) for p in points],
    })

    for p in asked:
        cfg, run_dir = configs[p.name], out / p.name
        if (run_dir / "summary.json").is_file():
            log(f"veil sweep: {p.name} already trained")
        else:
            resume = (run_dir / "config.yaml").is_file()
            log(f"veil sweep: {'resuming' if resume else 'training'} {p.name} ({d.strength_label} = {p.strength:g})")
            if not train(cfg, run_dir, resume=resume, log=log):
                log(f"veil sweep: stopped during {p.name}; run the same command again to continue")
                return []
        if attacked_with(run_dir, settings):
            log(f"veil sweep: {p.name} already attacked")
        else:
            log(f"veil sweep: attacking {p.name}")
            attack(run_dir)
        if store_epochs and not store_classified_with(run_dir, store_epochs):
            store_classifier(run_dir, store_epochs, log)
    rows = frontier_rows(out)
    write_frontier(out, rows)
    log(f"veil sweep: wrote {out / 'frontier.csv'}" + (f" and {out / 'frontier.png'}" if (out / "frontier.png").is_file() else ""))
    return rows


# ----------------------------------------------------------------------------- the frontier


def frontier_rows(sweep_dir: Path) -> list[dict]:
    """One row per point: test accuracy, and the strongest defended attacker's PSNR and re-identification."""
    from veil.report import read_attack, strongest

    rows = []
    for p in read_sweep(sweep_dir)["points"]:
        run_dir = Path(sweep_dir) / p.name
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        attack = read_attack(run_dir / "attack" / "attack.json") if (run_dir / "attack" / "attack.json").is_file() else None
        store_summary = run_dir / STORE_CLASSIFIER / "summary.json"
        row = {
            "name": p.name, "defence": p.defence, "strength": p.strength,
            "test_accuracy": summary.get("final_test_accuracy"), "pretrain_test_accuracy": summary.get("pretrain_test_accuracy"),
            "store_accuracy": json.loads(store_summary.read_text())["final_test_accuracy"] if store_summary.is_file() else None,
            "psnr": None, "psnr_attacker": None, "reid_top1": None, "reid_attacker": None, "n_candidates": None,
            "floor_psnr": None, "undefended_psnr": None,
        }
        if attack and attack["defended"]:
            row["psnr_attacker"], row["psnr"] = strongest(attack["defended"], "psnr_mean")
            row["reid_attacker"], row["reid_top1"] = strongest(attack["defended"], "reid_top1")
            row["n_candidates"] = attack["defended"][row["reid_attacker"]]["n_candidates"]
            row["floor_psnr"] = attack["floor"]["psnr"]
            top = strongest(attack["undefended"], "psnr_mean")
            row["undefended_psnr"] = top[1] if top else None
        rows.append(row)
    mark_dominated(rows)
    return rows


def mark_dominated(rows: list[dict], label: Callable[[dict], str] = lambda r: r["name"]) -> None:
    """Set each row's `dominated_by`: the attacked points at least as accurate and at most as
    reconstructable (strongest attacker's PSNR), better in one of the two. Such a row is off the frontier.
    `store_dominated_by`: the same with the store classifier's accuracy."""
    for key, field in (("test_accuracy", "dominated_by"), ("store_accuracy", "store_dominated_by")):
        measured = [r for r in rows if r["psnr"] is not None and r.get(key) is not None]
        ids = {id(r) for r in measured}
        for r in rows:
            r[field] = [
                label(o) for o in measured
                if id(r) in ids and o is not r and o[key] >= r[key] and o["psnr"] <= r["psnr"]
                and (o[key] > r[key] or o["psnr"] < r["psnr"])
            ]


def frontier_table(rows: list[dict]) -> list[list[str]]:
    """Header and rows as text, for frontier.csv readers and the report."""
    from veil.report import ATTACKER_NAMES, db, pct

    def who(name: str | None) -> str:
        return f" ({ATTACKER_NAMES.get(name, name)})" if name else ""

    def dominated(r: dict, field: str, key: str) -> str:
        return ", ".join(r.get(field) or []) or ("none" if r["psnr"] is not None and r.get(key) is not None else "n/a")

    stored = any(r.get("store_accuracy") is not None for r in rows)  # columns only for sweeps that trained them
    out = [["defence", "strength", "in-run test accuracy" if stored else "test accuracy"] + (["store classifier accuracy"] if stored else [])
           + ["strongest attacker PSNR (dB)", "re-identification top-1", "chance", "constant-image floor (dB)",
              "undefended attacker PSNR (dB)", "dominated by"] + (["dominated by (store accuracy)"] if stored else [])]
    for r in rows:
        out.append(
            [r["defence"], f"{strength_label(r['defence'])} = {r['strength']:g}",
             pct(r["test_accuracy"])] + ([pct(r.get("store_accuracy"))] if stored else [])
            + [db(r["psnr"]) + who(r["psnr_attacker"]), pct(r["reid_top1"], 1) + who(r["reid_attacker"]),
               pct(1 / r["n_candidates"], 1) if r["n_candidates"] else "n/a", db(r["floor_psnr"]), db(r["undefended_psnr"]),
               dominated(r, "dominated_by", "test_accuracy")]
            + ([dominated(r, "store_dominated_by", "store_accuracy")] if stored else []))
    return out


def plot_frontier(rows: list[dict]) -> bytes:
    """Accuracy (%) against the strongest attacker's PSNR (dB) and re-identification rate (%): solid lines
    for the in-run classifier, dotted with hollow markers for the store classifier where there is one."""
    from veil.report import line_style, new_figure, png_bytes

    fig = new_figure(10.0, 4.2)
    left, right = fig.subplots(1, 2, sharey=True)
    done = [r for r in rows if r["psnr"] is not None and r["test_accuracy"] is not None]
    for i, line in enumerate(dict.fromkeys(r.get("line", r["defence"]) for r in done)):  # one line per defence (and sweep)
        pts = sorted((r for r in done if r.get("line", r["defence"]) == line), key=lambda r: r["strength"])
        sym = point_symbol(pts[0]["defence"])
        for ax, key, scale in ((left, "psnr", 1.0), (right, "reid_top1", 100.0)):
            xs, ys = [scale * r[key] for r in pts], [100 * r["test_accuracy"] for r in pts]
            ax.plot(xs, ys, label=line, markersize=7, linewidth=1.6, **line_style(i))
            for x, y, r in zip(xs, ys, pts):
                ax.annotate(f"{sym}={r['strength']:g}", (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
            stored = [(scale * r[key], 100 * r["store_accuracy"]) for r in pts if r.get("store_accuracy") is not None]
            if stored:  # the same points, with a classifier trained on their stored features: hollow markers, dotted
                style = dict(line_style(i), linestyle=":", markerfacecolor="none")
                ax.plot(*zip(*stored), label=f"{line}, store classifier", markersize=7, linewidth=1.2, **style)
    floors = {r["floor_psnr"] for r in done}
    for j, f in enumerate(sorted(floors)):
        left.axvline(f, color="#555555", linestyle=":", linewidth=1.2, label="constant-image floor" if j == 0 else None)
    ceilings = [r["undefended_psnr"] for r in done if r["undefended_psnr"] is not None]
    if ceilings:
        left.axvline(max(ceilings), color="#555555", linestyle="--", linewidth=1.2, label="undefended (best attacker)")
    chances = {r["n_candidates"] for r in done}
    for j, n in enumerate(sorted(chances)):
        right.axvline(100 / n, color="#555555", linestyle=":", linewidth=1.2, label="chance (1/N)" if j == 0 else None)
    base = [r["pretrain_test_accuracy"] for r in done if r["pretrain_test_accuracy"] is not None]
    for ax in (left, right):
        if base:
            ax.axhline(100 * base[0], color="#888888", linestyle="-.", linewidth=1.0, label="pretrained baseline")
        ax.margins(x=0.12, y=0.08)  # room for the point labels
        ax.grid(True, color="#cccccc", linewidth=0.6)
        ax.legend(fontsize=8)
    left.set_xlabel("strongest attacker's PSNR on users' images (dB)")
    right.set_xlabel("strongest attacker's re-identification top-1 (%)")
    left.set_ylabel("test accuracy (%)")
    return png_bytes(fig)


def write_frontier(sweep_dir: Path, rows: list[dict]) -> None:
    sweep_dir = Path(sweep_dir)
    atomic_write_json(sweep_dir / "frontier.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "frontier.csv", buf.getvalue())
    if any(r["psnr"] is not None and r["test_accuracy"] is not None for r in rows):
        atomic_write_bytes(sweep_dir / "frontier.png", plot_frontier(rows))
