"""veil report: tables and figures from tiny real runs; the page checked in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from veil import config as config_mod
from veil.attack.results import accuracy_by_round, psnr_by_round, read_attack, shown_rounds
from veil.errors import ReportError
from veil.report.frontier import growth_points, plot_growth_frontier
from veil.report.sections import report
from veil.rundir import read_metrics
from veil.train import train

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"log": lambda *_: None}


def tiny_cfg(npz: Path, **train_overrides) -> config_mod.Config:
    """The tiny_config fixture's settings (width 1/16, one epoch per phase), for module-scoped runs."""
    raw = {
        "data": {"dataset": "npz", "path": str(npz), "test_fraction": 0.25, "attacker_fraction": 0.25},
        "model": {"width": 0.0625, "dropout": 0.0},
        "train": {"pretrain_epochs": 2, "warmup_epochs": 1, "t_main": 2, "t_sub": 1, "batch_size": 32, "eval_batch_size": 64, "lambda_privacy": 1.0},
        "seed": 0, "device": "cpu", "progress": False,
    }
    for k, v in train_overrides.items():
        section = "model" if k == "reconstructor" else "train"
        raw[section][k] = v
    return config_mod.from_dict(raw)


def make_tiny_npz(path: Path) -> Path:
    from veil.data import read_npz

    images, labels, classes = read_npz(ROOT / "demo" / "cifar10-2k.npz", path.parent / "cache")
    idx = np.sort(np.random.default_rng(0).choice(len(labels), 240, replace=False))
    np.savez(path, images=images[idx], labels=labels[idx], classes=np.array(classes))
    return path


def attacker_entry(psnr: float, top1: float = 0.05) -> dict:
    return {"psnr_mean": psnr, "psnr_std": 1.5, "ssim_mean": 0.25, "reid_top1": top1, "reid_top5": min(1.0, top1 + 0.15), "n_candidates": 100}


def write_attack(run_dir: Path, defended: dict, undefended: dict, floor: float = 11.0, linkage: dict | None = None) -> dict:
    """An attack.json as `veil attack` writes it (the harness's contract), plus one PNG per attacker."""
    data = {"floor": {"psnr": floor, "ssim": 0.05}, "defended": defended, "undefended": undefended, "seed": 0, "settings": {"epochs": 1}}
    if linkage is not None:
        data["linkage"] = linkage
    (run_dir / "attack").mkdir(exist_ok=True)
    (run_dir / "attack" / "attack.json").write_text(json.dumps(data))
    for i, name in enumerate(defended):
        img = np.zeros((40, 120, 3), np.uint8)
        img[:, :, i % 3] = np.linspace(0, 255, 120, dtype=np.uint8)[None, :]
        Image.fromarray(img).save(run_dir / "attack" / f"{name}.png")
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished tiny runs: SimRec at lambda 1 and URec#2 at lambda 0, both 'attacked'."""
    root = tmp_path_factory.mktemp("runs")
    npz = make_tiny_npz(root / "tiny.npz")
    out = {}
    for name, overrides in (("simrec-l1", {"lambda_privacy": 1.0}), ("urec2-l0", {"lambda_privacy": 0.0, "reconstructor": "urec2"})):
        train(tiny_cfg(npz, **overrides), root / name, **QUIET)
        out[name] = root / name
    write_attack(out["simrec-l1"], {"simrec": attacker_entry(12.5), "urec2": attacker_entry(13.25), "whitebox": attacker_entry(9.5, 0.01)},
                 {"simrec": attacker_entry(21.0, 0.9), "urec2": attacker_entry(22.0, 0.95), "whitebox": attacker_entry(18.0, 0.5)},
                 linkage={side: {"reid_top1": 1.0, "reid_top5": 1.0, "n_candidates": 100, "n_images": 400} for side in ("defended", "undefended")})
    write_attack(out["urec2-l0"], {"simrec": attacker_entry(20.5), "urec2": attacker_entry(21.75)},
                 {"simrec": attacker_entry(21.0), "urec2": attacker_entry(22.0)})
    return out


# ----------------------------------------------------------------------------- numbers


def test_accuracy_and_psnr_by_round_follow_table_2():
    metrics = [
        {"phase": "pretrain", "round": 0, "test_accuracy": 0.50},
        {"phase": "pretrain", "round": 0, "test_accuracy": 0.60},
        {"phase": "reconstructor_warmup", "round": 0, "test_accuracy": 0.60, "test_psnr": 20.0},
        {"phase": "obfuscator_classifier", "round": 1, "test_accuracy": 0.55, "test_psnr": 18.0},
        {"phase": "reconstructor", "round": 1, "test_accuracy": 0.55, "test_psnr": 19.0},
        {"phase": "obfuscator", "round": 1, "test_accuracy": 0.57, "test_psnr": 15.0},
        {"phase": "obfuscator_classifier", "round": 2, "test_accuracy": 0.58, "test_psnr": 16.0},
        {"phase": "reconstructor", "round": 2, "test_accuracy": 0.58, "test_psnr": 17.5},
        {"phase": "obfuscator", "round": 2, "test_accuracy": 0.59, "test_psnr": 14.0},
        {"phase": "reconstructor_final", "round": 2, "test_accuracy": 0.59, "test_psnr": 17.0},
    ]
    assert accuracy_by_round(metrics) == {0: 0.60, 1: 0.57, 2: 0.59}  # round 0 = last pretraining epoch
    assert psnr_by_round(metrics) == {0: 20.0, 1: 19.0, 2: 17.5}  # the reconstructor after its own phase
    assert shown_rounds(set(range(6))) == list(range(6))
    assert shown_rounds(set(range(101))) == [0, 1] + list(range(10, 101, 10))
    assert shown_rounds(set(range(36))) == [0, 1, 10, 20, 30, 35]


def test_read_attack_names_the_missing_field(tmp_path):
    path = tmp_path / "attack.json"
    good = {"floor": {"psnr": 10.0, "ssim": 0.1}, "defended": {"simrec": attacker_entry(12.0)}, "undefended": {}}
    path.write_text(json.dumps(good))
    assert read_attack(path)["defended"]["simrec"]["psnr_mean"] == 12.0
    bad = json.loads(json.dumps(good))
    del bad["defended"]["simrec"]["reid_top5"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ReportError, match=r"defended\['simrec'\] lacks numeric reid_top5"):
        read_attack(path)
    path.write_text(json.dumps({"defended": {}, "undefended": {}}))
    with pytest.raises(ReportError, match="'floor' must be"):
        read_attack(path)
    path.write_text("{not json")
    with pytest.raises(ReportError, match="not readable JSON"):
        read_attack(path)


# ----------------------------------------------------------------------------- the page


def embedded_pngs(html_text: str) -> list[bytes]:
    srcs = re.findall(r"<img src='([^']*)'", html_text)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), "every image must be embedded"
    return [base64.b64decode(s.split(",", 1)[1]) for s in srcs]


def test_report_of_two_runs_holds_every_section(runs, tmp_path):
    out = tmp_path / "report"
    written = report([runs["simrec-l1"], runs["urec2-l0"]], out, n_images=6, **QUIET)
    text = written["html"].read_text()
    md = written["markdown"].read_text()

    # Self-contained: no external resource at all; every figure embedded and a readable PNG.
    assert not re.search(r"(src|href)=['\"](?!data:)", text)
    pngs = embedded_pngs(text)
    for png in pngs:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width >= 40 and im.height >= 40
    figure_files = [k for k in written if k.endswith(".png")]
    assert len(pngs) == len(figure_files)
    # Figures 3, 4, 5 and the attack PNGs (3 + 2 attackers).
    assert {"report-figure3-accuracy.png", "report-figure4-reconstructions.png", "report-figure5-undefended-vs-defended.png"} <= set(figure_files)
    assert len(figure_files) == 3 + 5
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):  # the Markdown's figures lie next to it
        assert (out / name).is_file(), name

    # Table 2: round 0 is the pretrained baseline, read from metrics.jsonl.
    metrics = read_metrics(runs["simrec-l1"])
    pre = [m for m in metrics if m["phase"] == "pretrain"][-1]["test_accuracy"]
    last = [m for m in metrics if m["phase"] == "obfuscator" and m["round"] == 2][-1]["test_accuracy"]
    row0 = next(line for line in md.splitlines() if line.startswith("| 0 (pretrained)"))
    assert f"{100 * pre:.2f}%" in row0
    assert f"{100 * last:.2f}%" in next(line for line in md.splitlines() if line.startswith("| 2 |"))

    # Attack tables with floor, chance and ceiling; the under-floor white-box attacker flagged.
    attacks = md.split("## Attack tables")[1].splitlines()
    assert "| constant image (floor) | 11.00 | 0.050 |" in "\n".join(attacks) and "chance (N = 100)" in "\n".join(attacks)
    whitebox = next(line for line in attacks if line.startswith("| white-box"))
    assert "9.50 ± 1.50" in whitebox and "18.00 ± 1.50" in whitebox and "below floor" in whitebox
    simrec = next(line for line in attacks if line.startswith("| SimRec |"))
    assert "12.50 ± 1.50" in simrec and "below floor" not in simrec
    # Linkage (feature matching) has its own row, and is never the strongest attacker (it has no PSNR).
    assert "| linkage: feature matching (attacker computes f(candidate)) | — | — | 100.0% | 100.0% | — | — | 100.0% | 100.0% |" in "\n".join(attacks)
    assert "13.25 (URec#2)" in md

    # Table 3 from the two attacked runs: rows attackers, columns training reconstructors.
    t3 = md.split("Table 3 style")[1]
    assert "| attack \\ training | SimRec, λ=1 | URec#2, λ=0 |" in t3
    assert "| URec#2 | 13.25 | 21.75 |" in t3
    assert "| white-box | 9.50 | n/a |" in t3

    # Figure 5's undefended row is the lambda = 0 run; configs and versions are shown.
    assert "undefended (λ=0, urec2-l0)" in md
    assert "lambda_privacy: 1.0" in md and "torch" in md and "veil train --config" in md


def test_figure5_without_a_lambda_0_run(runs, tmp_path):
    # Alone, a defended run shows its own reconstructor after the warm-up against the pretrained obfuscator.
    md = report([runs["simrec-l1"]], tmp_path / "alone", n_images=4, **QUIET)["markdown"].read_text()
    assert "undefended (simrec-l1 after pretraining and warm-up)" in md and "report-figure5-undefended-vs-defended.png" in md
    # Without that reconstructor (a run trained before it was saved) the page says why Figure 5 is missing.
    copy = tmp_path / "simrec-l1"
    shutil.copytree(runs["simrec-l1"], copy)
    (copy / "checkpoints" / "undefended" / "reconstructor.safetensors").unlink()
    info_path = copy / "checkpoints" / "undefended" / "info.json"  # as a run made before r was kept there
    info = json.loads(info_path.read_text())
    del info["files"]["reconstructor.safetensors"]
    info_path.write_text(json.dumps(info))
    md = report([copy], tmp_path / "out", n_images=4, **QUIET)["markdown"].read_text()
    assert "Figure 5 style" in md and "undefended reconstructor" in md
    assert "report-figure5" not in md


def test_table3_from_an_attack_matrix_folder(runs, tmp_path):
    """A folder written by `veil attack --matrix ... --out DIR` brings its runs and its Table 3."""
    cols = ["simrec (simrec-l1)", "urec2 (urec2-l0)"]
    matrix = {
        "rows": ["simrec", "urec2"], "columns": cols,
        "psnr": {"simrec": {cols[0]: 12.5, cols[1]: 20.5}, "urec2": {cols[0]: 10.25, cols[1]: 21.75}},
        "floor": {cols[0]: 11.0, cols[1]: 11.0},
        "undefended": {"simrec": {cols[0]: 21.0, cols[1]: 21.0}, "urec2": {cols[0]: 22.0, cols[1]: 22.0}},
        "runs": [str(runs["simrec-l1"]), str(runs["urec2-l0"])], "lambda_privacy": {cols[0]: 1.0, cols[1]: 0.0},
    }
    (tmp_path / "matrix").mkdir()
    (tmp_path / "matrix" / "matrix.json").write_text(json.dumps(matrix))
    md = report([tmp_path / "matrix"], tmp_path / "out", n_images=4, **QUIET)["markdown"].read_text()
    assert "| simrec-l1 |" in md and "| urec2-l0 |" in md
    t3 = md.split("Table 3 style")[1].split("## ")[0]
    assert "| attack \\ training | simrec (simrec-l1), λ=1 | urec2 (urec2-l0), λ=0 |" in t3
    assert "| URec#2 | 10.25 (below floor) | 21.75 |" in t3
    assert "| SimRec against undefended | 21.00 | 21.00 |" in t3
    del matrix["psnr"]["urec2"]
    (tmp_path / "matrix" / "matrix.json").write_text(json.dumps(matrix))
    with pytest.raises(ReportError, match="matrix.json: not a Table 3 matrix"):
        report([tmp_path / "matrix"], tmp_path / "out", **QUIET)


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    from veil.cli import main

    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("veil report: error:") and "missing" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- in a browser


def chromium() -> str | None:
    return shutil.which("chromium") or (str(Path("/usr/bin/chromium")) if Path("/usr/bin/chromium").exists() else None)


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=300)


# Sets data-images on <body> once the page (and so every image) has loaded: 0 for an image that failed.
PROBE = """<script>window.addEventListener('load', () => { document.body.setAttribute('data-images',
JSON.stringify(Array.from(document.images).map(i => (i.complete && i.naturalWidth > 0) ? i.naturalWidth : 0))); });</script>"""


@pytest.mark.skipif(chromium() is None, reason="headless Chromium not installed (make chromium installs Debian's package when run as root)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    out = tmp_path / "report"
    html_path = report([runs["simrec-l1"], runs["urec2-l0"]], out, n_images=6, **QUIET)["html"]
    n_images = html_path.read_text().count("<img ")

    probe = out / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    dom = run_chromium(["--dump-dom", probe.as_uri()], tmp_path / "profile-dom")
    found = re.search(r'data-images="([^"]*)"', dom.stdout)
    assert found, f"no probe result in chromium's DOM dump (rc {dom.returncode}): {dom.stderr[-2000:]}"
    widths = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(widths) == n_images and n_images >= 8
    assert all(w > 0 for w in widths), f"images that did not load: {[i for i, w in enumerate(widths) if w == 0]}"

    shot = tmp_path / "screenshot.png"
    run_chromium([f"--screenshot={shot}", "--window-size=1280,2400", html_path.as_uri()], tmp_path / "profile-shot")
    assert shot.is_file(), "chromium wrote no screenshot"
    with Image.open(shot) as im:
        gray = np.asarray(im.convert("L"), dtype=np.float32)
    assert gray.shape == (2400, 1280)
    # Not blank: text, tables and figures put dark pixels on much of the page.
    assert gray.std() > 20 and (gray < 128).mean() > 0.01, (gray.std(), (gray < 128).mean())


def test_a_run_without_checkpoints_is_named_where_figures_4_and_5_leave_it_out(runs, tmp_path):
    copy = tmp_path / "no-checkpoints"
    shutil.copytree(runs["simrec-l1"], copy)
    (copy / "checkpoints" / "latest.json").unlink()
    md = report([runs["urec2-l0"], copy], tmp_path / "out", n_images=4, **QUIET)["markdown"].read_text()
    assert "Figures 4 and 5 leave out no-checkpoints: no checkpoints/latest.json" in md and "urec2-l0" not in md.split("leave out")[1].split("\n")[0]


def test_growth_frontier_places_each_store_against_its_class_floor():
    point = {"reference": None, "defence": "classfloor", "psnr": 13.30, "class_floor_psnr": 13.10, "growth_ratio": 0.10, "name": "lambda-1"}
    rows = [point, dict(point, name="lambda-0", growth_ratio=None),  # growth not measured: not placed
            dict(point, name="unattacked", psnr=None), dict(point, name="old attack.json", class_floor_psnr=None),
            {"reference": "image", "defence": "image store", "psnr": 100.0, "class_floor_psnr": None, "growth_ratio": 1.0, "name": "image store"},
            {"reference": "logits", "defence": "logits store", "psnr": 13.50, "class_floor_psnr": 13.12, "growth_ratio": 0.02, "name": "logits store"}]
    assert [r["name"] for r in growth_points(rows)] == ["lambda-1"]  # the reference stores are drawn as references
    png = Image.open(io.BytesIO(plot_growth_frontier(rows)))
    assert png.format == "PNG" and png.size[0] > 400
