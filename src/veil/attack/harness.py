"""The Chosen Image Attack harness: freeze f, fit fresh attackers, and score them against floor and ceiling.

    veil attack RUN_DIR                      -> RUN_DIR/attack/{attack.json, attack.csv, attack.md, <attacker>.png}
    veil attack --matrix RUN_A RUN_B ...     -> the attack x training reconstructor PSNR matrix (Table 3)

Threat model (paper Section 3): the attacker has unlimited use of the frozen obfuscator f and images
of its own (the attacker-train split), disjoint from the users' images (the test split). It trains
each reconstructor of Table 1 from scratch on (f(I), I) pairs of its own images (Eq. 3), stopping
when the PSNR on a held-out part of its own images stops improving, then turns the users' stored
feature maps back into images. A white-box attacker (whitebox.py) instead optimises an image so
that f(image) matches the stored feature map.

Every number comes with its floor and ceiling: the best constant image (the attacker-split mean
image), and the same attackers against the run's undefended obfuscator (after pretraining, before
adversarial training). A defended PSNR below the floor means the attacker was not trained well.
The files written from the results are tables.py's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from veil import data as data_mod
from veil.attack.attackers import AttackData, attack_data, convergence_flags, fit_attacker, fixed_features, reconstruct, stored_features
from veil.attack.copies import changed_copies
from veil.attack.references import IMAGE, LABEL, LOGITS, image_store, label_store, logits_store
from veil.attack.registry import INVERSION, get_attacker
from veil.attack.results import CLASS_FLOOR, FLOOR, LINKAGE, REFERENCES, SCORING_VERSION, WHITEBOX, defence_label
from veil.attack.scoring import (
    capped,
    class_floor_scores,
    class_means,
    floor_scores,
    linkage,
    predicted_labels,
    score,
    unconverged,
    under_trained,
)
from veil.attack.search import search_attacker
from veil.attack.settings import AttackConfig, attacker_names, numbers, result_settings, search_grid, seed_for, tv_weights, validate_attack
from veil.attack.tables import matrix_csv, matrix_markdown, write_outputs
from veil.attack.whitebox import choose_tv_weight, decoder_inversion, invert
from veil.client.attacked import ClientObfuscator
from veil.client.onnxfile import read_client
from veil.data import load_splits, to_float
from veil.defences import GaussianNoise, describe
from veil.errors import AttackError
from veil.io import atomic_write_json, atomic_write_text
from veil.metrics import draw_candidates
from veil.models.obfuscator import fingerprint
from veil.progress import progress_bar
from veil.rundir import Run, load_run
from veil.runtime import memory_format, precision_note, resolve_device, resolve_precision
from veil.train import plan
from veil.version import __version__


def attack_obfuscator(obfuscator: nn.Module, data: AttackData, s: AttackConfig, width: float, split: int, candidates: torch.Tensor, label: str, log=print) -> tuple[dict, dict]:
    """Every attacker against one frozen obfuscator. Returns {attacker: scores (with its curve)} and
    {attacker: reconstructions of the first n_show users' images} for the figures."""
    users = to_float(data.users)
    all_rows = torch.arange(len(users))
    user_features = stored_features(obfuscator, data.users, s, label)
    results, shown = {}, {}
    steps = (len(data.train) // s.batch_size) * s.max_epochs
    fixed = fixed_features(obfuscator, data, s)
    precision = resolve_precision(s.precision, users.device)  # the decoders' reconstructions, as fit_attacker's
    decoders: dict[str, tuple[nn.Module, float]] = {}  # fitted so far: (decoder, its best held-out PSNR)
    for name in attacker_names(s):
        start = time.perf_counter()
        if get_attacker(name).kind == INVERSION:
            # Every user, as the decoder it starts from: its figures and the decoder's are on the same users.
            results[name], shown[name] = _decoder_inversion(obfuscator, data, s, decoders, users, user_features, candidates, label, name, precision)
            log(f"  {label:10s} {name:8s} {_line(results[name])}  ({len(users)} images, from {results[name]['decoder']}, prior weight "
                f"{results[name]['prior_weight']:g}, {results[name]['seconds']:.0f} s)")
            continue
        search = None
        with progress_bar(steps * (len(search_grid(s)) if s.search else 1), f"{label} {name}", s.progress) as bar:
            if s.search:
                reconstructor, curve, search = search_attacker(name, obfuscator, data, s, width, split, seed_for(s.seed, name), bar, fixed)
            else:
                reconstructor, curve = fit_attacker(name, obfuscator, data, s, width, split, seed_for(s.seed, name), bar, fixed)
        decoders[name] = (reconstructor, max(r["val_psnr"] for r in curve))
        rebuilt = reconstruct(reconstructor, user_features, s.eval_batch_size, precision)
        results[name] = {**score(users, all_rows, rebuilt, candidates), "epochs": len(curve), "best_epoch": _best_epoch(curve),
                         "stopped": "patience" if curve[-1]["waited"] >= s.patience else "cap", "flags": convergence_flags(curve, s.patience),
                         "seconds_per_epoch": round(sum(r["seconds"] for r in curve) / len(curve), 2),
                         "seconds": round(time.perf_counter() - start, 1), "curve": curve}
        if search is not None:
            results[name]["search"] = search
        shown[name] = rebuilt[: s.n_show].cpu()
        capped_note = f", not converged: {', '.join(results[name]['flags'])}" if results[name]["flags"] else ""
        chosen = f", searched: lr {search['chosen']['lr']:g}, width {search['chosen']['width']:g}" if search else ""
        log(f"  {label:10s} {name:8s} {_line(results[name])}  ({len(curve)} epochs{capped_note}, best {results[name]['best_epoch']}, "
            f"{results[name]['seconds_per_epoch']:.1f} s/epoch, {results[name]['seconds']:.0f} s{chosen})")
    if s.whitebox:
        start = time.perf_counter()
        m = len(users) if s.whitebox_images == 0 else min(s.whitebox_images, len(users))  # the first users only, to bound its cost
        n_batches = math.ceil(m / s.eval_batch_size)
        n_tune = len(tv_weights(s)) if len(tv_weights(s)) > 1 else 0
        torch.manual_seed(seed_for(s.seed, label, WHITEBOX))  # a random f's draws while tuning and inverting
        with progress_bar((n_batches + n_tune) * s.whitebox_steps, f"{label} {WHITEBOX}", s.progress) as bar:
            tv_weight, tuning = choose_tv_weight(obfuscator, data.val, data.mean_image, tv_weights(s), s.whitebox_steps, s.whitebox_lr, s.eval_batch_size, bar)
            rebuilt, curve = invert(obfuscator, user_features[:m], data.mean_image, tv_weight, s.whitebox_steps, s.whitebox_lr, s.eval_batch_size, bar)
        results[WHITEBOX] = {
            **_inversion_scores(users, rebuilt, data, candidates), "steps": s.whitebox_steps, "tv_weight": tv_weight,
            "tv_tuning_psnr": tuning, "seconds": round(time.perf_counter() - start, 1), "curve": curve,
        }
        shown[WHITEBOX] = rebuilt[: s.n_show].cpu()
        log(f"  {label:10s} {WHITEBOX:8s} {_line(results[WHITEBOX])}  ({m} images, {s.whitebox_steps} steps, TV weight {tv_weight:g}, {results[WHITEBOX]['seconds']:.0f} s)")
    return results, shown


def _inversion_scores(users: torch.Tensor, rebuilt: torch.Tensor, data: AttackData, candidates: torch.Tensor) -> dict:
    """An inversion's scores over the first len(rebuilt) users, with the floor of those same users beside them."""
    rows = torch.arange(len(rebuilt))
    floor = score(users, rows, data.mean_image.expand_as(rebuilt), candidates[rows])
    return {**score(users, rows, rebuilt, candidates[rows]), "floor_psnr": floor["psnr_mean"], "floor_ssim": floor["ssim_mean"]}


def _decoder_inversion(obfuscator: nn.Module, data: AttackData, s: AttackConfig, decoders: dict, users: torch.Tensor, features: torch.Tensor,
                       candidates: torch.Tensor, label: str, name: str, precision: str) -> tuple[dict, torch.Tensor]:
    """The decoder-started inversion from the decoder with the best held-out PSNR fitted before it, scored like the white-box."""
    start = time.perf_counter()
    source = max(decoders, key=lambda k: decoders[k][1])
    weights = numbers(s.prior_weights)
    n_batches = math.ceil(len(features) / s.eval_batch_size)
    torch.manual_seed(seed_for(s.seed, label, name))  # a random f's draws while tuning and inverting
    with progress_bar((n_batches + sum(not math.isinf(w) for w in weights)) * s.whitebox_steps, f"{label} {name}", s.progress) as bar:
        rebuilt, weight, tuning, curve = decoder_inversion(obfuscator, decoders[source][0], data.val, features, weights, s.whitebox_steps,
                                                           s.whitebox_lr, s.eval_batch_size, bar, precision)
    result = {**_inversion_scores(users, rebuilt, data, candidates), "decoder": source, "steps": s.whitebox_steps,
              "prior_weight": weight, "prior_tuning_psnr": tuning, "seconds": round(time.perf_counter() - start, 1), "curve": curve}
    return result, rebuilt[: s.n_show].cpu()


def _best_epoch(curve: list[dict]) -> int:
    return max(curve, key=lambda r: r["val_psnr"])["epoch"]


def _line(r: dict) -> str:
    return f"PSNR {r['psnr_mean']:6.2f} +- {r['psnr_std']:.2f} dB  SSIM {r['ssim_mean']:.3f}  top-1 {r['reid_top1']:6.1%}  top-5 {r['reid_top5']:6.1%}"


# ----------------------------------------------------------------------------- a run


def without_idle_noise(obfuscator: nn.Module) -> nn.Module:
    """The obfuscator's layers less a noise layer of sigma 0 (it adds nothing), the others under their own
    names: a noise run's undefended obfuscator then fingerprints like any other run's pretrained one."""
    kept = ((name, m) for name, m in obfuscator.named_children() if not (isinstance(m, GaussianNoise) and not m.on))
    return nn.Sequential(OrderedDict(kept))


def ceiling_key(obfuscator: nn.Module, data_fingerprint: str, s: AttackConfig, width: float, split: int) -> str:
    """sha256 of what the undefended attack depends on: the obfuscator's function (the fingerprint of its
    weights and BatchNorm statistics, without an idle noise layer), the data, and the settings."""
    inputs = {"obfuscator": fingerprint(without_idle_noise(obfuscator)), "data": data_fingerprint, "settings": result_settings(s), "width": width, "split": split,
              "scoring": SCORING_VERSION}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_ceilings(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise AttackError(f"{path}: not a readable ceilings file ({e}); remove it to attack the undefended obfuscators again") from None


def finished_run(run_dir: str | Path, s: AttackConfig, device: str | torch.device = "cpu") -> tuple[Run, int]:
    """The run loaded, and the number of steps its plan has; refused while its training has not finished
    (unless s.allow_unfinished): an unfinished obfuscator is not the one the run's numbers are about."""
    run = load_run(run_dir, device)
    total = len(plan(run.config.train))
    if run.step < total and not s.allow_unfinished:
        raise AttackError(
            f"{run_dir}: training has not finished (step {run.step} of {total}); finish it with `veil train --resume {run_dir}`, "
            f"or pass --allow-unfinished to attack it as it is"
        )
    return run, total


def ceiling_run(run: Run, s: AttackConfig, data_fingerprint: str, device: torch.device) -> Run:
    """The run whose undefended obfuscator is the ceiling: `run` itself, or s.ceiling, which must have
    been trained on the same images (the users, and the attacker's own images, must be the same ones)."""
    if not s.ceiling or not s.undefended:
        return run
    other = load_run(s.ceiling, device)
    theirs = data_mod.fingerprint(load_splits(other.config.data, other.config.seed))
    if theirs != data_fingerprint:
        raise AttackError(f"--ceiling {s.ceiling}: trained on other images than {run.path} (data fingerprint {theirs[:16]}... against "
                          f"{data_fingerprint[:16]}...); a ceiling must be measured on the same users' and attacker's images")
    return other


def attack_dir(run_dir: str | Path, s: AttackConfig) -> Path:
    """Where an attack writes: RUN/attack/, or RUN/attack-<client file name>/ for an attack on a client file."""
    return Path(run_dir) / (f"attack-{Path(s.client).stem}" if s.client else "attack")


def with_client(run: Run, s: AttackConfig, device: torch.device) -> Run:
    """The run with its obfuscator replaced by the client file s.client (which must be this obfuscator's)."""
    if device.type != "cpu":
        raise AttackError(f"--client {s.client}: a client runs on the CPU (onnxruntime); attack it with --device cpu")
    client = read_client(s.client)
    if client.meta["veil_source_fingerprint"] != fingerprint(run.obfuscator):
        raise AttackError(f"--client {s.client}: exported from obfuscator {client.meta['veil_source_fingerprint'][:16]}..., "
                          f"not from {run.path}'s ({fingerprint(run.obfuscator)[:16]}...)")
    return dataclasses.replace(run, obfuscator=ClientObfuscator(client, run.obfuscator))


def saved_attack(run_dir: str | Path, s: AttackConfig, obfuscator_fingerprint: str) -> tuple[dict | None, str]:
    """RUN_DIR/attack/attack.json when it stands for attacking the obfuscator of this fingerprint with settings
    `s` (the same result settings), else None and the reason it does not."""
    path = attack_dir(run_dir, s) / "attack.json"
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None, f"{path} is not readable JSON"
    if result_settings(saved.get("settings", {})) != result_settings(s):
        return None, f"{path} was made with other settings"
    if saved.get("scoring_version", 1) != SCORING_VERSION:
        return None, f"{path} was scored by older rules (scoring version {saved.get('scoring_version', 1)}, now {SCORING_VERSION})"
    if saved.get("obfuscator_fingerprint") != obfuscator_fingerprint:
        return None, f"{path} was made against another obfuscator (the run trained on, or was retrained, since)"
    return saved, ""


def attack(run_dir: str | Path, s: AttackConfig, log=print, ceilings: str | Path | None = None) -> dict:
    """Attack a run's final (and undefended) obfuscator; write RUN_DIR/attack/ and return the result.

    `ceilings` names a JSON file shared by runs that start from the same pretrained split (a sweep):
    the undefended attack is looked up there by `ceiling_key` and computed only when missing.
    """
    validate_attack(s)
    run_dir = Path(run_dir)
    began = time.perf_counter()
    device = resolve_device(s.device)
    run, total = finished_run(run_dir, s, device)
    if s.client:
        run = with_client(run, s, device)
    cfg = run.config
    splits = load_splits(cfg.data, cfg.seed)  # the same three splits the run used
    reference = ceiling_run(run, s, data_mod.fingerprint(splits), device)
    if s.undefended and reference.undefended_obfuscator is None:
        raise AttackError(f"{reference.path}: no checkpoints/undefended/obfuscator.safetensors (pretraining not finished?); pass --no-undefended to skip the ceiling")
    for net in (run.obfuscator, run.classifier, reference.undefended_obfuscator):  # the layout changes speed, not weights
        if net is not None:
            net.to(memory_format=memory_format(s.channels_last, device))
    data = attack_data(splits.attacker.images.to(device), splits.test.images.to(device), splits.natural, s)
    if len(data.users) < 2:
        raise AttackError(f"{run_dir}: re-identification needs at least 2 users' (test) images, the run has {len(data.users)}")
    n_candidates = min(s.n_candidates, len(data.users))
    candidates = draw_candidates(torch.arange(len(data.users)), len(data.users), n_candidates, torch.Generator().manual_seed(s.seed))
    precision = precision_note(s.precision, device, "--precision bf16")  # the learned attackers'; the rest is fp32
    log(
        f"veil attack: {run_dir} ({splits.name}, training reconstructor {cfg.model.reconstructor}, defence {describe(cfg)}): "
        f"attackers train on {len(data.train)} of their own images ({len(data.val)} held out), users' images {len(data.users)}, "
        f"re-identification among {n_candidates}, device {device}, learned attackers in {precision}"
    )
    result: dict = {
        "run": str(run_dir),
        "dataset": splits.name,
        "training_reconstructor": cfg.model.reconstructor,
        "defence": describe(cfg),
        "lambda_privacy": cfg.train.lambda_privacy,
        "step": run.step,  # the checkpoint attacked: phase-epochs done, of the plan's `steps`
        "steps": total,
        "obfuscator_fingerprint": fingerprint(run.obfuscator),  # the defended obfuscator attacked
        "n_attacker_train": len(data.train),
        "n_attacker_val": len(data.val),
        "n_users": len(data.users),
        "chance": {"top1": 1 / n_candidates, "top5": min(5, n_candidates) / n_candidates},
        "precision": precision,
        FLOOR: floor_scores(data, candidates),
        LINKAGE: {},
    }
    log(f"  {'floor':10s} {'mean':8s} {_line(result[FLOOR])}")
    # The class floors use the fine labels (the store's); the class a classifier reads is in its run's own labelling
    # (coarse under data.task), so its mean image is the attacker's mean of that labelling's class.
    attacker_images = splits.attacker.images.to(device)
    means = class_means(attacker_images, splits.attacker.labels.to(device), len(splits.attacker.classes))

    def read_means(config) -> torch.Tensor:  # noqa: ANN001
        if config.data.task == "none":
            return means
        coarse = load_splits(config.data, config.seed, labelling="task").attacker
        return class_means(attacker_images, coarse.labels.to(device), len(coarse.classes))

    labels = {"true": splits.test.labels, "predicted": predicted_labels(run.obfuscator, run.classifier, data.users, s)}
    result[CLASS_FLOOR] = {"true": class_floor_scores(means, data.users, {"true": labels["true"]}, candidates)["true"],
                           "predicted": class_floor_scores(read_means(cfg), data.users, {"predicted": labels["predicted"]}, candidates)["predicted"]}
    for k, r in result[CLASS_FLOOR].items():
        log(f"  {'class':10s} {k:10s} {_line(r)}")
    copies = changed_copies(data.users) if s.copies else None
    if s.copies:  # the reference stores every configuration sits between, scored by the same rules
        source = reference if reference.undefended_classifier is not None else run
        result[REFERENCES] = {IMAGE: image_store(data.users, copies, candidates)}
        if source.undefended_classifier is not None and source.undefended_obfuscator is not None:
            truth = load_splits(source.config.data, source.config.seed, labelling="task").test.labels if source.config.data.task != "none" else splits.test.labels
            result[REFERENCES][LABEL] = {**label_store(source.undefended_obfuscator, source.undefended_classifier, data.users, truth, copies,
                                                       read_means(source.config), candidates, s.eval_batch_size), "labels_from": f"{source.path} (its pretrained f and g)"}
            result[REFERENCES][LOGITS] = {**logits_store(source.undefended_obfuscator, source.undefended_classifier, data.train, data.val, data.users, truth,
                                                         copies, candidates, s.eval_batch_size), "labels_from": f"{source.path} (its pretrained f and g)"}
        for k, r in result[REFERENCES].items():
            log(f"  {'reference':10s} {k + ' store':10s} {_line(r)}  linkage top-1 {r['linkage']['reid_top1']:6.1%}")
    figures: dict[str, dict] = {}
    widths = {}
    for which, obfuscator, model in (("defended", run.obfuscator, cfg.model), ("undefended", reference.undefended_obfuscator, reference.config.model)):
        width = s.width or model.width  # attackers as wide as the networks they attack; upsampling as deep as their cut
        if which == "undefended" and not s.undefended:
            result[which] = {}
            continue
        widths[which] = width  # per side: a --ceiling run of another width is attacked at its own width
        same = which == "undefended" and fingerprint(without_idle_noise(obfuscator)) == fingerprint(without_idle_noise(run.obfuscator))
        if same:  # defence none: the undefended obfuscator is the defended one, linked already with these candidates
            result[LINKAGE][which] = copy.deepcopy(result[LINKAGE]["defended"])
        else:
            result[LINKAGE][which] = linkage(obfuscator, data.users, candidates, s, which, copies)
            log(f"  {which:10s} {LINKAGE:8s} top-1 {result[LINKAGE][which]['reid_top1']:6.1%}  top-5 {result[LINKAGE][which]['reid_top5']:6.1%}  "
                f"(feature matching: the attacker computes f(candidate))")
        shared = which == "undefended" and ceilings is not None
        if shared:
            key = ceiling_key(obfuscator, data_mod.fingerprint(splits), s, width, model.split)
            known = read_ceilings(Path(ceilings))
            if key in known:
                result[which], result["undefended_from"] = known[key]["result"], known[key]["run"]
                log(f"  undefended: the same obfuscator, data and settings as {known[key]['run']}; its results reused")
                continue
        if same:  # attacked already with these settings
            result[which], result["undefended_from"] = copy.deepcopy(result["defended"]), f"{run_dir} (its defended obfuscator: the same weights)"
            figures[which] = figures["defended"]
            log("  undefended: the same weights as the defended obfuscator; its results and linkage reused")
        else:
            result[which], figures[which] = attack_obfuscator(obfuscator, data, s, width, model.split, candidates, which, log)
        if shared:
            known = read_ceilings(Path(ceilings))  # re-read: the file is only ever added to
            known[key] = {"run": str(run_dir), "result": result[which]}
            atomic_write_json(Path(ceilings), known)
    if reference is not run:
        result["ceiling_run"] = str(reference.path)  # the undefended columns are that run's pretrained obfuscator
    # What each obfuscator's classifier scores, beside what its features give away.
    result["accuracy"] = {"defended": run.summary.get("final_test_accuracy"), "undefended": reference.summary.get("pretrain_test_accuracy")}
    if s.client:  # the run's classifier on the client's output, not the run's own figure
        result["accuracy"]["defended"] = float((labels["predicted"].cpu() == labels["true"].cpu()).float().mean())
    result["under_trained"] = under_trained(result)
    result["capped"] = capped(result)
    result["unconverged"] = unconverged(result)
    result.update(
        settings=dataclasses.asdict(s), seed=s.seed, attacker_width=widths, scoring_version=SCORING_VERSION, device=str(device), seconds=round(time.perf_counter() - began, 1),
        date=time.strftime("%Y-%m-%d"), veil_version=__version__, torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
    )
    if s.client:
        result["client"] = {"file": s.client, "precision": run.obfuscator.client.meta["veil_precision"],
                            "fingerprint": run.obfuscator.client.fingerprint}
    out = attack_dir(run_dir, s)
    write_outputs(out, result, to_float(data.users[: s.n_show]).cpu(), figures)
    return result


# ----------------------------------------------------------------------------- Table 3


def _floor_figures(r: dict) -> dict:
    return {"psnr": r["psnr_mean"], "ssim": r["ssim_mean"], "reid_top1": r["reid_top1"]}


def attack_matrix(run_dirs: list[str | Path], s: AttackConfig, out_dir: str | Path, log=print) -> dict:
    """Attack each run (reusing RUN/attack/attack.json when it was made with the same settings against the
    same obfuscator) and write the attack x training reconstructor matrices of the defended obfuscators (Table 3: PSNR, then SSIM and re-identification).
    Every run must have finished training (unless s.allow_unfinished), before any is attacked. Runs that share
    their pretraining (forked from one, as Table 3's four are) share its undefended attack: OUT_DIR/ceilings.json."""
    validate_attack(s)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprints = [fingerprint(finished_run(run_dir, s)[0].obfuscator) for run_dir in run_dirs]
    results = []
    for run_dir, fp in zip(run_dirs, fingerprints):
        previous, why = saved_attack(run_dir, s, fp)
        if previous:
            log(f"veil attack: reusing {Path(run_dir) / 'attack' / 'attack.json'} (same settings, same obfuscator)")
            results.append(previous)
        else:
            if (Path(run_dir) / "attack" / "attack.json").is_file():
                log(f"veil attack: {why}; attacking {run_dir} again")
            results.append(attack(run_dir, s, log, ceilings=out_dir / "ceilings.json"))
    columns = [f"{r['training_reconstructor']} ({Path(r['run']).name})" for r in results]
    rows = attacker_names(s) + ([WHITEBOX] if s.whitebox else [])
    matrix = {
        "rows": rows,
        "columns": columns,
        "psnr": {row: {col: r["defended"][row]["psnr_mean"] for col, r in zip(columns, results)} for row in rows},
        # PSNR rewards the mean image given the code; SSIM and re-identification can name another strongest attacker
        "ssim": {row: {col: r["defended"][row]["ssim_mean"] for col, r in zip(columns, results)} for row in rows},
        "reid_top1": {row: {col: r["defended"][row]["reid_top1"] for col, r in zip(columns, results)} for row in rows},
        "floor": {col: r[FLOOR]["psnr"] for col, r in zip(columns, results)},
        "floors": {col: {"mean": _floor_figures(r[FLOOR]), **{k: _floor_figures(v) for k, v in r.get(CLASS_FLOOR, {}).items()}}
                   for col, r in zip(columns, results)},
        "accuracy": {col: r.get("accuracy", {}).get("defended") for col, r in zip(columns, results)},
        "undefended": {row: {col: r["undefended"][row]["psnr_mean"] if row in r.get("undefended", {}) else None for col, r in zip(columns, results)} for row in rows},
        "runs": [r["run"] for r in results],
        "lambda_privacy": {col: r["lambda_privacy"] for col, r in zip(columns, results)},
        "defence": {col: defence_label(r) for col, r in zip(columns, results)},
        "settings": dataclasses.asdict(s),
        "seed": s.seed,
    }
    atomic_write_json(out_dir / "matrix.json", matrix)
    atomic_write_text(out_dir / "matrix.csv", matrix_csv(matrix))
    atomic_write_text(out_dir / "matrix.md", matrix_markdown(matrix))
    return matrix
