"""The attack's results as files: attack.json/.csv/.md and one PNG per attacker; the Table 3 matrix as CSV and Markdown.

    RUN_DIR/attack/attack.json    every number, the settings, seed and versions (read back by results.read_attack)
    RUN_DIR/attack/attack.csv     one row per (obfuscator, attacker), the floor first
    RUN_DIR/attack/attack.md      the side-by-side table: defended | undefended, floor and chance
    RUN_DIR/attack/<attacker>.png users' images above their reconstructions, with PSNR
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from veil.attack.results import (
    CLASS_FLOOR,
    CLASS_FLOOR_LABELS,
    FLOOR,
    LINKAGE,
    LINKAGE_LABEL,
    OBFUSCATORS,
    REFERENCES,
    WHITEBOX,
    defence_label,
    strongest,
    strongest_reid,
)
from veil.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from veil.metrics import psnr
from veil.plots import plot_image_rows


def write_outputs(out: Path, result: dict, originals: torch.Tensor, figures: dict[str, dict]) -> None:
    atomic_write_json(out / "attack.json", result)
    atomic_write_text(out / "attack.csv", to_csv(result))
    atomic_write_text(out / "attack.md", to_markdown(result))
    names = list(dict.fromkeys(name for rows in figures.values() for name in rows))
    for name in names:
        rows = {which: figures[which][name] for which in OBFUSCATORS if name in figures.get(which, {})}
        plot_attacker(out / f"{name}.png", originals, rows, name)
    if len(figures.get("defended", {})) > 1:  # every attacker's answer for the same users, one row each
        plot_attacker(out / SIDE_BY_SIDE, originals, figures["defended"], "every attacker against the defended obfuscator")


SIDE_BY_SIDE = "attackers-side-by-side.png"


CSV_FIELDS = ("obfuscator", "attacker", "psnr_mean", "psnr_std", "ssim_mean", "reid_top1", "reid_top5", "n_candidates", "n_images", "below_floor",
              "epochs", "best_epoch", "seconds_per_epoch", "seconds", "reid_std_top1", "reid_std_top5", "stopped", "flags",
              "reid_top1_lower", "reid_top5_lower", "reid_std_top1_lower", "reid_tied", "floor_psnr")
COST_FIELDS = CSV_FIELDS[10:14]  # what an attacker cost (a learned one: epochs to its early stop); empty where it does not apply
STD_FIELDS = CSV_FIELDS[14:16]  # re-identification after standardising per channel; empty in an attack.json made before it
# "stopped": patience | cap (a learned attacker: what ended its training); empty for the others and in older attack.json
# "flags": a learned attacker's convergence flags (cap, best-last, under-fit), separated by '+'
LOWER_FIELDS = CSV_FIELDS[18:23]  # ties counted against the attacker, the share of tied queries, the floor over the users scored; empty before scoring version 2


def to_csv(result: dict) -> str:
    floor = result[FLOOR]
    lines = [",".join(CSV_FIELDS)]

    def row(which: str, name: str, r: dict) -> str:
        values = [which, name] + [f"{r[k]:.6g}" for k in CSV_FIELDS[2:7]] + [str(r["n_candidates"]), str(r["n_images"]), str(r["psnr_mean"] < r.get("floor_psnr", floor["psnr"])).lower()]
        return ",".join(values + [f"{r[k]:g}" if k in r else "" for k in COST_FIELDS] + [f"{r[k]:.6g}" if k in r else "" for k in STD_FIELDS]
                        + [r.get("stopped", ""), "+".join(r.get("flags", []))] + [f"{r[k]:.6g}" if k in r else "" for k in LOWER_FIELDS])

    lines.append(row(FLOOR, "mean_image", floor))
    for k, r in result.get(CLASS_FLOOR, {}).items():  # absent from an attack.json made before it existed
        lines.append(row(CLASS_FLOOR, f"{k}_class_mean", r))
    for k, r in result.get(REFERENCES, {}).items():  # the image, label and logits stores, scored like an attacker
        lines.append(row("reference", f"{k}_store", r))
    for which in OBFUSCATORS:
        for name, r in result.get(which, {}).items():
            lines.append(row(which, name, r))
    for which, r in result.get(LINKAGE, {}).items():  # no image rebuilt: no PSNR, SSIM or floor
        lines.append(",".join([which, LINKAGE, "", "", "", f"{r['reid_top1']:.6g}", f"{r['reid_top5']:.6g}", str(r["n_candidates"]), str(r["n_images"]), "",
                               "", "", "", f"{r['seconds']:g}" if "seconds" in r else "", "", "", "", ""]
                              + [f"{r[k]:.6g}" if k in r else "" for k in LOWER_FIELDS]))
    return "\n".join(lines) + "\n"


def _cell(r: dict | None, floor: float) -> list[str]:
    if not r:
        return ["n/a"] * 4
    flag = (" (!)" if r["psnr_mean"] < r.get("floor_psnr", floor) else "") + flag_marks(r)
    std = f" ({r['reid_std_top1']:.1%})" if "reid_std_top1" in r else ""
    return [f"{r['psnr_mean']:.2f} ± {r['psnr_std']:.2f}{flag}", f"{r['ssim_mean']:.3f}", f"{r['reid_top1']:.1%}{std}", f"{r['reid_top5']:.1%}"]


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: floor, then each attacker, defended | undefended."""
    floor = result[FLOOR]
    header = ["attacker", "defended PSNR (dB)", "SSIM", "top-1", "top-5", "undefended PSNR (dB)", "SSIM", "top-1", "top-5"]
    floor_cells = _cell(floor, -math.inf)
    rows = [["floor: mean image", *floor_cells, *floor_cells]]
    for k, r in result.get(CLASS_FLOOR, {}).items():  # the label as the only leak (the defended run's classifier for 'predicted')
        cells = _cell(r, -math.inf)
        rows.append([f"floor: {CLASS_FLOOR_LABELS[k]}", *cells, *(cells if k == "true" else ["—"] * 4)])
    for k, r in result.get(REFERENCES, {}).items():  # the reference stores every configuration sits between
        rows.append([f"reference: {REFERENCE_LABELS[k]}", *_cell(r, -math.inf), *["—"] * 4])
    names = list(dict.fromkeys([*result.get("defended", {}), *result.get("undefended", {})]))
    for name in names:
        label = name
        r = result.get("defended", {}).get(name) or result.get("undefended", {}).get(name)
        if name == WHITEBOX:
            label = f"whitebox ({r['n_images']} images)"
        elif "decoder" in r:  # the decoder-started inversion
            label = f"{name} ({r['n_images']} images, from {r['decoder']})"
        rows.append([label, *_cell(result.get("defended", {}).get(name), floor["psnr"]), *_cell(result.get("undefended", {}).get(name), floor["psnr"])])
    if result.get(LINKAGE):
        rows.append([LINKAGE_LABEL, *_linkage_cell(result[LINKAGE].get("defended")), *_linkage_cell(result[LINKAGE].get("undefended"))])
    return header, rows


REFERENCE_LABELS = {"image": "image store (keeps the images)", "label": "label store (keeps the class read)",
                    "logits": "logits store (keeps the classifier's logits)"}
COPY_LABELS = {"flip": "flipped", "shift": "shifted 2 px", "jpeg": "JPEG q50", "brighter": "10% brighter"}


def linkage_rows(result: dict) -> tuple[list[str], list[list[str]]] | None:
    """Linkage from the exact picture and from changed copies, with what each store holds (code entropy, distinct
    codes among the users' items, bytes per item): the obfuscators' rows and the reference stores'. None in an
    attack.json made without changed copies."""
    sources = {f"{which} obfuscator": r for which, r in result.get(LINKAGE, {}).items() if "changed" in r}
    sources.update({REFERENCE_LABELS[k]: r["linkage"] for k, r in result.get(REFERENCES, {}).items()})
    if not sources:
        return None
    kinds = list(dict.fromkeys(k for r in sources.values() for k in r.get("changed", {})))
    header = ["store", "exact copy", *[COPY_LABELS.get(k, k) for k in kinds], "code entropy (bits)", "distinct codes"]
    rows = [[name, f"{r['reid_top1']:.1%}", *[f"{r['changed'][k]['reid_top1']:.1%}" if k in r.get("changed", {}) else "n/a" for k in kinds],
             f"{r['code_entropy_bits']:.2f}", str(r["distinct_codes"])] for name, r in sources.items()]
    return header, rows


def flag_marks(r: dict) -> str:
    """' (cap)', ' (cap, best-last)', ...: a learned attacker's convergence flags (' (cap)' alone in an older attack.json)."""
    flags = r.get("flags", ["cap"] if r.get("stopped") == "cap" else [])
    return f" ({', '.join(flags)})" if flags else ""


def _linkage_cell(r: dict | None) -> list[str]:
    if not r:
        return ["n/a"] * 4
    lower = f" (≥{r['reid_top1_lower']:.1%})" if "reid_top1_lower" in r and r["reid_top1_lower"] != r["reid_top1"] else ""
    return ["—", "—", f"{r['reid_top1']:.1%}{lower}", f"{r['reid_top5']:.1%}"]


def _notes(result: dict) -> list[str]:
    chance = result["chance"]
    notes = [
        f"Re-identification: rank of the true image among {result[FLOOR]['n_candidates']} candidate users' images by pixel MSE "
        f"(chance: top-1 {chance['top1']:.1%}, top-5 {chance['top5']:.1%}); in brackets, top-1 after standardising each image "
        f"per channel (a match on shapes, not brightness or colour cast). Ties are split: a candidate exactly as close as the true "
        f"image shares the rank with it (a j-way tie at the top scores 1/j); linkage's cell gives in brackets the rate with every tie "
        f"counted against the attacker, a lower bound.",
    ]
    if result.get(CLASS_FLOOR):
        notes.append(
            "Class floors: each user's image rebuilt as the mean of the attacker's own images of one class, the user's true class "
            "(what any store that classifies perfectly gives away) or the class the run's own classifier (trained with the obfuscator) reads from the stored map. "
            "An attacker near these has learnt little beyond the label the store exists to give."
        )
    if result.get(REFERENCES):
        label, logits = result[REFERENCES].get("label"), result[REFERENCES].get("logits")
        notes.append(
            "Reference stores: the image store keeps the images (an attacker's answer is the image itself); the label store keeps only "
            "the class read by " + (f"{label['labels_from']} ({label['accuracy']:.2%} right on these users)" if label else "a pretrained classifier (none found)")
            + ", so its best image is the attacker's mean of that class and linkage can only match labels"
            + (f"; the logits store keeps that classifier's logits (float16), rebuilt as the mean of the attacker's {logits['neighbours']} "
               "images with the nearest logits (the number chosen on its held-out images) and linked by the nearest logits" if logits else "")
            + ". A configuration worth keeping sits between them: `veil growth` says what a later classifier learns from each."
        )
    acc = result.get("accuracy", {})
    if acc.get("defended") is not None or acc.get("undefended") is not None:
        shown = lambda a: "n/a" if a is None else f"{a:.2%}"  # noqa: E731
        notes.append(f"Test accuracy of the run's classifier: defended {shown(acc.get('defended'))}, undefended (after pretraining) {shown(acc.get('undefended'))}.")
    if result.get(LINKAGE):
        notes.append(
            "Linkage: the attacker computes f of each candidate image itself and ranks the candidates by the MSE between its feature map "
            "and the stored one; it rebuilds no image, so it has no PSNR and is not one of the attackers above. A deterministic f cannot hide it."
            + "".join(f" Against the {w} (random) obfuscator the attacker's template is the mean of {r['draws']} draws of f(candidate)."
                      for w, r in result[LINKAGE].items() if r.get("draws", 1) > 1)
        )
    for side in OBFUSCATORS:
        if result.get(side):
            notes.append(f"Strongest against the {side} obfuscator, per metric: " + strongest_line(result[side], result[FLOOR]) + ".")
    searched = {(side, a): r["search"] for side in OBFUSCATORS for a, r in result.get(side, {}).items() if "search" in r}
    if searched:
        notes.append("Searched (--search, picked by held-out PSNR on the attacker's own images): " + "; ".join(
            f"{side} {a}: lr {g['chosen']['lr']:g}, width {g['chosen']['width']:g} of {len(g['grid'])} points"
            + (f" ({sum('skipped' in q for q in g['grid'])} skipped, budget spent)" if any("skipped" in q for q in g["grid"]) else "")
            for (side, a), g in searched.items()) + ".")
    if result.get("step", 0) < result.get("steps", 0):
        notes.append(f"(!) The run had not finished training: its checkpoint at step {result['step']} of {result['steps']} was attacked (--allow-unfinished).")
    if result.get("ceiling_run"):
        notes.append(f"Undefended columns: the undefended (pretrained) obfuscator of {result['ceiling_run']} (--ceiling), attacked on the same images.")
    if result.get("undefended_from"):
        notes.append(f"Undefended columns: reused from the attack of {result['undefended_from']} (the same undefended obfuscator, data and settings).")
    if result["under_trained"]:
        notes.append(
            "(!) PSNR below the constant-image floor: " + ", ".join(result["under_trained"]) + ". That attacker was under-trained; "
            "its number is not evidence of privacy."
        )
    if result.get("unconverged"):
        notes.append(
            "Not converged, so its figures are a lower bound on what it can do, not a privacy claim: "
            + ", ".join(f"{name} ({', '.join(flags)})" for name, flags in result["unconverged"].items())
            + ". cap: --max-epochs ended it before patience ran out; best-last: its last epoch was its best; under-fit: at its best epoch its "
            "training PSNR was still below its held-out PSNR. Raise --max-epochs (and --patience) until none is flagged."
        )
    elif result.get("capped"):
        notes.append(
            "(cap) Stopped by --max-epochs before patience ran out, so it may still have been gaining: " + ", ".join(result["capped"])
            + ". Its figures are a lower bound on what it can do; raise --max-epochs for a privacy claim."
        )
    return notes


def strongest_line(table: dict, floor: dict) -> str:
    """'PSNR 13.16 dB (unet), SSIM 0.140 (consistency), top-1 2.4% (unet, standardised)': PSNR, SSIM and re-identification
    may come from different attackers."""
    p, s_, r = strongest(table, "psnr_mean", floor), strongest(table, "ssim_mean", floor), strongest_reid(table)
    return f"PSNR {p[1]:.2f} dB ({p[0]}), SSIM {s_[1]:.3f} ({s_[0]}), re-identification top-1 {r[1]:.1%} ({r[0]})"


def attacker_widths(result: dict) -> str:
    """'0.25' or 'defended 0.25, undefended 1' (attack.json records one width per side; older ones a number)."""
    w = result["attacker_width"]
    if not isinstance(w, dict):
        return f"{w:g}"
    return f"{next(iter(w.values())):g}" if len(set(w.values())) == 1 else ", ".join(f"{k} {v:g}" for k, v in w.items())


def to_markdown(result: dict) -> str:
    header, rows = table_rows(result)
    s = result["settings"]
    lines = [
        f"# Chosen Image Attack: {result['run']}",
        "",
        f"{result['dataset']}, training reconstructor {result['training_reconstructor']}, defence {defence_label(result)}. "
        f"Attackers trained from scratch on {result['n_attacker_train']} attacker images ({result['n_attacker_val']} more held out "
        f"for early stopping: at most {s['max_epochs']} epochs, patience {s['patience']}, augmentation {'on' if s['augment'] else 'off'}), "
        f"width {attacker_widths(result)}; scored on {result['n_users']} users' images (PSNR mean ± std over images).",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    links = linkage_rows(result)
    if links:
        lines += ["", "Linkage top-1 (ties split) from the exact picture and from changed copies, and what each store holds:", "",
                  "| " + " | ".join(links[0]) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(links[0]) - 1)) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in links[1]]
    lines += [""] + _notes(result)
    lines += [
        "",
        f"Seed {result['seed']}, {result['device']} ({result['torch_threads']} threads), torch {result['torch_version']}, veil {result['veil_version']}, "
        f"{result['date']}, {result['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def format_table(result: dict) -> str:
    """The side-by-side table for the terminal."""
    tables = [table_rows(result)] + ([linkage_rows(result)] if linkage_rows(result) else [])
    lines = []
    for header, rows in tables:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r, widths=widths: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines += [fmt(header), *[fmt(r) for r in rows], ""]
    return "\n".join([*lines, *_notes(result)])


def matrix_csv(matrix: dict) -> str:
    lines = ["attack," + ",".join(f'"{c}"' for c in matrix["columns"])]
    for row in matrix["rows"]:
        lines.append(row + "," + ",".join(f"{matrix['psnr'][row][c]:.6g}" for c in matrix["columns"]))
    lines.append("floor," + ",".join(f"{matrix['floor'][c]:.6g}" for c in matrix["columns"]))
    return "\n".join(lines) + "\n"


MATRIX_METRICS = (("psnr", "users' PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("reid_top1", "re-identification top-1", "{:.1%}"))


def matrix_markdown(matrix: dict) -> str:
    """One table per metric (PSNR as the paper's Table 3, then SSIM and re-identification, which a matrix.json
    from before them lacks), each ending with the floors the column is read against, then each run's accuracy."""
    cols = matrix["columns"]
    header = "| attack \\ training | " + " | ".join(f"{c}, {matrix.get('defence', {}).get(c, 'λ=' + str(matrix['lambda_privacy'][c]))}" for c in cols) + " |"
    lines = []
    for key, title, fmt in MATRIX_METRICS:
        if key not in matrix:
            continue
        lines += [f"{'#' if not lines else '##'} Attack x training reconstructor: {title} against the defended obfuscator", "", header, "| --- | " + " | ".join("---:" for _ in cols) + " |"]
        for row in matrix["rows"]:
            cells = [fmt.format(matrix[key][row][c]) + (" (!)" if key == "psnr" and matrix["psnr"][row][c] < matrix["floor"][c] else "") for c in cols]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        floors = matrix.get("floors") or {c: {"mean": {"psnr": matrix["floor"][c]}} for c in cols}
        for name, label in (("mean", "floor: mean image"), ("true", "class floor: true class"), ("predicted", "class floor: class read")):
            if all(key in floors[c].get(name, {}) for c in cols):
                lines.append(f"| {label} | " + " | ".join(fmt.format(floors[c][name][key]) for c in cols) + " |")
        lines.append("")
    if matrix.get("accuracy"):
        lines.append("Accuracy of each defended classifier: " + ", ".join(
            f"{c} {matrix['accuracy'][c]:.2%}" if matrix["accuracy"][c] is not None else f"{c} n/a" for c in cols) + ".")
    lines += ["(!) below the constant-image floor: an under-trained attacker, not privacy.", "Runs: " + ", ".join(matrix["runs"]) + "."]
    return "\n".join(lines) + "\n"


def plot_attacker(path: Path, originals: torch.Tensor, rows: dict[str, torch.Tensor], name: str) -> None:
    """Originals above each obfuscator's reconstructions, with each reconstruction's PSNR."""
    grid = [("original", originals, None)] + [(which, images, psnr(originals[: len(images)], images).tolist()) for which, images in rows.items()]
    atomic_write_bytes(path, plot_image_rows(grid, f"{name}: users' images (top) and their reconstructions, with PSNR"))
