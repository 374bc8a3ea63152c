"""What `veil train`, `veil attack` and `veil sweep` leave behind, read and checked; and how its numbers read.

    attack.json      floor, defended and undefended tables (read_attack checks the fields every reader uses)
    a run directory  config.yaml, metrics.jsonl, summary.json, attack/ (read_run -> RunResults)
    matrix.json      the Table 3 matrix of `veil attack --matrix` (read_matrix)

Used by the report, the frontier of a sweep, the attack's own tables and the CLI, so that an
attacker is named, ordered and printed the same way everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from veil import config as config_mod
from veil.defences import describe, get_defence, round_phases, strength_of
from veil.errors import ReportError
from veil.io import CheckpointError
from veil.rundir import read_metrics
from veil.sweepdir import SWEEP_FILE, sweep_runs

# attack.json: the floor, then one table per obfuscator attacked, each {attacker: its scores}.
FLOOR = "floor"
OBFUSCATORS = ("defended", "undefended")
WHITEBOX = "whitebox"
ATTACK_FIELDS = ("psnr_mean", "psnr_std", "ssim_mean", "reid_top1", "reid_top5", "n_candidates")
# attack.json's "linkage": {obfuscator: re-identification by feature matching}, apart from the attackers'
# tables: it rebuilds no image, so it has no PSNR and is never the strongest attacker of a frontier.
LINKAGE = "linkage"
LINKAGE_FIELDS = ("reid_top1", "reid_top5", "n_candidates")
LINKAGE_LABEL = "linkage: feature matching (attacker computes f(candidate))"
# attack.json's "class_floor": {"true" | "predicted": scores of the attacker's mean image of the user's class}:
# what the label alone gives away, the lowest re-identification a store that classifies can reach.
CLASS_FLOOR = "class_floor"
CLASS_FLOOR_LABELS = {"true": "class mean, true label", "predicted": "class mean, label the run's classifier reads"}
# attack.json's "reference_stores": {"image" | "label": the same scores as an attacker's, plus "linkage" (exact and
# "changed" copies, code entropy) and "bytes_per_item"}: the reference stores every configuration sits between (attack/references.py).
REFERENCES = "reference_stores"
# attack.json's "scoring_version": 2 splits re-identification ties (expected rank; `_lower` beside it counts them against
# the attacker), averages a random f's draws for linkage, flags unconverged attackers and scores the white-box against
# the floor of its own users. An attack.json of another version is not reused; 1 is one made before the field existed.
SCORING_VERSION = 2

ATTACKER_ORDER = ("simrec", "urec1", "urec2", "resrec", WHITEBOX, "unet", "consistency", "adversarial", "decoder-inversion")  # display order; others follow
ATTACKER_NAMES = {"simrec": "SimRec", "urec1": "URec#1", "urec2": "URec#2", "resrec": "ResRec", WHITEBOX: "white-box", "unet": "U-Net",
                  "consistency": "consistency (U-Net)", "adversarial": "adversarial (U-Net)", "decoder-inversion": "decoder-started inversion"}


# ----------------------------------------------------------------------------- numbers as text


def pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def db(v: float | None, std: float | None = None, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return (f"{v:.2f} ± {std:.2f}" if std is not None else f"{v:.2f}") + unit


# ----------------------------------------------------------------------------- attack results


def read_attack(path: Path) -> dict:
    """attack.json, with the fields the report relies on checked (floor, defended, undefended)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    floor = data.get(FLOOR)
    if not isinstance(floor, dict) or not all(isinstance(floor.get(k), (int, float)) for k in ("psnr", "ssim")):
        raise ReportError(f"{path}: 'floor' must be {{'psnr': number, 'ssim': number}}, got {floor!r}")
    for side in OBFUSCATORS:
        table = data.get(side)
        if not isinstance(table, dict):
            raise ReportError(f"{path}: '{side}' must map attacker names to their metrics, got {table!r}")
        for attacker, row in table.items():
            _require_numbers(row, ATTACK_FIELDS, f"{path}: {side}['{attacker}']")
    linkage = data.get(LINKAGE, {})  # absent from an attack.json made before it existed
    if not isinstance(linkage, dict):
        raise ReportError(f"{path}: '{LINKAGE}' must map obfuscators to their feature-matching scores, got {linkage!r}")
    for side, row in linkage.items():
        _require_numbers(row, LINKAGE_FIELDS, f"{path}: {LINKAGE}['{side}']")
    return data


def _require_numbers(row: object, fields: tuple[str, ...], where: str) -> None:
    missing = [k for k in fields if not isinstance(row, dict) or not isinstance(row.get(k), (int, float))]
    if missing:
        raise ReportError(f"{where} lacks numeric {', '.join(missing)} (expected {', '.join(fields)})")


def defence_label(result: dict) -> str:
    """An attack.json's defence ('λ=1', 'NoPeek α=2', 'none'); 'λ=<lambda>' for one made before it was recorded."""
    return result.get("defence") or f"λ={result['lambda_privacy']:g}"


def strongest(table: dict, key: str, floor: dict | None = None) -> tuple[str, float] | None:
    """(attacker, value) of the attacker with the highest `key` (PSNR or SSIM). Given attack.json's `floor`, ranked
    by the margin above the floor of the users each was scored on: the white-box inverts only the first users and
    carries their floor (floor_psnr / floor_ssim), every other attacker was scored on all of them."""
    if not table:
        return None
    floor_key, floor_all = {"psnr_mean": ("floor_psnr", "psnr"), "ssim_mean": ("floor_ssim", "ssim")}.get(key, (None, None))

    def margin(a: str) -> float:
        r = table[a]
        if floor is None or floor_key is None:
            return r[key]
        return r[key] - r.get(floor_key, floor[floor_all])

    name = max(table, key=margin)
    return name, table[name][key]


def strongest_reid(table: dict) -> tuple[str, float] | None:
    """(attacker, top-1) of the highest re-identification over attackers and both match rules: pixel MSE
    ('unet') and, where attack.json has it, per-channel standardised MSE ('unet, standardised')."""
    rates = [(a, r["reid_top1"]) for a, r in table.items()]
    rates += [(f"{a}, standardised", r["reid_std_top1"]) for a, r in table.items() if "reid_std_top1" in r]
    return max(rates, key=lambda x: x[1]) if rates else None


def attacker_order(names: list[str] | set[str]) -> list[str]:
    return [a for a in ATTACKER_ORDER if a in names] + sorted(set(names) - set(ATTACKER_ORDER))


# ----------------------------------------------------------------------------- runs


@dataclass
class RunResults:
    """Everything the report shows about one run, read from its directory."""

    path: Path
    name: str
    config: config_mod.Config
    config_text: str
    metrics: list[dict]
    summary: dict
    attack: dict | None  # attack/attack.json, checked against the harness's contract
    attack_pngs: list[Path] = field(default_factory=list)

    @property
    def defended(self) -> bool:
        """The run's defence trained rounds at a strength above 0 (λ = 0, α = 0 or `none` count as undefended)."""
        return bool(get_defence(self.config.train.defence).round_phases) and strength_of(self.config) > 0

    @property
    def reconstructor(self) -> str:
        return self.config.model.reconstructor

    @property
    def defence(self) -> str:
        """'λ=0.1' for the paper's adversarial training, else the defence and its strength."""
        return describe(self.config)


def read_run(path: str | Path) -> RunResults:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path}: not a Veil run directory (no config.yaml)")
    cfg = config_mod.load(path / "config.yaml")
    summary = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{path / 'summary.json'}: not valid JSON ({e})") from None
    attack_dir = path / "attack"
    attack = read_attack(attack_dir / "attack.json") if (attack_dir / "attack.json").is_file() else None
    return RunResults(
        path=path,
        name=path.name,
        config=cfg,
        config_text=(path / "config.yaml").read_text(),
        metrics=read_metrics(path),
        summary=summary,
        attack=attack,
        attack_pngs=sorted(attack_dir.glob("*.png")) if attack_dir.is_dir() else [],
    )


def read_matrix(path: Path) -> dict:
    """matrix.json of `veil attack --matrix`: rows (attackers), columns (runs), psnr[row][column]."""
    try:
        m = json.loads(path.read_text())
        for row in m["rows"]:
            for col in m["columns"]:
                if not isinstance(m["psnr"][row][col], (int, float)):
                    raise TypeError(f"psnr['{row}']['{col}'] is {m['psnr'][row][col]!r}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ReportError(f"{path}: not a Table 3 matrix of veil attack --matrix ({type(e).__name__}: {e})") from None
    return m


def expand_dirs(dirs: list[Path]) -> tuple[list[Path], list[Path], list[tuple[Path, dict]]]:
    """(run directories, sweep directories, matrices): a sweep or matrix directory stands for its runs."""
    runs: list[Path] = []
    sweeps, matrices = [], []
    for d in dirs:
        d = Path(d)
        if (d / SWEEP_FILE).is_file():
            sweeps.append(d)
            runs += sweep_runs(d)
        elif (d / "config.yaml").is_file():
            runs.append(d)
        elif (d / "matrix.json").is_file():
            m = read_matrix(d / "matrix.json")
            matrices.append((d, m))
            runs += [Path(r) for r in m.get("runs", []) if (Path(r) / "config.yaml").is_file()]
        else:
            raise CheckpointError(f"{d}: not a Veil run directory (no config.yaml), sweep directory (no {SWEEP_FILE}) or attack matrix (no matrix.json)")
    seen, unique = set(), []
    for r in runs:  # a run named twice (directly and through a sweep or matrix) is reported once
        if r.resolve() not in seen:
            seen.add(r.resolve())
            unique.append(r)
    return unique, sweeps, matrices


def unique_names(runs: list[RunResults]) -> None:
    """Directory names, made unique with the parent folder where two runs share one."""
    names = [r.path.name for r in runs]
    for r in runs:
        if names.count(r.path.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"


# ----------------------------------------------------------------------------- per round


def accuracy_by_round(metrics: list[dict]) -> dict[int, float]:
    """Table 2: test accuracy after pretraining (round 0) and at the end of each adversarial round."""
    ends = round_phases()  # (a), (b), (c), or another defence's own phase
    out: dict[int, float] = {}
    pre = [m for m in metrics if m["phase"] == "pretrain" and "test_accuracy" in m]
    if pre:
        out[0] = pre[-1]["test_accuracy"]
    for m in metrics:  # the last phase-epoch of a round wins: its end
        if m["phase"] in ends and "test_accuracy" in m:
            out[m["round"]] = m["test_accuracy"]
    return out


def psnr_by_round(metrics: list[dict]) -> dict[int, float]:
    """The training reconstructor's test PSNR after it trained against each round's obfuscator
    (round 0: the warm-up against the undefended one; round k: the end of phase (b))."""
    out: dict[int, float] = {}
    for m in metrics:
        if "test_psnr" not in m:
            continue
        if m["phase"] == "reconstructor_warmup":
            out[0] = m["test_psnr"]
        elif m["phase"] == "reconstructor":
            out[m["round"]] = m["test_psnr"]
    return out


def shown_rounds(rounds: set[int]) -> list[int]:
    """All rounds up to 20; beyond that 0, 1, every 10th and the last (as the paper's Table 2)."""
    ordered = sorted(rounds)
    if len(ordered) <= 21:
        return ordered
    return [k for k in ordered if k <= 1 or k % 10 == 0 or k == ordered[-1]]

