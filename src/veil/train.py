"""Algorithm 1: one function per phase, and `train(cfg, run_dir)` calling them in order.

The plan of a run is a flat list of phase-epochs ("steps"):

    pretrain x pretrain_epochs            f+g on cross-entropy              (Algorithm 1, first pass)
    reconstructor_warmup x warmup_epochs  r on Eq. 3 against the undefended f
    then t_main rounds of
      obfuscator_classifier x t_sub       (a) f+g on Eq. 2, r frozen
      reconstructor x t_sub               (b) r on Eq. 3, f frozen
      obfuscator x t_sub                  (c) f on Eq. 2, g and r frozen
    reconstructor_final x warmup_epochs   r on Eq. 3 against the final f

Other defences (defences.py) replace each round by t_sub epochs of one phase named after the
defence (`nopeek`, `noise`); `none` has no rounds.

The warm-up is the paper's first pass of Algorithm 1 (pretraining is followed by reconstructor
training); it gives round 1's privacy term a trained attacker and gives the "before" PSNR.
The final refit lets r answer phase (c) of the last round: without it the "after" PSNR would
be measured right after f learnt to fool a fixed r, which flatters the defence.

Every step is seeded by (seed, step index) alone, so a resumed run draws the same batches and
augmentations as an uninterrupted one. A checkpoint is written after every step.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from veil import config as config_mod
from veil import rundir
from veil.config import Config, TrainConfig
from veil.data import ImageSet, Splits, batches, load_splits, to_float
from veil.io import atomic_write_json, atomic_write_text
from veil.metrics import psnr
from veil.models import build_networks

PRETRAIN, WARMUP = "pretrain", "reconstructor_warmup"
PHASE_A, PHASE_B, PHASE_C = "obfuscator_classifier", "reconstructor", "obfuscator"
FINAL = "reconstructor_final"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a run directory in the wrong state)."""


@dataclass(frozen=True)
class Step:
    phase: str
    round: int  # 0 for pretraining and warm-up, 1..t_main for the adversarial rounds
    epoch: int  # 1-based epoch within this phase of this round


def plan(t: TrainConfig) -> list[Step]:
    warmup = t.t_sub if t.warmup_epochs < 0 else t.warmup_epochs
    steps = [Step(PRETRAIN, 0, e + 1) for e in range(t.pretrain_epochs)]
    steps += [Step(WARMUP, 0, e + 1) for e in range(warmup)]
    rounds = 0 if t.defence == "none" else t.t_main
    phases = (PHASE_A, PHASE_B, PHASE_C) if t.defence == "adversarial" else (t.defence,)
    for k in range(1, rounds + 1):
        for phase in phases:
            steps += [Step(phase, k, e + 1) for e in range(t.t_sub)]
    if rounds:
        steps += [Step(FINAL, t.t_main, e + 1) for e in range(warmup)]
    return steps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' was asked for, but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


# ----------------------------------------------------------------------------- optimisers


def make_optimizer(params: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=0.9, nesterov=True)
    return torch.optim.Adam(params)


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


def set_lr(opt: torch.optim.Optimizer, peaks: list[float], factor: float) -> None:
    for group, peak in zip(opt.param_groups, peaks):
        group["lr"] = peak * factor


def freeze(module: nn.Module, frozen: bool) -> None:
    """Frozen = no gradients and eval mode (BatchNorm running statistics must not move either)."""
    module.requires_grad_(not frozen)
    module.train(not frozen)


# ----------------------------------------------------------------------------- phases


def _check_finite(value: torch.Tensor, phase: str, step: Step, batch: int) -> None:
    if not torch.isfinite(value):
        raise TrainingError(
            f"non-finite loss ({value.item()}) in phase '{phase}', round {step.round}, epoch {step.epoch}, batch {batch}; "
            f"the last good checkpoint is kept. Lower the learning rate or lambda and resume."
        )


def train_obfuscator_classifier(
    nets: dict[str, nn.Module], opt: torch.optim.Optimizer, data: ImageSet, natural: bool, cfg: Config,
    generator: torch.Generator, step: Step, lambda_privacy: float, lr_factor=None, bar=None,
) -> dict:
    """Pretraining (lambda = 0) and phase (a): f and g minimise CE + lambda * PSNR(I, r(f(I))) (Eq. 2)."""
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    freeze(f, False), freeze(g, False), freeze(r, True)
    use_r = lambda_privacy > 0
    t = cfg.train
    sums = torch.zeros(4)  # loss, ce, psnr, correct
    n = 0
    for i, (images, labels) in enumerate(batches(data, t.batch_size, generator, natural if cfg.data.augment else None)):
        if lr_factor is not None:
            set_lr(opt, [t.lr_obfuscator, t.lr_classifier], lr_factor(i))
        features = f(images)  # N x 128w x 8 x 8
        logits = g(features)
        ce = F.cross_entropy(logits, labels, label_smoothing=t.label_smoothing)
        p = psnr(images, r(features)).mean() if use_r else torch.zeros(())
        loss = ce + lambda_privacy * p  # Eq. 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _check_finite(loss.detach(), step.phase, step, i)
        b = len(labels)
        sums += torch.stack([loss.detach() * b, ce.detach() * b, p.detach() * b, (logits.argmax(1) == labels).sum()]).float().cpu()
        n += b
        if bar is not None:
            bar.update(1)
    out = {"loss": sums[0].item() / n, "ce": sums[1].item() / n, "train_accuracy": sums[3].item() / n}
    if use_r:
        out["train_psnr"] = sums[2].item() / n
    return out


def train_reconstructor(nets: dict[str, nn.Module], opt: torch.optim.Optimizer, data: ImageSet, natural: bool, cfg: Config, generator: torch.Generator, step: Step, bar=None) -> dict:
    """Phase (b) and the warm-up: r maximises PSNR(I, r(f(I))) with f frozen (Eq. 3)."""
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    freeze(f, True), freeze(g, True), freeze(r, False)
    total, n = torch.zeros(()), 0
    for i, (images, _) in enumerate(batches(data, cfg.train.batch_size, generator, natural if cfg.data.augment else None)):
        with torch.no_grad():
            features = f(images)
        p = psnr(images, r(features)).mean()
        loss = -p  # Eq. 3: maximise PSNR
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _check_finite(loss.detach(), step.phase, step, i)
        total += p.detach().cpu() * len(images)
        n += len(images)
        if bar is not None:
            bar.update(1)
    return {"loss": -total.item() / n, "train_psnr": total.item() / n}


def train_obfuscator(nets: dict[str, nn.Module], opt: torch.optim.Optimizer, data: ImageSet, natural: bool, cfg: Config, generator: torch.Generator, step: Step, bar=None) -> dict:
    """Phase (c): f minimises Eq. 2 with g and r frozen."""
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    freeze(f, False), freeze(g, True), freeze(r, True)
    lam = cfg.train.lambda_privacy
    sums, n = torch.zeros(4), 0
    for i, (images, labels) in enumerate(batches(data, cfg.train.batch_size, generator, natural if cfg.data.augment else None)):
        features = f(images)
        logits = g(features)
        ce = F.cross_entropy(logits, labels, label_smoothing=cfg.train.label_smoothing)
        p = psnr(images, r(features)).mean()
        loss = ce + lam * p  # Eq. 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _check_finite(loss.detach(), step.phase, step, i)
        b = len(labels)
        sums += torch.stack([loss.detach() * b, ce.detach() * b, p.detach() * b, (logits.argmax(1) == labels).sum()]).float().cpu()
        n += b
        if bar is not None:
            bar.update(1)
    return {"loss": sums[0].item() / n, "ce": sums[1].item() / n, "train_psnr": sums[2].item() / n, "train_accuracy": sums[3].item() / n}


@torch.no_grad()
def evaluate(nets: dict[str, nn.Module], data: ImageSet, batch_size: int, with_reconstructor: bool = True) -> dict:
    """Test accuracy of g(f(I)) and mean PSNR of r(f(I)) over a whole split, networks in eval mode."""
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    modes = {k: m.training for k, m in nets.items()}
    for m in nets.values():
        m.eval()
    correct, total_psnr = 0, 0.0
    for start in range(0, len(data), batch_size):
        images = to_float(data.images[start : start + batch_size])
        features = f(images)
        correct += (g(features).argmax(1) == data.labels[start : start + batch_size]).sum().item()
        if with_reconstructor:
            total_psnr += psnr(images, r(features)).sum().item()
    for k, m in nets.items():
        m.train(modes[k])
    out = {"test_accuracy": correct / len(data)}
    if with_reconstructor:
        out["test_psnr"] = total_psnr / len(data)
    return out


# ----------------------------------------------------------------------------- the run


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current phase-epoch is saved."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nveil: signal {signum} received; stopping after this phase-epoch is saved (send again to stop now)", flush=True)

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _progress(total: int, desc: str, enabled: bool):  # noqa: ANN202
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, log=print) -> dict:  # noqa: ANN001
    """Run Algorithm 1 into `run_dir` (or continue it) and return the summary."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise TrainingError(f"cannot resume: {run_dir} holds no config.yaml (not a Veil run directory)")
    elif (run_dir / "config.yaml").exists():
        raise TrainingError(f"{run_dir} already holds a run; resume it with `veil train --resume {run_dir}` or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))

    device = resolve_device(cfg.device)
    splits: Splits = load_splits(cfg.data, cfg.seed)
    defender, test = splits.defender.to(device), splits.test.to(device)
    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg.model, splits.channels, splits.num_classes, cfg.data.image_size, noise=cfg.train.defence == "noise")
    for net in nets.values():
        net.to(device)
    opts = make_optimizers(nets, cfg.train)
    steps = plan(cfg.train)
    info = {"noise": cfg.train.defence == "noise", "channels": splits.channels, "num_classes": splits.num_classes, "class_names": splits.defender.classes, "dataset": splits.name}

    done = 0
    if resume:
        step_dir = rundir.latest_step_dir(run_dir)
        if step_dir is not None:
            for name, net in nets.items():
                rundir.load_module(net, step_dir / f"{name}.safetensors")
            for name, opt in opts.items():
                rundir.optimizer_from_file(opt, step_dir / f"optim-{name}.safetensors")
            import json

            done = json.loads((step_dir / "info.json").read_text())["step"]
        rundir.truncate_metrics(run_dir, done)
        log(f"resuming {run_dir} after step {done} of {len(steps)}")

    log(
        f"veil train: {splits.name}, defender {len(defender)} / attacker {len(splits.attacker)} / test {len(test)} images, "
        f"width {cfg.model.width}, reconstructor {cfg.model.reconstructor}, lambda {cfg.train.lambda_privacy}, device {device}"
    )
    steps_per_epoch = max(1, len(defender) // cfg.train.batch_size) if len(defender) > cfg.train.batch_size else 1
    n_pretrain = sum(s.phase == PRETRAIN for s in steps)
    with _StopFlag() as stop:
        for index in range(done, len(steps)):
            step = steps[index]
            # Seed by step index alone: a resumed run sees the same batches as an uninterrupted one.
            torch.manual_seed(cfg.seed * 1_000_003 + index)
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + index)
            desc = f"{step.phase} r{step.round} e{step.epoch}"
            start = time.perf_counter()
            with _progress(steps_per_epoch, desc, cfg.progress) as bar:
                if step.phase == PRETRAIN:
                    lr_factor = None
                    if cfg.train.pretrain_schedule == "onecycle":
                        offset, total = (step.epoch - 1) * steps_per_epoch, n_pretrain * steps_per_epoch

                        def lr_factor(i: int, offset=offset, total=total) -> float:
                            return onecycle_factor(offset + i, total)

                    record = train_obfuscator_classifier(nets, opts[PRETRAIN], defender, splits.natural, cfg, generator, step, 0.0, lr_factor, bar)
                elif step.phase in ("nopeek", "noise"):
                    from veil.defences import defence_epoch, set_noise

                    set_noise(nets["obfuscator"], cfg.train.noise_sigma)
                    data_iter = batches(defender, cfg.train.batch_size, generator, splits.natural if cfg.data.augment else None)
                    record = defence_epoch(nets, opts[PHASE_A], data_iter, cfg, lambda v, i, s=step: _check_finite(v, s.phase, s, i), bar)
                elif step.phase == PHASE_A:
                    record = train_obfuscator_classifier(nets, opts[PHASE_A], defender, splits.natural, cfg, generator, step, cfg.train.lambda_privacy, None, bar)
                elif step.phase in (WARMUP, PHASE_B, FINAL):
                    record = train_reconstructor(nets, opts[PHASE_B], defender, splits.natural, cfg, generator, step, bar)
                else:
                    record = train_obfuscator(nets, opts[PHASE_C], defender, splits.natural, cfg, generator, step, bar)
            record.update(evaluate(nets, test, cfg.train.eval_batch_size, with_reconstructor=step.phase != PRETRAIN))
            record = {"step": index, "phase": step.phase, "round": step.round, "epoch": step.epoch, **record, "seconds": round(time.perf_counter() - start, 3)}
            rundir.append_metrics(run_dir, record)
            if step.phase == PRETRAIN and (index + 1 == len(steps) or steps[index + 1].phase != PRETRAIN):
                rundir.save_undefended(run_dir, nets["obfuscator"], nets["classifier"])
            rundir.save_checkpoint(run_dir, index + 1, nets, opts, info)
            log(_format(record))
            if stop.requested and index + 1 < len(steps):
                log(f"stopped after step {index + 1} of {len(steps)}; continue with `veil train --resume {run_dir}`")
                return {}
    summary = summarize(rundir.read_metrics(run_dir), cfg)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


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
    from veil import __version__

    return {
        "pretrain_test_accuracy": pre.get("test_accuracy"),
        "undefended_test_psnr": warm.get("test_psnr"),
        "final_test_accuracy": final.get("test_accuracy"),
        "final_test_psnr": refit.get("test_psnr", final.get("test_psnr")),
        "last_obfuscator_phase_test_psnr": last(PHASE_C).get("test_psnr"),
        "defence": cfg.train.defence,
        "strength": {"adversarial": cfg.train.lambda_privacy, "nopeek": cfg.train.nopeek_alpha, "noise": cfg.train.noise_sigma, "none": 0.0}[cfg.train.defence],
        "lambda_privacy": cfg.train.lambda_privacy,
        "reconstructor": cfg.model.reconstructor,
        "steps": len(metrics),
        "seconds": round(sum(m.get("seconds", 0) for m in metrics), 1),
        "seed": cfg.seed,
        "veil_version": __version__,
        "torch_version": torch.__version__,
    }
