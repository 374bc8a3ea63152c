"""The run directory: config, metrics (JSON lines), checkpoints (safetensors), summary.

    RUN/config.yaml                    the resolved config
    RUN/metrics.jsonl                  one line per phase-epoch
    RUN/summary.json                   headline numbers, written when training ends
    RUN/checkpoints/latest.json        which step folder is the newest complete checkpoint
    RUN/checkpoints/step-NNNNN/        obfuscator, classifier, reconstructor, optimiser states,
                                       info.json (step, data shape, config, data fingerprint, sha256 of each file)
    RUN/checkpoints/undefended/        obfuscator and classifier right after pretraining, the reconstructor
                                       warmed up against them (+ info.json)

A checkpoint folder is written under a temporary name and renamed; latest.json is replaced
atomically afterwards, so a kill at any moment leaves the previous checkpoint in force. Every
file's sha256 is checked before its weights are loaded: a damaged checkpoint is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from veil import config as config_mod
from veil.defences import obfuscator_layer
from veil.io import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    check_sha256,
    load_module,
    load_tensors,
    read_metadata,
    save_tensors,
)
from veil.models import build_networks

NETWORKS = ("obfuscator", "classifier", "reconstructor")
STEP_INFO = ("step", "channels", "num_classes")  # what a step folder's info.json must hold


def checkpoints(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ----------------------------------------------------------------------------- metrics


def append_metrics(run_dir: Path, record: dict) -> None:
    """One JSON line, flushed and fsynced before the checkpoint that covers it is written."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: Path) -> list[dict]:
    """All complete lines; a truncated last line (a kill mid-write) is dropped, a bad line before it is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            records.append(record)
        except ValueError as e:
            if i == len(lines) - 1:
                break  # the line being written when the run was killed
            raise CheckpointError(f"{path}: line {i + 1} of {len(lines)} is damaged ({e}); only a last line may be cut short") from None
    return records


def truncate_metrics(run_dir: Path, steps_done: int) -> None:
    """Keep only lines of steps covered by the checkpoint being resumed from; they must all be there."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) < steps_done]
    if [r.get("step") for r in kept] != list(range(steps_done)):
        raise CheckpointError(
            f"{Path(run_dir) / 'metrics.jsonl'}: holds lines for steps {[r.get('step') for r in kept]}, but the checkpoint "
            f"covers steps 0..{steps_done - 1}; the log was edited or lost, so the summary would be wrong"
        )
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------- optimisers


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimiser's state as flat safetensors entries plus JSON metadata (no pickle)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    # One metadata entry: safetensors writes several in a random order, and the same state should give the same bytes.
    return tensors, {"optimizer": json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})}


def optimizer_from_file(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors, meta = load_tensors(path), read_metadata(path)
    try:
        meta = json.loads(meta["optimizer"]) if "optimizer" in meta else {k: json.loads(meta[k]) for k in ("param_groups", "scalars")}
        groups, scalars = meta["param_groups"], meta["scalars"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: optimiser metadata is missing or damaged ({e})") from None
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(scalars.items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: optimiser state does not fit this model ({e})") from None


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, step: int, nets: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer], info: dict) -> None:
    root = checkpoints(run_dir)
    name = f"step-{step:05d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    files = {}
    try:
        for net_name, net in nets.items():
            files[f"{net_name}.safetensors"] = save_tensors(tmp / f"{net_name}.safetensors", net.state_dict())
        for opt_name, opt in optimizers.items():
            tensors, meta = optimizer_to_tensors(opt)
            files[f"optim-{opt_name}.safetensors"] = save_tensors(tmp / f"optim-{opt_name}.safetensors", tensors, meta)
        atomic_write_json(tmp / "info.json", {"step": step, **info, "files": files})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half folder behind
        raise
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_json(root / "latest.json", {"step": step, "dir": name})
    # Older step folders (also one left by a kill between the rename and latest.json) are now stale.
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def step_dirs(run_dir: Path) -> list[Path]:
    """The step folders present, newest first (a folder being written is named .step-NNNNN.tmp and is not one)."""
    found = [d for d in checkpoints(run_dir).glob("step-*") if d.is_dir() and d.name[len("step-") :].isdigit()]
    return sorted(found, key=lambda d: int(d.name[len("step-") :]), reverse=True)


def newest_complete_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest step folder whose info.json and every file it lists pass their sha256 check, and what was wrong
    with each newer one (for when latest.json is missing)."""
    problems = []
    for d in step_dirs(run_dir):
        try:
            read_info(d, STEP_INFO)
            return d, problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems


def latest_step_dir(run_dir: Path) -> Path | None:
    """The folder latest.json names; None before the first checkpoint. A missing latest.json beside step folders
    is an error naming them: only `veil train --resume` takes up the newest complete one (and writes latest.json)."""
    pointer = checkpoints(run_dir) / "latest.json"
    if not pointer.is_file():
        found = step_dirs(run_dir)
        if found:
            raise CheckpointError(f"{pointer}: missing, though {checkpoints(run_dir)} holds {', '.join(d.name for d in found[:3])}; "
                                  f"`veil train --resume {run_dir}` resumes from the newest complete one and writes it again "
                                  f"(and trains nothing more if the run had finished)")
        return None
    try:
        d = checkpoints(run_dir) / json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer}: damaged ({e})") from None
    if not d.is_dir():
        raise CheckpointError(f"{pointer} points at {d}, which does not exist")
    return d


def save_undefended(run_dir: Path, obfuscator: torch.nn.Module | None = None, classifier: torch.nn.Module | None = None,
                    reconstructor: torch.nn.Module | None = None) -> None:
    """Networks of the undefended stage: f and g after pretraining, r after the warm-up against them."""
    d = checkpoints(run_dir) / "undefended"
    files = read_info(d).get("files", {}) if (d / "info.json").is_file() else {}
    for name, net in (("obfuscator", obfuscator), ("classifier", classifier), ("reconstructor", reconstructor)):
        if net is not None:
            files[f"{name}.safetensors"] = save_tensors(d / f"{name}.safetensors", net.state_dict())
    atomic_write_json(d / "info.json", {"files": files})


def read_info(folder: Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint folder's info.json, after checking every file it lists against its sha256."""
    path = Path(folder) / "info.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint folder is incomplete")
    try:
        info = json.loads(path.read_text())
        files = info.get("files", {})
        if not isinstance(info, dict) or not isinstance(files, dict):
            raise ValueError("not a JSON object with a 'files' mapping")
        missing = [k for k in required if not isinstance(info.get(k), int)]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing or not a whole number")
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: damaged ({e})") from None
    for name, digest in files.items():
        check_sha256(Path(folder) / name, digest)
    return info


def check_compatible(saved: dict, current: dict, where: Path) -> None:
    """Refuse a checkpoint made for other data or another config (an edited config.yaml, a replaced data file)."""
    for key, what in (("channels", "image channels"), ("num_classes", "classes")):
        if key in saved and saved[key] != current[key]:
            raise CheckpointError(
                f"{where} was trained on data with {saved[key]} {what}, but the data now has {current[key]}; "
                f"the data file or config changed since the run started"
            )
    if "config" in saved:
        changed = config_mod.changed_keys(saved["config"], current["config"], config_mod.RESUME_MAY_CHANGE)
        if changed:
            raise CheckpointError(
                f"{where} was made with another config; config.yaml was edited since ({'; '.join(changed)}). "
                f"Put the values back, or start a new run with --out"
            )
    if "data_fingerprint" in saved and saved["data_fingerprint"] != current["data_fingerprint"]:
        raise CheckpointError(
            f"{where} was trained on other images: the data's fingerprint {current['data_fingerprint'][:16]}... differs from "
            f"{saved['data_fingerprint'][:16]}... recorded in the checkpoint; the data file changed since the run started"
        )


def restore(run_dir: Path, nets: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer], info: dict,
            writer: bool = True, log=print) -> int:  # noqa: ANN001
    """Load the newest checkpoint into `nets` and `optimizers`; return how many steps it covers (0: none yet).
    Only the `writer` (process 0 of a multi-process run) tidies the run directory: another process removing
    temporary files could remove the one the writer is about to rename.

    With latest.json missing, the newest step folder that passes every sha256 check is taken (the writer writes
    latest.json for it again); step folders none of which is complete are refused. A run directory whose log or
    summary covers more than one step past the checkpoint found (a kill leaves at most one) is refused too:
    its checkpoints were lost, and training again would overwrite what they were the record of."""
    run_dir, root = Path(run_dir), checkpoints(run_dir)
    # Temporary files a kill left behind (never read: real files appear only by rename).
    stale = [*root.glob(".*.tmp"), *(root / "undefended").glob(".*.tmp"), *run_dir.glob(".metrics.jsonl.*.tmp"), *run_dir.glob(".summary.json.*.tmp")]
    for path in stale if writer else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    pointer, recovered = root / "latest.json", False
    if pointer.is_file():
        step_dir = latest_step_dir(run_dir)
    else:
        step_dir, problems = newest_complete_checkpoint(run_dir)
        if step_dir is None and problems:
            raise CheckpointError(f"{pointer}: missing, and no step folder holds a complete checkpoint ({problems[0]}); refusing to train "
                                  f"the run again over them")
        recovered = step_dir is not None
    done = 0
    if step_dir is not None:
        saved = read_info(step_dir, STEP_INFO)
        check_compatible(saved, info, step_dir)
        for name, net in nets.items():
            load_module(net, step_dir / f"{name}.safetensors")
        for name, opt in optimizers.items():
            optimizer_from_file(opt, step_dir / f"optim-{name}.safetensors")
        done = int(saved["step"])
    check_nothing_lost(run_dir, done, step_dir)
    if recovered:
        log(f"{pointer} was missing; resuming from {step_dir.name}, the newest complete checkpoint (every file's sha256 checked)")
        if writer:
            atomic_write_json(pointer, {"step": done, "dir": step_dir.name})
    if writer:
        truncate_metrics(run_dir, done)
    return done


def check_nothing_lost(run_dir: Path, done: int, step_dir: Path | None) -> None:
    """Refuse to train again over steps the log or summary records beyond the checkpoint (a kill leaves at most one)."""
    run_dir = Path(run_dir)
    logged = sorted({r["step"] for r in read_metrics(run_dir) if isinstance(r.get("step"), int) and r["step"] >= done})
    summary_steps = 0
    if (run_dir / "summary.json").is_file():
        try:
            summary_steps = int(json.loads((run_dir / "summary.json").read_text()).get("steps", 0))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
            summary_steps = 0  # a damaged summary says nothing; it is written again at the end
    beyond = max(len(logged), summary_steps - done)
    if beyond > 1:
        what = f"the newest checkpoint, {step_dir.name}, covers {done}" if step_dir is not None else f"{checkpoints(run_dir)} holds no checkpoint, which covers 0"
        raise CheckpointError(
            f"{run_dir}: {'summary.json' if summary_steps - done == beyond else 'metrics.jsonl'} records {done + beyond} steps, but {what}; "
            f"the later checkpoints are gone (a kill loses at most one step), so --resume would train them again over that record. "
            f"Put the checkpoints back, or train a new run with --out"
        )


# ----------------------------------------------------------------------------- loading


@dataclass
class Run:
    """A finished (or partly finished) run, loaded for use: `veil.load_run(path)`."""

    path: Path
    config: config_mod.Config
    obfuscator: torch.nn.Module
    classifier: torch.nn.Module
    reconstructor: torch.nn.Module
    undefended_obfuscator: torch.nn.Module | None
    metrics: list[dict] = field(default_factory=list)
    undefended_classifier: torch.nn.Module | None = None  # g right after pretraining, beside undefended_obfuscator
    summary: dict = field(default_factory=dict)
    channels: int = 3
    num_classes: int = 10
    class_names: list[str] = field(default_factory=list)
    step: int = 0  # phase-epochs the loaded checkpoint covers (len(train.plan(config.train)) once training finished)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Config and the newest weights of a run directory, networks in eval mode on `device`."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: not a Veil run directory (no config.yaml)")
    cfg = config_mod.load(run_dir / "config.yaml")
    step_dir = latest_step_dir(run_dir)
    if step_dir is None:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (training has not finished a phase-epoch)")
    info = read_info(step_dir, STEP_INFO)
    if "config" in info:
        changed = config_mod.changed_keys(info["config"], config_mod.to_dict(cfg), config_mod.RESUME_MAY_CHANGE)
        if changed:
            raise CheckpointError(f"{run_dir / 'config.yaml'} was edited after {step_dir} was written ({'; '.join(changed)}); put the values back")
    nets = build_networks(cfg.model, info["channels"], info["num_classes"], cfg.data.image_size, obfuscator_layer(cfg), cfg.seed)
    for name in NETWORKS:
        load_module(nets[name], step_dir / f"{name}.safetensors")
    undefended = undefended_classifier = None
    if (checkpoints(run_dir) / "undefended" / "obfuscator.safetensors").is_file():
        if (checkpoints(run_dir) / "undefended" / "info.json").is_file():
            read_info(checkpoints(run_dir) / "undefended")
        pretrained = build_networks(cfg.model, info["channels"], info["num_classes"], cfg.data.image_size, obfuscator_layer(cfg), cfg.seed)
        undefended = pretrained["obfuscator"]
        load_module(undefended, checkpoints(run_dir) / "undefended" / "obfuscator.safetensors")
        undefended.to(device).eval()
        if (checkpoints(run_dir) / "undefended" / "classifier.safetensors").is_file():
            undefended_classifier = pretrained["classifier"]
            load_module(undefended_classifier, checkpoints(run_dir) / "undefended" / "classifier.safetensors")
            undefended_classifier.to(device).eval()
    for net in nets.values():
        net.to(device).eval()
    summary_path = run_dir / "summary.json"
    summary = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{summary_path}: damaged, not valid JSON ({e}); `veil train --resume {run_dir}` writes it again") from None
        if not isinstance(summary, dict):
            raise CheckpointError(f"{summary_path}: damaged, a JSON object expected, got {type(summary).__name__}; "
                                  f"`veil train --resume {run_dir}` writes it again")
    return Run(
        path=run_dir,
        config=cfg,
        obfuscator=nets["obfuscator"],
        classifier=nets["classifier"],
        reconstructor=nets["reconstructor"],
        undefended_obfuscator=undefended,
        undefended_classifier=undefended_classifier,
        metrics=read_metrics(run_dir),
        summary=summary,
        channels=info["channels"],
        num_classes=info["num_classes"],
        class_names=info.get("class_names", []),
        step=int(info["step"]),
    )
