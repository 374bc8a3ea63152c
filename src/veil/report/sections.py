"""Results -> one page: the paper's Table 2/3 and Figures 3-5, every attack table, configs.

    veil report RUN_DIR [RUN_DIR ...] [--out DIR]
        DIR/report.html    self-contained: figures embedded as base64 PNG, opens offline
        DIR/report.md      the same content; figures as DIR/report-*.png beside it

A run directory is read as `veil train` and `veil attack` left it (config.yaml, metrics.jsonl,
summary.json, attack/attack.json and the attack PNGs). Figures 4 and 5 are recomputed from the
run's own networks on the first users' (test) images. A sweep directory (`veil sweep`) is a
RUN_DIR too: its runs are reported, headed by the utility-privacy frontier.

Reading the runs is attack/results.py, the page model and its HTML/Markdown rendering page.py, the
plot leaves veil/plots.py and the frontier frontier.py; this file lays the page out. matplotlib is
imported lazily, through its object API (no pyplot, no global backend).
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from veil import config as config_mod
from veil.attack.results import (
    ATTACKER_NAMES,
    CLASS_FLOOR,
    CLASS_FLOOR_LABELS,
    LINKAGE,
    LINKAGE_LABEL,
    RunResults,
    accuracy_by_round,
    attacker_order,
    db,
    expand_dirs,
    pct,
    psnr_by_round,
    read_run,
    shown_rounds,
    strongest,
    strongest_reid,
    unique_names,
)
from veil.attack.tables import flag_marks
from veil.data import DataError, load_splits, to_float
from veil.errors import ReportError
from veil.io import atomic_write_bytes, atomic_write_text, load_module
from veil.metrics import psnr
from veil.models import build_reconstructor
from veil.plots import line_style, new_figure, plot_image_rows, png_bytes
from veil.report.frontier import frontier_rows, frontier_table, growth_points, mark_dominated, plot_frontier, plot_growth_frontier
from veil.report.page import Figure, Page, Table, render_html, render_markdown
from veil.rundir import load_run
from veil.version import __version__

# ----------------------------------------------------------------------------- labels


def label(run: RunResults, runs: list[RunResults]) -> str:
    """Short legend label: the training reconstructor, with the defence (lambda) when runs differ in it."""
    base = ATTACKER_NAMES.get(run.reconstructor, run.reconstructor)
    if len({r.defence for r in runs}) > 1:
        base += f", {run.defence}"
    keys = [(r.reconstructor, r.defence) for r in runs]
    if keys.count((run.reconstructor, run.defence)) > 1:
        base += f" ({run.name})"
    return base


# ----------------------------------------------------------------------------- plots


def plot_accuracy_by_round(runs: list[RunResults]) -> bytes:
    """Figure 3 style: test accuracy against adversarial round, one line per run."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        acc = accuracy_by_round(run.metrics)
        xs = sorted(acc)
        ax.plot(xs, [100 * acc[x] for x in xs], label=label(run, runs), markersize=5, linewidth=1.6, **line_style(i))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("adversarial round (0 = pretrained baseline)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, color="#cccccc", linewidth=0.6)
    ax.legend(title="training reconstructor", fontsize=8, title_fontsize=8)
    return png_bytes(fig)


# ----------------------------------------------------------------------------- reconstructions


@dataclass
class Reconstructions:
    """One row of Figure 4 or 5: a network pair's reconstructions of the shown users' images."""

    label: str
    images: torch.Tensor
    psnr: list[float]


@torch.no_grad()
def reconstruction_row(obfuscator: torch.nn.Module, reconstructor: torch.nn.Module, images: torch.Tensor, row_label: str) -> Reconstructions:
    out = reconstructor(obfuscator(images)).clamp(0, 1)
    return Reconstructions(row_label, out, psnr(images, out).tolist())


def users_images(cfg: config_mod.Config, n: int, cache: dict) -> torch.Tensor:
    """The first `n` users' (test) images of a run's split, in [0, 1]; splits cached by data config."""
    key = (config_mod.to_yaml(config_mod.Config(data=cfg.data)), cfg.seed)
    if key not in cache:
        cache[key] = load_splits(cfg.data, cfg.seed).test
    return to_float(cache[key].images[:n])


def undefended_reconstructor(run_path: Path, run) -> torch.nn.Module | None:  # noqa: ANN001
    """The reconstructor trained against the undefended obfuscator (saved after the warm-up), if any."""
    path = run_path / "checkpoints" / "undefended" / "reconstructor.safetensors"
    if run.undefended_obfuscator is None or not path.is_file():
        return None
    m = run.config.model
    r = build_reconstructor(m.reconstructor, run.undefended_obfuscator.out_channels, run.channels, m.width, m.split)
    load_module(r, path)
    return r.eval()


def reconstruction_figures(runs: list[RunResults], n_images: int, page: Page, figures: list[Figure]) -> None:
    """Figures 4 and 5, one of each per group of runs that share their users' images."""
    groups: dict[tuple, list[RunResults]] = {}
    for run in runs:
        groups.setdefault((config_mod.to_yaml(config_mod.Config(data=run.config.data)), run.config.seed), []).append(run)
    cache: dict = {}
    page.add("h2", "Figure 4 style: users' images and their reconstructions")
    page.add("p", f"The first {n_images} users' (test) images of each run's split, above their reconstructions by each run's final training "
             "reconstructor against its final obfuscator; the number under each image is its PSNR (Eq. 1, dB).")
    fig5_blocks: list[tuple[str, object]] = []
    for g, group in enumerate(groups.values()):
        suffix = f"-{g + 1}" if len(groups) > 1 else ""
        try:
            originals = users_images(group[0].config, n_images, cache)
        except (DataError, config_mod.ConfigError) as e:
            page.add("p", f"Not drawn for {', '.join(r.name for r in group)}: their users' images cannot be loaded here ({e}). "
                     "Run `veil report` where the run's data path resolves (data.path is relative to the working directory).")
            continue
        loaded = {r.name: load_run(r.path) for r in group}
        rebuilt = {r.name: reconstruction_row(loaded[r.name].obfuscator, loaded[r.name].reconstructor, originals, label(r, runs)) for r in group}
        rows = [Reconstructions("original", originals, None)] + list(rebuilt.values())  # type: ignore[arg-type]
        name = f"report-figure4-reconstructions{suffix}.png"
        fig = Figure(name, plot_image_rows([(x.label, x.images, x.psnr) for x in rows]),
                     f"Figure 4 style: users' images (top) and reconstructions by each run's training reconstructor ({group[0].config.data.dataset}).")
        figures.append(fig)
        page.add("figure", fig)

        # Figure 5: undefended against defended, on the same images. The undefended row is the
        # paper's variant, a lambda = 0 run (same training reconstructor first: same schedule, so the
        # same training effort); else the run's own reconstructor after the warm-up against the
        # pretrained obfuscator (fewer epochs than the defended row's final refit).
        defended = [r for r in group if r.defended]
        same = defended[0].reconstructor if defended else None
        plain = sorted((r for r in group if not r.defended), key=lambda r: r.reconstructor != same)
        undefended: Reconstructions | None = None
        if plain:
            undefended = Reconstructions(f"undefended (λ=0, {plain[0].name})", rebuilt[plain[0].name].images, rebuilt[plain[0].name].psnr)
        for r in defended if undefended is None else []:
            net = loaded[r.name]
            rec = undefended_reconstructor(r.path, net)
            if rec is not None:
                undefended = reconstruction_row(net.undefended_obfuscator, rec, originals, f"undefended ({r.name} after pretraining and warm-up)")
                break
        if undefended is None or not defended:
            fig5_blocks.append(("p", f"Not drawn for {', '.join(r.name for r in group)}: it needs a defended run (a defence with a strength > 0) and either "
                                "its saved undefended reconstructor (checkpoints/undefended/reconstructor.safetensors) or an undefended run (λ = 0, or defence none) on the same data."))
            continue
        rows5 = [rows[0], undefended] + [Reconstructions(f"defended ({rebuilt[r.name].label})", rebuilt[r.name].images, rebuilt[r.name].psnr) for r in defended]
        name = f"report-figure5-undefended-vs-defended{suffix}.png"
        fig = Figure(name, plot_image_rows([(x.label, x.images, x.psnr) for x in rows5]),
                     "Figure 5 style: reconstructions against the undefended obfuscator (second row: an undefended run when given, else the run's "
                     "reconstructor after its warm-up against the pretrained obfuscator) and the defended one (below); PSNR in dB.")
        figures.append(fig)
        fig5_blocks.append(("figure", fig))
        mean = [sum(x.psnr) / len(x.psnr) for x in rows5[1:]]
        fig5_blocks.append(("p", "Mean PSNR of the shown images: " + "; ".join(f"{x.label}: {m:.2f} dB" for x, m in zip(rows5[1:], mean)) + "."))
    page.add("h2", "Figure 5 style: undefended against defended")
    for block in fig5_blocks:
        page.add(*block)


# ----------------------------------------------------------------------------- sections


def overview_table(runs: list[RunResults]) -> Table:
    rows = []
    for r in runs:
        s, acc = r.summary, accuracy_by_round(r.metrics)
        top = strongest(r.attack["defended"], "psnr_mean", r.attack["floor"]) if r.attack else None
        top_ssim = strongest(r.attack["defended"], "ssim_mean", r.attack["floor"]) if r.attack else None
        top_reid = strongest_reid(r.attack["defended"]) if r.attack else None
        rows.append([
            r.name, r.config.data.dataset, ATTACKER_NAMES.get(r.reconstructor, r.reconstructor), r.defence, f"{r.config.model.width:g}",
            str(max((k for k in acc), default=0)), pct(acc.get(0)), pct(s.get("final_test_accuracy", acc[max(acc)] if acc else None)),
            db(s.get("undefended_test_psnr")), db(s.get("final_test_psnr")),
            f"{db(top[1])} ({ATTACKER_NAMES.get(top[0], top[0])})" if top else "not attacked",
            f"{top_ssim[1]:.3f} ({ATTACKER_NAMES.get(top_ssim[0], top_ssim[0])})" if top_ssim else "not attacked",
            f"{pct(top_reid[1], 1)} ({top_reid[0]})" if top_reid else "not attacked",
            "finished" if s else f"partial ({len(r.metrics)} phase-epochs)",
        ])
    return Table(
        ["run", "data", "training reconstructor", "defence", "width", "rounds", "pretrained accuracy", "final accuracy",
         "training r PSNR before (dB)", "training r PSNR after (dB)", "strongest attacker PSNR (dB)",
         "strongest SSIM", "strongest re-identification top-1", "state"],
        rows,
        "Accuracy on the users' (test) images; PSNR (Eq. 1) of the training reconstructor before adversarial training (warm-up) and after (final refit); "
        "the strongest attacker per metric (PSNR, SSIM and re-identification may come from different attackers), named beside each.",
    )


def table2(runs: list[RunResults], page: Page) -> None:
    accs = [accuracy_by_round(r.metrics) for r in runs]
    psnrs = [psnr_by_round(r.metrics) for r in runs]
    rounds = shown_rounds(set().union(*accs, *psnrs))
    names = [label(r, runs) for r in runs]
    note = " Rounds beyond 20 are shown at 0, 1, every 10th and the last." if len(rounds) < len(set().union(*accs)) else ""
    page.add("h2", "Table 2 style: test accuracy per adversarial round")
    page.add("table", Table(
        ["round"] + names,
        [[("0 (pretrained)" if k == 0 else str(k))] + [pct(a.get(k)) for a in accs] for k in rounds],
        "Test accuracy at the end of each round of Algorithm 1 (after phase (c)); round 0 is the pretrained baseline. NoPeek and noise runs: the end of each of their epochs, which stand in for the rounds." + note,
    ))
    page.add("table", Table(
        ["round"] + names,
        [[("0 (warm-up)" if k == 0 else str(k))] + [db(p.get(k)) for p in psnrs] for k in rounds],
        "The training reconstructor's test PSNR (dB) after it trained against the round's obfuscator (end of phase (b); round 0: the warm-up against the undefended obfuscator).",
    ))


def attack_section(run: RunResults, page: Page, figures: list[Figure]) -> None:
    a = run.attack
    assert a is not None
    page.add("h3", f"{run.name}")
    floor, defended, undefended = a["floor"], a["defended"], a["undefended"]
    n = {row["n_candidates"] for row in list(defended.values()) + list(undefended.values())}
    rows, flagged = [], []
    for name in attacker_order(set(defended) | set(undefended)):
        d, u = defended.get(name), undefended.get(name)
        note = ""
        if d is not None and d["psnr_mean"] < d.get("floor_psnr", floor["psnr"]):
            note = "below floor: under-trained attacker, not privacy"
            flagged.append(name)
        elif d is not None and flag_marks(d):
            note = f"not converged{flag_marks(d)}: a lower bound"
        rows.append([
            ATTACKER_NAMES.get(name, name),
            db(d["psnr_mean"], d["psnr_std"]) if d else "n/a", f"{d['ssim_mean']:.3f}" if d else "n/a",
            pct(d["reid_top1"], 1) if d else "n/a", pct(d["reid_top5"], 1) if d else "n/a",
            db(u["psnr_mean"], u["psnr_std"]) if u else "n/a", f"{u['ssim_mean']:.3f}" if u else "n/a",
            pct(u["reid_top1"], 1) if u else "n/a", pct(u["reid_top5"], 1) if u else "n/a", note,
        ])
    if a.get(LINKAGE):  # feature matching: re-identification only, apart from the attackers above
        d, u = a[LINKAGE].get("defended"), a[LINKAGE].get("undefended")
        rows.append([
            LINKAGE_LABEL, "—", "—", pct(d["reid_top1"], 1) if d else "n/a", pct(d["reid_top5"], 1) if d else "n/a",
            "—", "—", pct(u["reid_top1"], 1) if u else "n/a", pct(u["reid_top5"], 1) if u else "n/a",
            "rebuilds no image: not one of the PSNR attackers; a deterministic f cannot hide it",
        ])
    rows.append(["constant image (floor)", db(floor["psnr"]), f"{floor['ssim']:.3f}", "", "", db(floor["psnr"]), f"{floor['ssim']:.3f}", "", "", "the attacker-split mean image"])
    for k, r in a.get(CLASS_FLOOR, {}).items():  # the label alone: what a store that classifies cannot help giving away
        cells = [db(r["psnr_mean"]), f"{r['ssim_mean']:.3f}", pct(r["reid_top1"], 1), pct(r["reid_top5"], 1)]
        rows.append([CLASS_FLOOR_LABELS[k], *cells, *(cells if k == "true" else ["—"] * 4), "the attacker's mean image of that class"])
    for k in sorted(n):
        rows.append([f"chance (N = {k})", "", "", pct(1 / k, 1), pct(min(1.0, 5 / k), 1), "", "", pct(1 / k, 1), pct(min(1.0, 5 / k), 1), ""])
    page.add("table", Table(
        ["attacker", "defended PSNR (dB)", "defended SSIM", "defended re-id top-1", "defended re-id top-5",
         "undefended PSNR (dB)", "undefended SSIM", "undefended re-id top-1", "undefended re-id top-5", "note"],
        rows,
        f"Chosen Image Attack on {run.name} ({run.defence}): attackers trained on the attacker split, measured on the users' images. "
        "Floor: the best constant image; ceiling: the same attackers against the undefended obfuscator. PSNR mean ± standard deviation.",
    ))
    settings = {k: a[k] for k in ("settings", "seed") if k in a}
    if settings:
        page.add("pre", json.dumps(settings, indent=1, sort_keys=True))
    for png in run.attack_pngs:
        fig = Figure(f"report-attack-{slug(run.name)}-{png.name}", png.read_bytes(), f"{run.name}: {png.name} (written by veil attack)")
        figures.append(fig)
        page.add("figure", fig)


def matrix_table(directory: Path, m: dict, page: Page) -> None:
    """Table 3 as `veil attack --matrix` computed it (rows: attackers; columns: trained runs)."""
    cols, floor = m["columns"], m.get("floor", {})
    lam, defences = m.get("lambda_privacy", {}), m.get("defence", {})
    rows = [[ATTACKER_NAMES.get(r, r)] + [db(m["psnr"][r][c]) + (" (below floor)" if c in floor and m["psnr"][r][c] < floor[c] else "") for c in cols]
            for r in m["rows"]]
    if floor:
        rows.append(["constant image (floor)"] + [db(floor.get(c)) for c in cols])
    undefended = m.get("undefended") or {}
    for r in m["rows"]:
        if any((undefended.get(r) or {}).get(c) is not None for c in cols):
            rows.append([f"{ATTACKER_NAMES.get(r, r)} against undefended"] + [db((undefended.get(r) or {}).get(c)) for c in cols])
    page.add("table", Table(
        ["attack \\ training"] + [f"{c}, {defences[c]}" if c in defences else f"{c}, λ={lam[c]:g}" if c in lam else c for c in cols], rows,
        f"Mean PSNR (dB) on the users' images of each attack reconstructor (rows) against the defended obfuscator trained with each "
        f"training reconstructor (columns), from {directory / 'matrix.json'}; floor and undefended ceiling below.",
    ))


def table3(runs: list[RunResults], page: Page, matrices: list[tuple[Path, dict]] | None = None) -> None:
    """Rows: attack reconstructor; columns: the training reconstructor of each attacked run."""
    if matrices:
        page.add("h2", "Table 3 style: training reconstructor x attack reconstructor")
        for directory, m in matrices:
            matrix_table(directory, m, page)
        return
    attacked = [r for r in runs if r.attack]
    if len(attacked) < 2 or len({r.reconstructor for r in attacked}) < 2:
        return
    names = attacker_order(set().union(*(r.attack["defended"] for r in attacked)))
    page.add("h2", "Table 3 style: training reconstructor x attack reconstructor")
    page.add("table", Table(
        ["attack \\ training"] + [label(r, attacked) for r in attacked],
        [[ATTACKER_NAMES.get(a, a)] + [db(r.attack["defended"][a]["psnr_mean"]) if a in r.attack["defended"] else "n/a" for r in attacked] for a in names],
        "Mean PSNR (dB) on the users' images of each attack reconstructor (rows) against the obfuscator trained with each training reconstructor (columns).",
    ))


def growth_figure(rows: list[dict], name: str, page: Page, figures: list[Figure]) -> None:
    """The growth frontier, where some point of the rows measured its growth (veil sweep --growth)."""
    if growth_points(rows):
        fig = Figure(name, plot_growth_frontier(rows), "Growth ratio (a later classifier's gain from the later items over the image store's gain) "
                     "against the strongest attacker's PSNR above the class floor; the label store at (0, 0), the image store at 1; "
                     "shaded: ratio >= 0.67 within 0.2 dB of the class floor.")
        figures.append(fig)
        page.add("figure", fig)


def frontier_section(sweep_dir: Path, page: Page, figures: list[Figure]) -> None:
    rows = frontier_rows(sweep_dir)
    page.add("h2", f"Utility-privacy frontier: {sweep_dir.name}")
    if not any(r["psnr"] is not None for r in rows):
        page.add("p", "No run of this sweep has been attacked yet; the frontier needs attack/attack.json in each run.")
    else:
        fig = Figure(f"report-frontier-{slug(sweep_dir.name)}.png", plot_frontier(rows),
                     "Test accuracy against the strongest attacker's PSNR (left) and re-identification rate (right); one point per defence strength "
                     "(dotted, hollow: a classifier trained on the stored features, where the sweep trained one).")
        figures.append(fig)
        page.add("figure", fig)
    growth_figure(rows, f"report-growth-frontier-{slug(sweep_dir.name)}.png", page, figures)
    t = frontier_table(rows)
    page.add("table", Table(t[0], t[1:], "One row per sweep point. Strongest attacker: the highest mean PSNR (or top-1 rate) over the attackers; "
                            "(cap): --max-epochs stopped it before patience ran out; (best-last): its last epoch was its best; (under-fit): its training PSNR "
                            "was still below its held-out PSNR; each makes its PSNR a lower bound."))


def overlay_section(sweeps: list[Path], page: Page, figures: list[Figure]) -> None:
    """Several sweep directories: every defence's frontier on one plot, one line per (defence, sweep)."""
    rows = [dict(r, line=f"{r['defence']} ({d.name})", sweep=d.name) for d in sweeps for r in frontier_rows(d)]
    mark_dominated(rows, lambda r: f"{r['sweep']}/{r['name']}")
    page.add("h2", "Utility-privacy frontiers side by side: " + ", ".join(d.name for d in sweeps))
    if any(r["psnr"] is not None for r in rows):
        fig = Figure("report-frontier-overlay.png", plot_frontier(rows),
                     "Test accuracy against the strongest attacker's PSNR (left) and re-identification rate (right); one line per defence and sweep.")
        figures.append(fig)
        page.add("figure", fig)
    growth_figure(rows, "report-growth-frontier-overlay.png", page, figures)
    t = frontier_table(rows)
    page.add("table", Table(["sweep"] + t[0], [[r["sweep"]] + row for r, row in zip(rows, t[1:])],
                            "Every sweep's points; a higher accuracy at a lower attacker PSNR is the better trade-off."))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def versions() -> dict[str, str]:
    out = {"veil": __version__, "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    out["platform"] = platform.platform()
    return out


def config_section(run: RunResults, page: Page) -> None:
    page.add("h3", run.name)
    s = run.summary
    vers = {k: s[k] for k in ("veil_version", "torch_version", "seed", "seconds") if k in s}
    if vers:
        page.add("p", "Trained with: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".")
    if run.attack:
        vers = {k: run.attack[k] for k in ("veil_version", "torch_version", "seed", "device", "seconds", "date") if k in run.attack}
        if vers:
            page.add("p", "Attacked with: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".")
    page.add("p", f"Rerun: `veil train --config {run.path / 'config.yaml'} --out NEW_RUN`, then `veil attack NEW_RUN`.")
    page.add("pre", run.config_text)


# ----------------------------------------------------------------------------- entry point


MAX_IMAGES = 32  # --images: more would make a figure over 38 inches wide


def report(run_dirs: list[str | Path], out: str | Path | None = None, n_images: int = 8, log=print) -> dict[str, Path]:  # noqa: ANN001
    """Write report.html and report.md (and the figures beside them) for runs and sweeps."""
    if not run_dirs:
        raise ReportError("veil report needs at least one RUN_DIR")
    if not 1 <= n_images <= MAX_IMAGES:  # one row of Figures 4 and 5: 1.15 inches an image
        raise ReportError(f"--images must be in 1..{MAX_IMAGES} (users' images per row of Figures 4 and 5), got {n_images}")
    run_paths, sweeps, matrices = expand_dirs([Path(d) for d in run_dirs])
    out = Path(out) if out else Path(run_dirs[0])
    runs = [read_run(p) for p in run_paths]
    unique_names(runs)
    with_metrics = [r for r in runs if r.metrics]

    page = Page("Veil report: " + ", ".join(Path(d).name for d in run_dirs))
    figures: list[Figure] = []
    page.add("p", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `veil report {' '.join(str(d) for d in run_dirs)}` "
             f"(veil {versions()['veil']}, torch {torch.__version__}).")
    page.add("h2", "Runs")
    page.add("table", overview_table(runs))
    if len(sweeps) > 1:
        overlay_section(sweeps, page, figures)
    for sweep_dir in sweeps:
        frontier_section(sweep_dir, page, figures)
    if with_metrics:
        table2(with_metrics, page)
        fig = Figure("report-figure3-accuracy.png", plot_accuracy_by_round(with_metrics),
                     "Figure 3 style: test accuracy against adversarial round, one line per run (round 0 = pretrained baseline).")
        figures.append(fig)
        page.add("h2", "Figure 3 style: accuracy against round")
        page.add("figure", fig)
    finished = [r for r in runs if (r.path / "checkpoints" / "latest.json").is_file()]
    if finished:
        reconstruction_figures(finished, n_images, page, figures)
    left_out = [r.path.name for r in runs if r not in finished]
    if left_out:  # said, not dropped silently
        page.add("p", f"Figures 4 and 5 leave out {', '.join(left_out)}: no checkpoints/latest.json (training not started, or its checkpoints removed).")
    table3(runs, page, matrices)
    page.add("h2", "Attack tables (veil attack)")
    attacked = [r for r in runs if r.attack]
    if not attacked:
        page.add("p", "No run has been attacked yet: run `veil attack RUN_DIR` for privacy numbers with their floor and ceiling.")
    for r in attacked:
        attack_section(r, page, figures)
    page.add("h2", "Configs and software versions")
    page.add("p", "Report written with: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".")
    for r in runs:
        config_section(r, page)

    out.mkdir(parents=True, exist_ok=True)
    for f in figures:
        atomic_write_bytes(out / f.filename, f.png)
    atomic_write_text(out / "report.html", render_html(page))
    atomic_write_text(out / "report.md", render_markdown(page))
    log(f"veil report: wrote {out / 'report.html'} and {out / 'report.md'} ({len(figures)} figures)")
    return {"html": out / "report.html", "markdown": out / "report.md", **{f.filename: out / f.filename for f in figures}}
