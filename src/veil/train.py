"""Algorithm 1: one function per phase, and `train(cfg, run_dir)` calling them in order.

The plan of a run is a flat list of phase-epochs ("steps"):

    pretrain x pretrain_epochs            f+g on cross-entropy              (Algorithm 1, first pass)
    reconstructor_warmup x warmup_epochs  r on Eq. 3 against the undefended f
    then t_main rounds of
      obfuscator_classifier x t_sub       (a) f+g on Eq. 2, r frozen
      reconstructor x t_sub               (b) r on Eq. 3, f frozen
      obfuscator x t_sub                  (c) f on Eq. 2, g and r frozen
    reconstructor_final x warmup_epochs   r on Eq. 3 against the final f

The rounds are the run's defence's (veil/defences/): the paper's adversarial training runs
(a), (b), (c); NoPeek and noise run t_sub epochs of one phase named after them, f + g on
cross-entropy + strength * the defence's penalty; `none` has no rounds.

The warm-up is the paper's first pass of Algorithm 1 (pretraining is followed by reconstructor
training); it gives round 1's privacy term a trained attacker and gives the "before" PSNR.
The final refit lets r answer phase (c) of the last round: without it the "after" PSNR would
be measured right after f learnt to fool a fixed r, which flatters the defence.

Every step is seeded by (seed, step index) alone, so a resumed run draws the same batches and
augmentations as an uninterrupted one. A checkpoint is written after every step.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from veil import config as config_mod
from veil import data as data_mod
from veil import distributed, rundir, runtime
from veil.config import Config, TrainConfig
from veil.data import ImageSet, Splits, batches, load_splits, shard, to_float
from veil.defences import (
    FINAL,
    PHASE_A,
    PHASE_B,
    PHASE_C,
    PRETRAIN,
    RECONSTRUCTOR_PHASES,
    WARMUP,
    Penalty,
    describe,
    get_defence,
    obfuscator_layer,
    strength_of,
)
from veil.errors import TrainingError
from veil.io import atomic_write_json, atomic_write_text, load_module, save_tensors
from veil.metrics import psnr
from veil.models import build_networks, build_obfuscator, client_cost, feature_shape, init_xavier
from veil.models.obfuscator import code_bytes, code_dtype, quantised_bits
from veil.models.reconstructors import members
from veil.progress import progress_bar
from veil.runtime import Runtime, resolve_device
from veil.signals import StopSignals
from veil.version import __version__


class Stopped(Exception):
    """SIGTERM/SIGINT stopped the run after its current phase-epoch was saved; --resume continues it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass(frozen=True)
class Step:
    phase: str
    round: int  # 0 for pretraining and warm-up, 1..t_main for the adversarial rounds
    epoch: int  # 1-based epoch within this phase of this round


def plan(t: TrainConfig) -> list[Step]:
    warmup = t.t_sub if t.warmup_epochs < 0 else t.warmup_epochs
    steps = [Step(PRETRAIN, 0, e + 1) for e in range(t.pretrain_epochs)]
    steps += [Step(WARMUP, 0, e + 1) for e in range(warmup)]
    phases = get_defence(t.defence).round_phases
    rounds = t.t_main if phases else 0
    for k in range(1, rounds + 1):
        for phase in phases:
            steps += [Step(phase, k, e + 1) for e in range(t.epochs_of(phase))]
    if rounds:
        steps += [Step(FINAL, t.t_main, e + 1) for e in range(warmup)]
    return steps


# ----------------------------------------------------------------------------- forking a pretraining

# Keys that act only after pretraining: runs that differ in nothing else pretrain bit for bit alike
# (every step is seeded by its index; r is built after f and g and unused until the warm-up).
AFTER_PRETRAINING = ("train.defence", "train.lambda_privacy", "train.nopeek_alpha", "train.noise_sigma", "train.vib_beta", "train.t_main", "train.t_sub",
                     "train.t_reconstructor", "train.reinit_every", "train.warmup_epochs", "train.lr_reconstructor", "train.adversarial_lr_scale",
                     "model.reconstructor")
FORKED = "forked.json"  # in a forked run directory: where its pretraining came from


def pretrains_alike(donor: Config, cfg: Config) -> bool:
    """`cfg` pretrains exactly as `donor` did: the same config but for AFTER_PRETRAINING (and what a resume
    may change). A defence's layer (noise) may be on one side only: it is inactive until the rounds."""
    return not config_mod.changed_keys(config_mod.to_dict(donor), config_mod.to_dict(cfg), AFTER_PRETRAINING + config_mod.RESUME_MAY_CHANGE)


def layer_keys(obfuscator: nn.Module, cfg: Config) -> set[str]:
    """The state keys of the defence layer at the end of f (none when the defence adds none)."""
    if get_defence(cfg.train.defence).layer is None:
        return set()
    prefix = f"{len(obfuscator) - 1}."
    return {k for k in obfuscator.state_dict() if k.startswith(prefix)}


def finished_pretraining(run_dir: Path) -> bool:
    """The run's pretraining is done: its undefended f and g are saved and its log covers every pretraining step."""
    run_dir = Path(run_dir)
    if not (rundir.checkpoints(run_dir) / "undefended" / "classifier.safetensors").is_file():
        return False
    n = sum(s.phase == PRETRAIN for s in plan(config_mod.load(run_dir / "config.yaml").train))
    return len(rundir.read_metrics(run_dir)) >= n


def fork(donor_dir: str | Path, cfg: Config, run_dir: str | Path) -> dict:
    """Start a new run directory at the end of `donor_dir`'s pretraining instead of pretraining again.

    The new run holds what its own pretraining would have left: a checkpoint at the last pretraining
    step (f and g from the donor's undefended checkpoint, r and every optimiser of the later phases as
    built fresh from cfg.seed), the donor's log lines of those steps, and its own undefended f and g (g
    hard-linked where the file system allows; f written in this run's layout, which may add or drop a
    defence layer that is idle in pretraining), whose sha256s FORKED records with the donor's path. `train(cfg, run_dir, resume=True)` then continues it as if it had pretrained itself;
    only the pretraining optimiser's moments, never used again, are not carried over. The directory
    appears by one rename, so a kill leaves either nothing or a resumable run.
    """
    donor_dir, run_dir = Path(donor_dir), Path(run_dir)
    donor = config_mod.load(donor_dir / "config.yaml")
    if not pretrains_alike(donor, cfg):
        differ = config_mod.changed_keys(config_mod.to_dict(donor), config_mod.to_dict(cfg), AFTER_PRETRAINING + config_mod.RESUME_MAY_CHANGE)
        raise TrainingError(f"cannot fork {donor_dir}: it pretrained otherwise ({'; '.join(differ)})")
    if not finished_pretraining(donor_dir):
        raise TrainingError(f"cannot fork {donor_dir}: its pretraining has not finished")
    if run_dir.exists():
        raise TrainingError(f"cannot fork into {run_dir}: it exists")
    n = sum(s.phase == PRETRAIN for s in plan(cfg.train))
    undefended = rundir.checkpoints(donor_dir) / "undefended"
    files = rundir.read_info(undefended)["files"]  # checks every sha256
    saved = rundir.read_info(rundir.latest_step_dir(donor_dir), rundir.STEP_INFO)
    info = {k: v for k, v in saved.items() if k not in ("step", "files")} | {"config": config_mod.to_dict(cfg)}
    donor_f = build_obfuscator(donor.model, info["channels"], donor.seed, obfuscator_layer(donor))  # before seeding: the draws below stay _train's
    load_module(donor_f, undefended / "obfuscator.safetensors")
    torch.manual_seed(cfg.seed)  # as _train does: r's initial weights are those of a run that pretrained itself
    nets = build_networks(cfg.model, info["channels"], info["num_classes"], cfg.data.image_size, obfuscator_layer(cfg), cfg.seed)
    load_module(nets["classifier"], undefended / "classifier.safetensors")
    # f's weights. A defence layer (noise), on either side, does nothing in pretraining: its buffers stay as built.
    theirs, own = donor_f.state_dict(), nets["obfuscator"].state_dict()
    layers = layer_keys(donor_f, donor) | layer_keys(nets["obfuscator"], cfg)
    odd = (set(theirs) ^ set(own)) - layers
    if odd:
        raise TrainingError(f"cannot fork {donor_dir}: its obfuscator differs in {', '.join(sorted(odd)[:3])}")
    nets["obfuscator"].load_state_dict({k: v if k in layers else theirs[k] for k, v in own.items()})

    tmp = run_dir.with_name(f".{run_dir.name}.fork.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mine = rundir.checkpoints(tmp) / "undefended"
    mine.mkdir(parents=True)
    link_or_copy(undefended / "classifier.safetensors", mine / "classifier.safetensors")
    kept = {"obfuscator.safetensors": save_tensors(mine / "obfuscator.safetensors", nets["obfuscator"].state_dict()),  # in this run's f's layout
            "classifier.safetensors": files["classifier.safetensors"]}
    atomic_write_json(mine / "info.json", {"files": kept})
    atomic_write_text(tmp / "config.yaml", config_mod.to_yaml(cfg))
    for record in rundir.read_metrics(donor_dir)[:n]:
        rundir.append_metrics(tmp, record)
    rundir.save_checkpoint(tmp, n, nets, make_optimizers(nets, cfg.train), info)
    record = {"from": str(donor_dir), "step": n, "undefended": kept, "donor_undefended": {k: files[k] for k in kept}}
    atomic_write_json(tmp / FORKED, record)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(run_dir)
    return record


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def reinit_due(t: TrainConfig, step: Step) -> bool:
    """Phase (b)'s first epoch of every reinit_every-th round after the first."""
    return bool(t.reinit_every) and step.phase == PHASE_B and step.epoch == 1 and step.round > 1 and (step.round - 1) % t.reinit_every == 0


def reinitialise(reconstructor: nn.Module, opt: torch.optim.Optimizer, seed: int, round_: int) -> None:
    """Fresh weights (Xavier, BatchNorm at identity with fresh statistics) and no optimiser moments, drawn from
    (seed, round) alone: the same in every process and after a resume."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + 104_729 * round_)
        for m in reconstructor.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        init_xavier(reconstructor)
    opt.state.clear()


# ----------------------------------------------------------------------------- optimisers


def make_optimizer(params: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    # On CUDA the fused kernels update every parameter in one launch (same arithmetic).
    fused = all(p.is_cuda for group in params for p in group["params"]) or None
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=0.9, nesterov=True, fused=fused)
    return torch.optim.Adam(params, fused=fused)


def make_optimizers(nets: dict[str, nn.Module], t: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """One optimiser per phase, so that a frozen network is never touched by another's momentum."""
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    wd = t.weight_decay

    def fg(scale: float) -> list[dict]:
        return [
            {"params": list(f.parameters()), "lr": t.lr_obfuscator * scale, "weight_decay": wd},
            {"params": list(g.parameters()), "lr": t.lr_classifier * scale, "weight_decay": wd},
        ]

    # Adversarial phases fine-tune a converged f+g: a smaller step keeps accuracy while f moves.
    adv = t.adversarial_lr_scale
    return {
        PRETRAIN: make_optimizer(fg(1.0), t),
        PHASE_A: make_optimizer(fg(adv), t),
        PHASE_B: make_optimizer([{"params": list(r.parameters()), "lr": t.lr_reconstructor, "weight_decay": 0.0}], t),
        PHASE_C: make_optimizer([{"params": list(f.parameters()), "lr": t.lr_obfuscator * adv, "weight_decay": wd}], t),
    }


def onecycle_factor(step: int, total: int, warmup_fraction: float = 0.15) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine to zero."""
    if total <= 1:
        return 1.0
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def step_factor(epoch: int, total: int) -> float:
    """The plain step schedule: the peak rate, x0.1 from 50% of the epochs, x0.01 from 75%."""
    done = (epoch - 1) / max(1, total)
    return 1.0 if done < 0.5 else 0.1 if done < 0.75 else 0.01


def pretrain_lr_factor(schedule: str, epoch: int, n_epochs: int, steps_per_epoch: int):  # noqa: ANN201
    """Batch index -> multiplier of the peak rates for one pretraining epoch (None = keep the peak)."""
    if schedule == "onecycle":
        offset, total = (epoch - 1) * steps_per_epoch, n_epochs * steps_per_epoch
        return lambda i: onecycle_factor(offset + i, total)
    if schedule == "step":
        factor = step_factor(epoch, n_epochs)
        return lambda i: factor
    return None


def set_lr(opt: torch.optim.Optimizer, peaks: list[float], factor: float) -> None:
    for group, peak in zip(opt.param_groups, peaks):
        group["lr"] = peak * factor


def freeze(module: nn.Module, frozen: bool) -> None:
    """Frozen = no gradients and eval mode (BatchNorm running statistics must not move either)."""
    module.requires_grad_(not frozen)
    module.train(not frozen)


# ----------------------------------------------------------------------------- phases


def _batches(data: ImageSet, natural: bool, cfg: Config, generator: torch.Generator, rt: Runtime):
    """This process's part of each training batch, augmented, in the runtime's memory layout."""
    flip = natural if cfg.data.augment else None
    return batches(data, cfg.train.batch_size, generator, flip, rt.rank, rt.world_size, rt.memory_format)


def _row(batch: int, *means: torch.Tensor, correct: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's metric sums (means x batch size, then the count of correct answers), kept on the device."""
    sums = [m.detach().float() * batch for m in means]
    return torch.stack(sums if correct is None else sums + [correct.float()])


def _epoch_means(rows: list[torch.Tensor], n: int, rt: Runtime, step: Step) -> list[float]:
    """Per-batch sums -> epoch means over all processes (a count of correct answers -> accuracy).

    This is the one host-device sync of a training epoch. A non-finite loss is reported here,
    at the end of the phase-epoch, so the step itself never waits for the device; the checkpoint
    of this phase-epoch is then not written, and the previous one stays in force.
    """
    per_batch = torch.stack(rows)  # batches x k
    total = torch.cat([per_batch.sum(0), torch.tensor([float(n)], device=per_batch.device)])
    values = distributed.all_reduce_sum(total).tolist()
    if not all(math.isfinite(v) for v in values):
        bad = (~torch.isfinite(per_batch).all(1)).nonzero()
        where = f"batch {bad[0].item()}" if len(bad) else "another process"
        raise TrainingError(
            f"non-finite loss in phase '{step.phase}', round {step.round}, epoch {step.epoch}, first at {where}"
        )
    return [v / values[-1] for v in values[:-1]]


def check_finite_weights(nets: dict[str, nn.Module], step: Step) -> None:
    """A step that ends with inf/NaN weights (a last batch that blew up) must not become a checkpoint."""
    for name, net in nets.items():
        for key, value in net.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise TrainingError(f"non-finite values in {name} '{key}' at the end of phase '{step.phase}', round {step.round}, epoch {step.epoch}")


@dataclass(frozen=True)
class Privacy:
    """The privacy term of a phase: weight * penalty(images, f(images), r), logged as `metric`."""

    weight: float
    penalty: Penalty
    metric: str
    uses_labels: bool = False  # the penalty takes the batch's labels too


def privacy_term(cfg: Config) -> Privacy | None:
    """The run's defence's privacy term at its strength (None for a defence without one)."""
    d = get_defence(cfg.train.defence)
    return Privacy(strength_of(cfg), d.penalty, d.penalty_metric, d.penalty_uses_labels) if d.penalty else None


def train_obfuscator_classifier(
    nets: dict[str, nn.Module], opt: torch.optim.Optimizer, data: ImageSet, natural: bool, cfg: Config,
    generator: torch.Generator, step: Step, privacy: Privacy | None = None, lr_factor=None, bar=None, rt: Runtime | None = None,
    with_classifier: bool = True,
) -> dict:
    """f and g minimise CE + weight * penalty, r frozen: pretraining (no penalty), phase (a) (Eq. 2:
    the penalty is PSNR(I, r(f(I)))) and the f + g epochs of other defences (NoPeek's dCor, computed on
    each process's part of the batch; the noise defence has no penalty, its noise is f's last layer).
    with_classifier=False is phase (c): f alone, g frozen too."""
    rt = rt or Runtime(data.images.device)
    freeze(nets["obfuscator"], False), freeze(nets["classifier"], not with_classifier), freeze(nets["reconstructor"], True)
    f, r = rt.replica(nets, "obfuscator"), nets["reconstructor"]
    g = rt.replica(nets, "classifier") if with_classifier else nets["classifier"]
    t = cfg.train
    rows, n = [], 0
    for i, (images, labels) in enumerate(_batches(data, natural, cfg, generator, rt)):
        if lr_factor is not None:
            set_lr(opt, [t.lr_obfuscator, t.lr_classifier], lr_factor(i))
        with rt.autocast():
            features = f(images)  # N x 128w x 8 x 8
            logits = g(features)
            ce = F.cross_entropy(logits, labels, label_smoothing=t.label_smoothing)
            # At strength 0 the penalty is only logged: detached, no backward runs through r (a lambda = 0 sweep point).
            if privacy:
                extra = (labels,) if privacy.uses_labels else ()
                p = privacy.penalty(images, features if privacy.weight else features.detach(), r, *extra)
            else:
                p = torch.zeros((), device=images.device)
            loss = ce + privacy.weight * p if privacy else ce  # Eq. 2, or the defence's
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows.append(_row(len(labels), loss, ce, p, correct=(logits.argmax(1) == labels).sum()))
        n += len(labels)
        if bar is not None:
            bar.update(1)
    loss, ce, p, accuracy = _epoch_means(rows, n, rt, step)
    out = {"loss": loss, "ce": ce, "train_accuracy": accuracy}
    if privacy:
        out[privacy.metric] = p
    return out


def train_reconstructor(
    nets: dict[str, nn.Module], opt: torch.optim.Optimizer, data: ImageSet, natural: bool, cfg: Config,
    generator: torch.Generator, step: Step, bar=None, rt: Runtime | None = None,
) -> dict:
    """Phase (b) and the warm-up: r maximises PSNR(I, r(f(I))) with f frozen (Eq. 3); a pool's members each
    do, and the strongest member's PSNR is logged."""
    rt = rt or Runtime(data.images.device)
    freeze(nets["obfuscator"], True), freeze(nets["classifier"], True), freeze(nets["reconstructor"], False)
    f, r = nets["obfuscator"], rt.replica(nets, "reconstructor")
    rows, n = [], 0
    for images, _ in _batches(data, natural, cfg, generator, rt):
        with rt.autocast():
            with torch.no_grad():
                features = f(images)
            each = torch.stack([psnr(images, m(features)).mean() for m in members(r)])
            loss = -each.sum()  # Eq. 3: maximise PSNR (a pool's members each on their own: their losses share no weights)
            p = each.max().detach()  # the strongest
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows.append(_row(len(images), p))
        n += len(images)
        if bar is not None:
            bar.update(1)
    (p,) = _epoch_means(rows, n, rt, step)
    return {"loss": -p, "train_psnr": p}


@torch.no_grad()
def evaluate(nets: dict[str, nn.Module], data: ImageSet, batch_size: int, with_reconstructor: bool = True, rt: Runtime | None = None,
             flip: bool = False) -> dict:
    """Test accuracy of g(f(I)) and mean PSNR of r(f(I)) (a pool: its strongest member's) over a whole split, networks in eval mode.
    flip: accuracy from g(f(I)) + g(f(mirror of I)) (train.test_flip).

    In a multi-process run each process evaluates its own part of the split and the sums are added.
    """
    rt = rt or Runtime(data.images.device)
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    modes = {k: m.training for k, m in nets.items()}
    for m in nets.values():
        m.eval()
    part = shard(len(data), rt.rank, rt.world_size)
    images_u8, labels_all = data.images[part], data.labels[part]
    pool = members(r)
    sums = torch.zeros(2 + len(pool), device=data.images.device)  # images, correct, PSNR sum of each reconstructor
    sums[0] = len(labels_all)
    for start in range(0, len(labels_all), batch_size):
        images = to_float(images_u8[start : start + batch_size], rt.memory_format)
        labels = labels_all[start : start + batch_size]
        with rt.autocast():
            features = f(images)
            logits = g(features) + g(f(images.flip(3))) if flip else g(features)
            sums[1] += (logits.argmax(1) == labels).sum()
            if with_reconstructor:
                for i, m in enumerate(pool):
                    sums[2 + i] += psnr(images, m(features)).sum()
    for k, m in nets.items():
        m.train(modes[k])
    n, correct, *total_psnr = distributed.all_reduce_sum(sums).tolist()
    out = {"test_accuracy": correct / n}
    if with_reconstructor:
        out["test_psnr"] = max(total_psnr) / n  # a pool's strongest member
    return out


# ----------------------------------------------------------------------------- the run


def tensorboard_writer_class():  # noqa: ANN201
    """Optional: TensorBoard event files in RUN/tensorboard; needs the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter


@torch.no_grad()
def log_tensorboard(writer, record: dict, nets: dict[str, nn.Module], test: ImageSet, n_images: int = 8) -> None:  # noqa: ANN001
    """One phase-epoch's scalars, and users' images (top row) above their reconstructions."""
    from torchvision.utils import make_grid

    step = record["step"]
    for key in ("loss", "ce", "train_psnr", "train_accuracy"):
        if key in record:
            writer.add_scalar(f"{record['phase']}/{key}", record[key], step)
    for key in ("test_accuracy", "test_psnr"):
        if key in record:
            writer.add_scalar(f"test/{key}", record[key], step)
    if record["phase"] != PRETRAIN:
        f, r = nets["obfuscator"], nets["reconstructor"]
        modes = (f.training, r.training)
        f.eval(), r.eval()
        images = to_float(test.images[:n_images])
        rebuilt = r(f(images)).clamp(0, 1)
        f.train(modes[0]), r.train(modes[1])
        writer.add_image("reconstructions", make_grid(torch.cat([images, rebuilt]).cpu(), nrow=len(images)), step)
    writer.flush()


def train(cfg: Config, run_dir: str | Path, resume: bool = False, log=print, tensorboard: bool = False) -> dict:  # noqa: ANN001
    """Run Algorithm 1 into `run_dir` (or continue it) and return the summary.

    Raises Stopped when SIGTERM/SIGINT ended the run early (after saving), TrainingError on a
    non-finite loss (nothing of that step is saved) or a run directory in the wrong state.
    Under torchrun every process calls this; process 0 writes the run directory and logs, and
    returns the summary (the others return {}).
    """
    rt = runtime.resolve(cfg, resolve_device(cfg.device))
    started = distributed.join(rt.device)
    finished = False
    try:
        summary = _train(cfg, Path(run_dir), resume, log if rt.is_main else (lambda *_: None), rt, tensorboard)
        finished = True
        return summary
    except Stopped:
        finished = True  # every process stops after the same step (any_process)
        raise
    finally:
        distributed.leave(started, finished)


def _open_run_dir(cfg: Config, run_dir: Path, resume: bool, rt: Runtime) -> None:
    """Check (in every process), then create the run directory (process 0) before anyone writes."""
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise TrainingError(f"cannot resume: {run_dir} holds no config.yaml (not a Veil run directory)")
    elif (run_dir / "config.yaml").exists():
        raise TrainingError(f"{run_dir} already holds a run; resume it with `veil train --resume {run_dir}` or choose another --out")
    if rt.distributed and cfg.train.batch_size % rt.world_size:
        raise TrainingError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the number of processes ({rt.world_size})")
    distributed.barrier()  # every process has checked before process 0 writes
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))


def check_rounds(t: TrainConfig) -> None:
    """Refuse rounds that would train nothing of f (t_sub=0): the summary's "after" would be the pretrained obfuscator."""
    phases = get_defence(t.defence).round_phases
    if phases and t.t_main > 0 and not any(t.epochs_of(p) for p in phases if p not in RECONSTRUCTOR_PHASES):
        raise TrainingError(f"train.t_sub=0 gives the {t.t_main} round(s) of defence {t.defence} no epoch that trains the obfuscator, so "
                            f"'after {t.defence}' would be the pretrained one; set train.t_sub >= 1, or train.t_main=0 for no rounds")


def _train(cfg: Config, run_dir: Path, resume: bool, log, rt: Runtime, tensorboard: bool = False) -> dict:  # noqa: ANN001
    check_rounds(cfg.train)
    device = rt.device
    splits: Splits = load_splits(cfg.data, cfg.seed, labelling="task")  # training learns the task's labels (data.task)
    writer_class = tensorboard_writer_class() if tensorboard else None  # fails before anything is written
    # Only now that the data loaded: bad input must not leave a run directory that blocks the next try.
    _open_run_dir(cfg, run_dir, resume, rt)
    writer = writer_class(log_dir=str(run_dir / "tensorboard")) if writer_class and rt.is_main else None
    defender, test = splits.defender.to(device), splits.test.to(device)
    if rt.distributed and len(defender) < cfg.train.batch_size:
        raise TrainingError(f"multi-process training needs at least one full batch: {len(defender)} defender images < train.batch_size {cfg.train.batch_size}")
    torch.manual_seed(cfg.seed)
    defence, privacy = get_defence(cfg.train.defence), privacy_term(cfg)
    nets = build_networks(cfg.model, splits.channels, splits.num_classes, cfg.data.image_size, obfuscator_layer(cfg), cfg.seed)
    runtime.prepare_networks(nets, rt, cfg.train.sync_batchnorm)
    opts = make_optimizers(nets, cfg.train)
    steps = plan(cfg.train)
    info = {
        "channels": splits.channels, "num_classes": splits.num_classes, "class_names": splits.defender.classes, "dataset": splits.name,
        "config": config_mod.to_dict(cfg), "data_fingerprint": data_mod.fingerprint(splits),
    }
    if splits.skipped:
        log(f"skipped {len(splits.skipped)} unreadable image files (data.on_bad_image=skip), e.g. {splits.skipped[0]}")

    done = 0
    if resume:
        # Checks every file's sha256, the config and the data against the checkpoint before loading.
        done = rundir.restore(run_dir, nets, opts, info, writer=rt.is_main, log=log)
        log(f"resuming {run_dir} after step {done} of {len(steps)}")
    run_costs = costs(nets["obfuscator"], cfg)  # on the plain network, before compiling
    runtime.wrap_networks(nets, rt)  # compile and DDP come after loading: DDP copies process 0's weights

    log(
        f"veil train: {splits.name}, defender {len(defender)} / attacker {len(splits.attacker)} / test {len(test)} images, "
        f"width {cfg.model.width}, reconstructor {cfg.model.reconstructor}, defence {cfg.train.defence} ({describe(cfg)}), device {device}"
        + (f" x {rt.world_size} processes" if rt.distributed else "")
        + f", {rt.precision}{', channels_last' if rt.channels_last else ''}{', compiled' if rt.compile else ''}"
    )
    steps_per_epoch = max(1, len(defender) // cfg.train.batch_size) if len(defender) > cfg.train.batch_size else 1
    n_pretrain = sum(s.phase == PRETRAIN for s in steps)
    with StopSignals("after this phase-epoch is saved") as stop:
        for index in range(done, len(steps)):
            step = steps[index]
            # Seed by step index alone: a resumed run sees the same batches as an uninterrupted one.
            # The data generator is the same in every process (each takes its slice of the same batch);
            # the global generator (dropout) differs per process.
            torch.manual_seed(cfg.seed * 1_000_003 + index + 7919 * rt.rank)
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + index)
            desc = f"{step.phase} r{step.round} e{step.epoch}"
            start = time.perf_counter()
            with progress_bar(steps_per_epoch, desc, cfg.progress and rt.is_main) as bar, _on_nonfinite(run_dir, index, len(steps)):
                if step.phase == PRETRAIN:
                    lr_factor = pretrain_lr_factor(cfg.train.pretrain_schedule, step.epoch, n_pretrain, steps_per_epoch)
                    record = train_obfuscator_classifier(nets, opts[PRETRAIN], defender, splits.natural, cfg, generator, step, None, lr_factor, bar, rt)
                elif step.phase in RECONSTRUCTOR_PHASES:
                    if reinit_due(cfg.train, step):
                        reinitialise(nets["reconstructor"], opts[PHASE_B], cfg.seed, step.round)
                    record = train_reconstructor(nets, opts[PHASE_B], defender, splits.natural, cfg, generator, step, bar, rt)
                else:  # a round's phase that trains f: (a), (c), or the defence's own f + g phase
                    if defence.start is not None:
                        defence.start(nets["obfuscator"], strength_of(cfg))
                    only_f = step.phase == PHASE_C
                    record = train_obfuscator_classifier(nets, opts[PHASE_C if only_f else PHASE_A], defender, splits.natural, cfg, generator,
                                                         step, privacy, None, bar, rt, with_classifier=not only_f)
                check_finite_weights(nets, step)
            record.update(evaluate(nets, test, cfg.train.eval_batch_size, with_reconstructor=step.phase != PRETRAIN, rt=rt,
                                   flip=cfg.train.test_flip and splits.natural))  # a mirrored digit is another symbol
            record = {"step": index, "phase": step.phase, "round": step.round, "epoch": step.epoch, **record, "seconds": round(time.perf_counter() - start, 3)}
            if rt.is_main:
                rundir.append_metrics(run_dir, record)
                if writer is not None:
                    log_tensorboard(writer, record, nets, test)
                if step.phase == PRETRAIN and (index + 1 == len(steps) or steps[index + 1].phase != PRETRAIN):
                    rundir.save_undefended(run_dir, nets["obfuscator"], nets["classifier"])
                if step.phase == WARMUP and (index + 1 == len(steps) or steps[index + 1].phase != WARMUP):
                    # The reconstructor fitted to the undefended obfuscator: `veil report`'s Figure 5.
                    rundir.save_undefended(run_dir, reconstructor=nets["reconstructor"])
                rundir.save_checkpoint(run_dir, index + 1, nets, opts, info)
            log(_format(record))
            if distributed.any_process(stop.requested, device) and index + 1 < len(steps):
                raise Stopped(f"stopped after step {index + 1} of {len(steps)} (saved); continue with `veil train --resume {run_dir}`", stop.signum)
    if writer is not None:
        writer.close()
    if not rt.is_main:
        return {}
    summary = summarize(rundir.read_metrics(run_dir), cfg)
    summary.update(run_costs, precision=runtime.precision_note(cfg.train.precision, device))  # the choice and why
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def costs(obfuscator: nn.Module, cfg: Config) -> dict:
    """What the client pays per image (MFLOPs, parameters) and what the store pays per item: the feature
    map's shape and bits (0: float features), and how and in how many bytes `veil obfuscate` stores it by
    default (float16 values, or a quantising obfuscator's integer codes: 1 byte each up to 8 bits), labels and ids aside."""
    c, h, w = feature_shape(obfuscator.in_channels, cfg.data.image_size, cfg.model.width, cfg.model.split, obfuscator.out_channels)
    stored = quantised_bits(obfuscator)  # 0 when noise follows the quantiser: the store then keeps floats
    return {"client": client_cost(obfuscator, cfg.data.image_size),
            "features": {"shape": [c, h, w], "bits": cfg.model.feature_bits, "stored_as": code_dtype(stored), "bytes_per_item": c * h * w * code_bytes(stored)}}


@contextlib.contextmanager
def _on_nonfinite(run_dir: Path, index: int, n_steps: int):  # noqa: ANN202
    """Say which step failed and which checkpoint is kept (nothing of the failed step is saved)."""
    try:
        yield
    except TrainingError as e:
        kept = rundir.latest_step_dir(run_dir)
        where = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint had been written yet"
        raise TrainingError(
            f"{e} (step {index + 1} of {n_steps}); training stopped and {where}. "
            f"Lower the learning rate or the defence's strength and train again"
        ) from None


def _format(r: dict) -> str:
    parts = [f"[{r['step'] + 1}] {r['phase']} r{r['round']} e{r['epoch']}"]
    for k in ("loss", "train_accuracy", "test_accuracy", "test_psnr"):
        if k in r:
            v = r[k]
            parts.append(f"{k} {v:.2%}" if "accuracy" in k else f"{k} {v:.3f}")
    parts.append(f"{r['seconds']:.1f}s")
    return "  ".join(parts)


def summarize(metrics: list[dict], cfg: Config) -> dict:
    """Headline numbers: accuracy and the training reconstructor's PSNR before and after."""

    def last(phase: str) -> dict:
        rows = [m for m in metrics if m["phase"] == phase]
        return rows[-1] if rows else {}

    final = metrics[-1] if metrics else {}
    pre, warm, refit = last(PRETRAIN), last(WARMUP), last(FINAL)
    return {
        "pretrain_test_accuracy": pre.get("test_accuracy"),
        "undefended_test_psnr": warm.get("test_psnr"),
        "final_test_accuracy": final.get("test_accuracy"),
        "final_test_psnr": refit.get("test_psnr", final.get("test_psnr")),
        "last_obfuscator_phase_test_psnr": last(PHASE_C).get("test_psnr"),
        "defence": cfg.train.defence,
        "strength": strength_of(cfg),
        "lambda_privacy": cfg.train.lambda_privacy,
        "reconstructor": cfg.model.reconstructor,
        "steps": len(metrics),
        "seconds": round(sum(m.get("seconds", 0) for m in metrics), 1),
        "seed": cfg.seed,
        "veil_version": __version__,
        "torch_version": torch.__version__,
    }
