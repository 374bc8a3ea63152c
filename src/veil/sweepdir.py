"""A sweep directory as `veil sweep` writes it, and how to read it back (as rundir.py for a run).

    DIR/sweep.json          the points (defence, strength, run directory) and the settings
    DIR/<point>/            one `veil train` run directory each, attacked into its attack/
    DIR/<point>/store-classifier/   a classifier trained on the point's stored features (optional)
    DIR/<point>/growth/     with --growth: `veil growth`'s measurement of the point (growth.json)
    DIR/image-store/        the image store's two classifiers, shared by every point's growth measurement
    DIR/<point>/cost.json   the wall seconds the point cost: training, attacking, its store classifier, its growth
    DIR/<point>/forked.json a point that started from another point's pretraining: which, and its sha256s
    DIR/ceilings.json       the undefended attack (the ceiling), made once per pretrained split

Read by the sweep itself (to resume), the frontier and the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from veil.defences import DEFENCES, get_defence
from veil.errors import ConfigError

SWEEP_FILE = "sweep.json"
CEILINGS_FILE = "ceilings.json"  # the undefended attacks, one per distinct undefended obfuscator
STORE_CLASSIFIER = "store-classifier"  # in each run: the classifier trained on its stored features
GROWTH = "growth"  # in each run, with --growth: veil growth's folder
IMAGE_STORE = "image-store"  # in the sweep: the image store's classifiers, one pair for every point
COST_FILE = "cost.json"  # in each run: what the point cost the sweep, in seconds


@dataclass(frozen=True)
class Point:
    defence: str
    strength: float
    name: str  # the run directory inside the sweep directory


def point_name(defence: str, strength: float) -> str:
    """'lambda-0.1'; a defence without a strength is one point named after it ('none'); one whose strength
    label an earlier defence of the registry uses too is prefixed with its name ('reid-lambda-1')."""
    d = get_defence(defence)
    if not d.strength_key:
        return d.name
    earlier = list(DEFENCES)[: list(DEFENCES).index(defence)]
    shared = any(DEFENCES[e].strength_key and DEFENCES[e].strength_label == d.strength_label for e in earlier)
    return f"{defence + '-' if shared else ''}{d.strength_label}-{strength:g}"


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
