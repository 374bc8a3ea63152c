"""The run directory: config, metrics (JSON lines), checkpoints (safetensors), summary.

    RUN/config.yaml                    the resolved config
    RUN/metrics.jsonl                  one line per phase-epoch
    RUN/summary.json                   headline numbers, written when training ends
    RUN/checkpoints/latest.json        which step folder is the newest complete checkpoint
    RUN/checkpoints/step-NNNNN/        obfuscator, classifier, reconstructor, optimiser states
    RUN/checkpoints/undefended/        obfuscator and classifier right after pretraining

A checkpoint folder is written under a temporary name and renamed; latest.json is replaced
atomically afterwards, so a kill at any moment leaves the previous checkpoint in force.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from veil import config as config_mod
from veil.io import CheckpointError, atomic_write_json, atomic_write_text, load_module, load_tensors, read_metadata, save_tensors

NETWORKS = ("obfuscator", "classifier", "reconstructor")


def checkpoints(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ----------------------------------------------------------------------------- metrics


def append_metrics(run_dir: Path, record: dict) -> None:
    """One JSON line, flushed and fsynced before the checkpoint that covers it is written."""
    import os

    with open(Path(run_dir) / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: Path) -> list[dict]:
    """All complete lines; a truncated last line (a kill mid-write) is dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: Path, steps_done: int) -> None:
    """Keep only lines of steps covered by the checkpoint being resumed from."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) < steps_done]
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
    return tensors, {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}


def optimizer_from_file(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors, meta = load_tensors(path), read_metadata(path)
    try:
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta["scalars"])
    except (KeyError, json.JSONDecodeError) as e:
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
    for net_name, net in nets.items():
        save_tensors(tmp / f"{net_name}.safetensors", net.state_dict())
    for opt_name, opt in optimizers.items():
        tensors, meta = optimizer_to_tensors(opt)
        save_tensors(tmp / f"optim-{opt_name}.safetensors", tensors, meta)
    atomic_write_json(tmp / "info.json", {"step": step, **info})
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    previous = latest_step_dir(run_dir)
    atomic_write_json(root / "latest.json", {"step": step, "dir": name})
    if previous is not None and previous.name != name:
        shutil.rmtree(previous, ignore_errors=True)


def latest_step_dir(run_dir: Path) -> Path | None:
    pointer = checkpoints(run_dir) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        d = checkpoints(run_dir) / json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer}: damaged ({e})") from None
    if not d.is_dir():
        raise CheckpointError(f"{pointer} points at {d}, which does not exist")
    return d


def save_undefended(run_dir: Path, obfuscator: torch.nn.Module, classifier: torch.nn.Module) -> None:
    d = checkpoints(run_dir) / "undefended"
    save_tensors(d / "obfuscator.safetensors", obfuscator.state_dict())
    save_tensors(d / "classifier.safetensors", classifier.state_dict())


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
    summary: dict = field(default_factory=dict)
    channels: int = 3
    num_classes: int = 10
    class_names: list[str] = field(default_factory=list)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Config and the newest weights of a run directory, networks in eval mode on `device`."""
    from veil.models import build_networks

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: not a Veil run directory (no config.yaml)")
    cfg = config_mod.load(run_dir / "config.yaml")
    step_dir = latest_step_dir(run_dir)
    if step_dir is None:
        raise CheckpointError(f"{run_dir}: no checkpoint yet (training has not finished a phase-epoch)")
    info = json.loads((step_dir / "info.json").read_text())
    noise = cfg.train.defence == "noise"
    nets = build_networks(cfg.model, info["channels"], info["num_classes"], cfg.data.image_size, noise=noise)
    for name in NETWORKS:
        load_module(nets[name], step_dir / f"{name}.safetensors")
    undefended = None
    if (checkpoints(run_dir) / "undefended" / "obfuscator.safetensors").is_file():
        undefended = build_networks(cfg.model, info["channels"], info["num_classes"], cfg.data.image_size, noise=noise)["obfuscator"]
        load_module(undefended, checkpoints(run_dir) / "undefended" / "obfuscator.safetensors")
        undefended.to(device).eval()
    for net in nets.values():
        net.to(device).eval()
    summary_path = run_dir / "summary.json"
    return Run(
        path=run_dir,
        config=cfg,
        obfuscator=nets["obfuscator"],
        classifier=nets["classifier"],
        reconstructor=nets["reconstructor"],
        undefended_obfuscator=undefended,
        metrics=read_metrics(run_dir),
        summary=json.loads(summary_path.read_text()) if summary_path.is_file() else {},
        channels=info["channels"],
        num_classes=info["num_classes"],
        class_names=info.get("class_names", []),
    )
