"""The utility-privacy frontier of a sweep directory: one row per point, dominance, table and plot.

    DIR/frontier.csv/.json  test accuracy against the strongest attacker's PSNR and re-identification
    DIR/frontier.png        the same as a plot
    DIR/growth-frontier.png with --growth: each store's growth ratio against its strongest attacker's PSNR
                            above the class floor, beside the image store (ratio 1) and the label store (0, at the floor)

Written by `veil sweep` at the end of a sweep and drawn again by `veil report` (one sweep, or
several overlaid). A point is dominated when another is at least as accurate and at most as
reconstructable, better in one of the two.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

from veil import config as config_mod
from veil.attack.results import ATTACKER_NAMES, CLASS_FLOOR, LINKAGE, REFERENCES, db, pct, read_attack, strongest, strongest_reid
from veil.defences import DEFENCES, point_symbol, strength_label
from veil.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from veil.models.obfuscator import code_bytes
from veil.plots import line_style, new_figure, png_bytes
from veil.store.growth import RESULT as GROWTH_RESULT
from veil.sweepdir import COST_FILE, GROWTH, STORE_CLASSIFIER, read_sweep

# growth.json's row fields -> a frontier row's
GROWTH_FIELDS = {"accuracy_at_n": "growth_accuracy_at_n", "accuracy_at_n_plus_m": "growth_accuracy_at_n_plus_m", "gain": "growth_gain",
                 "growth_ratio": "growth_ratio"}
REFERENCE_NAMES = {"image": "image store", "label": "label store", "logits": "logits store"}  # the reference rows of every frontier
REFERENCE_MARKERS = {"image": "*", "label": "X", "logits": "P"}
REFERENCE_CUTS = {"image": "the images", "label": "the class read", "logits": "the logits read"}


def read_growth(run_dir: Path) -> dict | None:
    path = Path(run_dir) / GROWTH / GROWTH_RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def growth_fields(row: dict | None) -> dict:
    """growth_accuracy_at_n, ..., growth_ratio of one of growth.json's rows (all None without one)."""
    return {ours: (row or {}).get(theirs) for theirs, ours in GROWTH_FIELDS.items()}


def frontier_rows(sweep_dir: Path) -> list[dict]:
    """One row per point: test accuracy, and the strongest defended attacker's PSNR and re-identification;
    then the image, label and logits stores as rows of the same columns (reference_rows)."""
    rows = []
    for p in read_sweep(sweep_dir)["points"]:
        run_dir = Path(sweep_dir) / p.name
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        attack = read_attack(run_dir / "attack" / "attack.json") if (run_dir / "attack" / "attack.json").is_file() else None
        store_summary = run_dir / STORE_CLASSIFIER / "summary.json"
        cfg = config_mod.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        cut = cut_label(cfg) if cfg else None
        client, features = summary.get("client", {}), summary.get("features", {})
        cost = json.loads((run_dir / COST_FILE).read_text()) if (run_dir / COST_FILE).is_file() else {}
        row = {
            "name": p.name, "defence": p.defence, "strength": p.strength,
            "test_accuracy": summary.get("final_test_accuracy"), "pretrain_test_accuracy": summary.get("pretrain_test_accuracy"),
            "store_accuracy": json.loads(store_summary.read_text())["final_test_accuracy"] if store_summary.is_file() else None,
            "psnr": None, "psnr_attacker": None, "ssim": None, "ssim_attacker": None, "reid_top1": None, "reid_attacker": None, "n_candidates": None,
            "floor_psnr": None, "class_floor_psnr": None, "undefended_psnr": None, "linkage_top1": None, "class_reid_top1": None, "read_class_reid_top1": None, "cut": cut,
            "capped": [], "flags": {}, "client_mflops": client.get("mflops"), "client_parameters": client.get("parameters"), "bytes_per_item": stored_bytes(features),
            # What the point cost the sweep (wall seconds; a forked point's pretraining was paid by its donor).
            "train_seconds": cost.get("train"), "attack_seconds": cost.get("attack"), "store_seconds": cost.get("store_classifier"),
            "seconds": cost.get("total"), "reference": None,
            # veil growth's measurement of the point's store (its first head), where --growth made one.
            **growth_fields(next((r for r in (read_growth(run_dir) or {}).get("stores", []) if r["kind"] == "features"), None)),
        }
        if attack and attack["defended"]:
            row["psnr_attacker"], row["psnr"] = strongest(attack["defended"], "psnr_mean", attack["floor"])
            row["ssim_attacker"], row["ssim"] = strongest(attack["defended"], "ssim_mean", attack["floor"])
            row["reid_attacker"], row["reid_top1"] = strongest_reid(attack["defended"])
            row["n_candidates"] = next(iter(attack["defended"].values()))["n_candidates"]  # one candidate draw for every attacker
            row["floor_psnr"] = attack["floor"]["psnr"]
            # Attackers that max_epochs stopped before patience ran out: their figures are lower bounds.
            row["capped"] = sorted(name for name, r in attack["defended"].items() if r.get("stopped") == "cap")
            # Every convergence flag (cap, best-last, under-fit; an older attack.json has only the cap).
            row["flags"] = {name: r.get("flags", ["cap"] if r.get("stopped") == "cap" else []) for name, r in attack["defended"].items()}
            row["linkage_top1"] = attack.get(LINKAGE, {}).get("defended", {}).get("reid_top1")
            # The label alone, scored by the same two match rules: the re-identification a classifying store cannot go below.
            for field, k in (("class_reid_top1", "true"), ("read_class_reid_top1", "predicted")):
                r = attack.get(CLASS_FLOOR, {}).get(k)
                row[field] = max(r["reid_top1"], r["reid_std_top1"]) if r else None
            # The class a store is judged against: the one the run reads, or the fine label under a coarser data.task.
            floor = attack.get(CLASS_FLOOR, {}).get("true" if cfg and cfg.data.task != "none" else "predicted")
            row["class_floor_psnr"] = floor["psnr_mean"] if floor else None
            top = strongest(attack["undefended"], "psnr_mean", attack["floor"])
            row["undefended_psnr"] = top[1] if top else None
        rows.append(row)
    rows += reference_rows(Path(sweep_dir), rows)
    mark_dominated(rows)
    return rows


def reference_rows(sweep_dir: Path, points: list[dict]) -> list[dict]:
    """The image, label and logits stores as frontier rows: their privacy as the first attacked point's attack.json
    scored them (reference_stores: the same users and candidates), their accuracy and growth from the first point's
    growth.json (the image store: the whole VGG16 on the raw images; the label store: the undefended classifier's
    class; the logits store: its logits, its class floor the label store's). A reference no point measured is left
    out; one measured only in part has None where it was not."""
    attacks = [read_attack(Path(sweep_dir) / r["name"] / "attack" / "attack.json") for r in points
               if (Path(sweep_dir) / r["name"] / "attack" / "attack.json").is_file()]
    scored = next((a[REFERENCES] for a in attacks if a.get(REFERENCES)), {})
    grown = next((g for g in (read_growth(Path(sweep_dir) / r["name"]) for r in points) if g), None)
    rows = []
    for kind, name in REFERENCE_NAMES.items():
        privacy = scored.get(kind)
        growth_row = next((r for r in (grown or {}).get("stores", []) if r["kind"] == kind), None)
        if privacy is None and growth_row is None:
            continue
        accuracy = growth_row["accuracy_at_n"] if growth_row else (privacy.get("accuracy") if privacy else None)
        row = {k: None for k in points[0]} if points else {}
        row.update({
            "name": name, "defence": name, "strength": None, "reference": kind, "test_accuracy": None, "store_accuracy": accuracy,
            "capped": [], "flags": {}, "cut": REFERENCE_CUTS[kind], **growth_fields(growth_row),
            "bytes_per_item": (privacy or growth_row or {}).get("bytes_per_item"),
        })
        if privacy:
            row.update({"psnr": privacy["psnr_mean"], "ssim": privacy["ssim_mean"], "reid_top1": max(privacy["reid_top1"], privacy.get("reid_std_top1", 0.0)),
                        "n_candidates": privacy.get("n_candidates"), "linkage_top1": privacy["linkage"]["reid_top1"]})
        if kind == "logits" and privacy and scored.get("label"):  # its floor: the mean image of the class the same classifier reads
            row["class_floor_psnr"] = scored["label"]["psnr_mean"]
        rows.append(row)
    return rows


def stored_bytes(features: dict) -> int | None:
    """Feature bytes per stored item, from summary.json. A summary that does not say how the store keeps
    the values (written before `stored_as` existed, where bits 16 meant float16) gets them from shape and bits."""
    if "stored_as" in features or "shape" not in features:
        return features.get("bytes_per_item")
    bits = features.get("bits", 16)
    return math.prod(features["shape"]) * code_bytes(0 if bits == 16 else bits)


def cut_label(cfg: config_mod.Config) -> str:
    """Where f is cut and what leaves it: 'split 2', 'split 4, learned k=8, 4 bits', 'channel-standardised, split 4'."""
    m = cfg.model
    parts = ([f"{m.input_norm}-standardised"] if m.input_norm != "none" else []) + [f"split {m.split}"] + ([f"{m.bottleneck} k={m.bottleneck_channels}"] if m.bottleneck != "none" else [])
    return ", ".join(parts + ([f"{m.feature_bits} bits"] if m.feature_bits else []))


def mark_dominated(rows: list[dict], label: Callable[[dict], str] = lambda r: r["name"]) -> None:
    """Set each row's `dominated_by`: the attacked points (and reference stores) at least as accurate and at most as
    reconstructable (strongest attacker's PSNR), better in one of the two. Such a row is off the frontier; a point
    dominated by the label store is worth less than keeping the class. `store_dominated_by`: the same with the store
    classifier's accuracy. The reference stores themselves are bounds, never marked dominated (an empty list)."""
    for key, field in (("test_accuracy", "dominated_by"), ("store_accuracy", "store_dominated_by")):
        measured = [r for r in rows if r["psnr"] is not None and r.get(key) is not None]
        ids = {id(r) for r in measured}
        for r in rows:
            r[field] = [
                label(o) for o in measured
                if id(r) in ids and not r.get("reference") and o is not r and o[key] >= r[key] and o["psnr"] <= r["psnr"]
                and (o[key] > r[key] or o["psnr"] < r["psnr"])
            ]


def cap_mark(row: dict) -> str:
    """' (cap)', ' (cap, best-last)', ' (under-fit)', ...: the convergence flags of the point's strongest attacker (by PSNR),
    whose PSNR is then a lower bound; '' when it converged."""
    flags = row.get("flags", {}).get(row.get("psnr_attacker")) or (["cap"] if row.get("psnr_attacker") in row.get("capped", []) else [])
    return f" ({', '.join(flags)})" if flags else ""


def frontier_table(rows: list[dict]) -> list[list[str]]:
    """Header and rows as text, for frontier.csv readers and the report."""
    def who(name: str | None) -> str:  # 'unet' or 'unet, standardised' (strongest_reid's match rule)
        if not name:
            return ""
        attacker, _, rule = name.partition(", ")
        return f" ({ATTACKER_NAMES.get(attacker, attacker)}{', ' + rule if rule else ''})"

    def dominated(r: dict, field: str, key: str) -> str:
        return ", ".join(r.get(field) or []) or ("none" if r["psnr"] is not None and r.get(key) is not None else "n/a")

    stored = any(r.get("store_accuracy") is not None for r in rows)  # columns only for sweeps that trained them
    grown = any(r.get("growth_accuracy_at_n") is not None for r in rows)  # columns only for sweeps that measured growth

    def strength(r: dict) -> str:
        if r.get("reference") or (r["defence"] in DEFENCES and not DEFENCES[r["defence"]].strength_key):
            return ""
        return f"{strength_label(r['defence'])} = {r['strength']:g}"

    def growth(r: dict) -> list[str]:
        if not grown:
            return []
        gain = r.get("growth_gain")
        return [f"{pct(r.get('growth_accuracy_at_n'))} → {pct(r.get('growth_accuracy_at_n_plus_m'))}", "n/a" if gain is None else f"{100 * gain:+.2f}",
                "n/a" if r.get("growth_ratio") is None else f"{r['growth_ratio']:.2f}"]

    out = [["defence", "strength", "in-run test accuracy" if stored else "test accuracy"] + (["store classifier accuracy"] if stored else [])
           + (["growth: accuracy at N → N + M", "growth gain (points)", "growth ratio"] if grown else [])
           + ["strongest attacker PSNR (dB)", "strongest SSIM", "re-identification top-1", "chance", "by class alone (true / read)", "constant-image floor (dB)",
              "undefended attacker PSNR (dB)", "linkage top-1", "cut", "client MFLOPs / image", "bytes / stored image",
              "dominated by"] + (["dominated by (store accuracy)"] if stored else [])]
    for r in rows:
        out.append(
            [r["defence"], strength(r), pct(r["test_accuracy"])] + ([pct(r.get("store_accuracy"))] if stored else []) + growth(r)
            + [db(r["psnr"]) + who(r["psnr_attacker"]) + cap_mark(r), (f"{r['ssim']:.3f}" + who(r.get("ssim_attacker"))) if r.get("ssim") is not None else "n/a",
               pct(r["reid_top1"], 1) + who(r["reid_attacker"]),
               pct(1 / r["n_candidates"], 1) if r["n_candidates"] else "n/a",
               f"{pct(r.get('class_reid_top1'), 1)} / {pct(r.get('read_class_reid_top1'), 1)}", db(r["floor_psnr"]), db(r["undefended_psnr"]),
               pct(r.get("linkage_top1"), 1), r.get("cut") or "n/a", f"{r['client_mflops']:.1f}" if r.get("client_mflops") is not None else "n/a",
               f"{r['bytes_per_item']:,}" if r.get("bytes_per_item") is not None else "n/a",
               dominated(r, "dominated_by", "test_accuracy")]
            + ([dominated(r, "store_dominated_by", "store_accuracy")] if stored else []))
    return out


def plot_frontier(rows: list[dict]) -> bytes:
    """Accuracy (%) against the strongest attacker's PSNR (dB) and re-identification rate (%): solid lines
    for the in-run classifier, dotted with hollow markers for the store classifier where there is one."""
    fig = new_figure(10.0, 4.2)
    left, right = fig.subplots(1, 2, sharey=True)
    done = [r for r in rows if r["psnr"] is not None and r["test_accuracy"] is not None and not r.get("reference")]
    for ax, key, scale in ((left, "psnr", 1.0), (right, "reid_top1", 100.0)):  # the reference stores every point sits between
        for r, marker in ((r, REFERENCE_MARKERS[r["reference"]]) for r in rows if r.get("reference")):
            # The image store's 100 dB (the PSNR clamp) would flatten every point on the PSNR axis: drawn on the other only.
            if r.get(key) is not None and r.get("store_accuracy") is not None and not (key == "psnr" and r["reference"] == "image"):
                ax.plot([scale * r[key]], [100 * r["store_accuracy"]], marker=marker, markersize=10, color="#333333", linestyle="none", label=r["name"])
    for i, line in enumerate(dict.fromkeys(r.get("line", r["defence"]) for r in done)):  # one line per defence (and sweep)
        pts = sorted((r for r in done if r.get("line", r["defence"]) == line), key=lambda r: r["strength"])
        sym = point_symbol(pts[0]["defence"])
        for ax, key, scale in ((left, "psnr", 1.0), (right, "reid_top1", 100.0)):
            xs, ys = [scale * r[key] for r in pts], [100 * r["test_accuracy"] for r in pts]
            ax.plot(xs, ys, label=line, markersize=7, linewidth=1.6, **line_style(i))
            for x, y, r in zip(xs, ys, pts):
                ax.annotate(f"{sym}={r['strength']:g}" if sym else r["defence"], (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
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


def growth_points(rows: list[dict]) -> list[dict]:
    """The points a growth frontier can place: a growth ratio, and a strongest attacker and class floor to set it against."""
    return [r for r in rows if not r.get("reference") and r.get("growth_ratio") is not None and r["psnr"] is not None
            and r.get("class_floor_psnr") is not None]


def plot_growth_frontier(rows: list[dict]) -> bytes:
    """The two axes of a store worth more than its label: the growth ratio (a later classifier's gain from the later
    items over the image store's) against the strongest attacker's PSNR above the class floor. The label store sits
    at (0, 0) by construction (its reconstruction is the class mean it reads; it cannot grow); the image store at a
    ratio of 1 with no privacy (a line: its 100 dB would flatten the axis); the logits store where it was measured. The shaded corner is where a store keeps
    learning and the attackers learn no more than the class: within 0.2 dB of its floor, at a ratio of 0.67 or more."""
    fig = new_figure(6.4, 5.6)
    ax = fig.subplots()
    pts = growth_points(rows)
    xs = [r["psnr"] - r["class_floor_psnr"] for r in pts] + [0.0]
    ratios = [r["growth_ratio"] for r in pts]
    ax.axhline(1.0, color="#333333", linestyle="--", linewidth=1.2, label="image store (ratio 1; the images: no privacy)")
    ax.plot([0.0], [0.0], marker="X", markersize=10, color="#333333", linestyle="none", label="label store (the class floor; cannot grow)")
    logits = [r for r in rows if r.get("reference") == "logits" and None not in (r.get("growth_ratio"), r.get("psnr"), r.get("class_floor_psnr"))]
    if logits:  # the logits store (one per sweep overlaid): how far keeping how sure the classifier was moves from the label store
        lx, ly = [r["psnr"] - r["class_floor_psnr"] for r in logits], [r["growth_ratio"] for r in logits]
        xs, ratios = xs + lx, ratios + ly
        ax.plot(lx, ly, marker="P", markersize=10, color="#333333", linestyle="none", label="logits store (the classifier's logits)")
    for i, line in enumerate(dict.fromkeys(r.get("line", r["defence"]) for r in pts)):
        mine = [r for r in pts if r.get("line", r["defence"]) == line]
        style = dict(line_style(i), linestyle="none")
        ax.plot([r["psnr"] - r["class_floor_psnr"] for r in mine], [r["growth_ratio"] for r in mine], label=line, markersize=8, **style)
        for r in mine:
            ax.annotate(r["name"], (r["psnr"] - r["class_floor_psnr"], r["growth_ratio"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    lo, hi = min(xs + [-0.2]) - 0.2, max(xs + [0.4]) + 0.3
    ax.fill_between([lo, 0.2], 0.67, 1.1, color="#8fd18f", zorder=0, label="target: ratio >= 0.67 within 0.2 dB of the class floor")
    ax.set_xlim(lo, hi)
    ax.set_ylim(min([0.0] + ratios) - 0.08, 1.1)
    ax.grid(True, color="#cccccc", linewidth=0.6)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below the axes: no point hidden
    ax.set_xlabel("strongest attacker's PSNR above the class floor (dB)")
    ax.set_ylabel("growth ratio (store's gain / image store's gain)")
    return png_bytes(fig)


def write_frontier(sweep_dir: Path, rows: list[dict]) -> None:
    sweep_dir = Path(sweep_dir)
    atomic_write_json(sweep_dir / "frontier.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"])
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows)  # lists and dicts as JSON
    atomic_write_text(sweep_dir / "frontier.csv", buf.getvalue())
    if any(r["psnr"] is not None and r["test_accuracy"] is not None for r in rows):
        atomic_write_bytes(sweep_dir / "frontier.png", plot_frontier(rows))
    if growth_points(rows):
        atomic_write_bytes(sweep_dir / "growth-frontier.png", plot_growth_frontier(rows))
