"""`veil bench`: images per second of every phase of Algorithm 1, beside a bare PyTorch loop.

For one config (width, batch size, device, precision, layout, compile) each phase is timed twice
in the same process and threads, on the same networks and synthetic images:

    veil   Veil's own phase function (train.py) on a synthetic uint8 ImageSet on the device:
           shuffling, batch augmentation, metric sums, the end-of-epoch sync, all included
    bare   the same forward, loss, backward and optimiser step written as a plain loop over
           one pre-made float batch: the practical limit of this hardware for this model

ratio = veil / bare; 1.0 means Veil adds nothing. Each figure is the median of `repeats` timed
passes of `batches` batches, after `warmup` untimed passes (compilation happens there); the two
loops alternate so that a load change on a shared machine hits both alike. Model FLOP/s come from
torch.utils.flop_counter on one bare step of the uncompiled networks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from veil import runtime as runtime_mod
from veil.config import Config, ConfigError
from veil.data import ImageSet, to_float
from veil.defences.adversarial import reconstruction_psnr
from veil.models import build_networks
from veil.runtime import Runtime, feature_maps, prepare_networks, resolve, resolve_device, wrap_networks
from veil.train import (
    PHASE_A,
    PHASE_B,
    PHASE_C,
    PRETRAIN,
    Privacy,
    Step,
    evaluate,
    freeze,
    make_optimizers,
    pretrain_lr_factor,
    train_obfuscator_classifier,
    train_reconstructor,
)

PHASES = ("pretrain", "obfuscator_classifier", "reconstructor", "obfuscator", "evaluate", "obfuscate")
SHAPES = {"mnist": (1, 10), "fashion-mnist": (1, 10), "cifar10": (3, 10), "cifar100": (3, 100)}  # channels, classes


@dataclass
class Phase:
    veil: Callable[[], object]  # one pass through Veil's phase function
    bare: Callable[[], object]  # the same work as a plain loop
    images: int  # images per pass
    flop_per_image: float  # model FLOPs per image (forward, and backward where it trains)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_psnr(images: torch.Tensor, rebuilt: torch.Tensor) -> torch.Tensor:
    return -10 * (images.float() - rebuilt.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10).log10()  # Eq. 1


def build_phases(cfg: Config, rt: Runtime, n_batches: int) -> dict[str, Phase]:
    """Networks, optimisers and synthetic data for `cfg`, and the two timed callables of each phase."""
    channels, classes = SHAPES.get(cfg.data.dataset, (3, 10))
    size, b, eb = cfg.data.image_size, cfg.train.batch_size, cfg.train.eval_batch_size
    n = n_batches * b
    dev = rt.device
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    data = ImageSet(
        torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, device=dev, generator=gen),
        torch.randint(0, classes, (n,), device=dev, generator=gen),
        [str(i) for i in range(classes)],
    )
    x = to_float(data.images[:b], rt.memory_format)  # the bare loops' one pre-made batch
    y = data.labels[:b]
    x_eval, y_eval = to_float(data.images[:eb], rt.memory_format), data.labels[:eb]
    eval_sizes = [min(eb, n - s) for s in range(0, n, eb)]

    torch.manual_seed(cfg.seed)
    nets = build_networks(cfg.model, channels, classes, size)
    prepare_networks(nets, rt)
    opts = make_optimizers(nets, cfg.train)
    f, g, r = nets["obfuscator"], nets["classifier"], nets["reconstructor"]
    lam = cfg.train.lambda_privacy or 1.0
    eq2 = Privacy(lam, reconstruction_psnr, "train_psnr")  # Veil's phases (a) and (c) at the bare loops' lambda
    smooth = cfg.train.label_smoothing
    t = cfg.train

    def modes(trained: tuple[nn.Module, ...]) -> None:
        for m in (f, g, r):
            freeze(m, m not in trained)

    def step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # --- one bare batch of each phase
    def pretrain_batch() -> None:
        with rt.autocast():
            loss = F.cross_entropy(g(f(x)), y, label_smoothing=smooth)
        step(opts[PRETRAIN], loss)

    def phase_a_batch() -> None:
        with rt.autocast():
            z = f(x)
            loss = F.cross_entropy(g(z), y, label_smoothing=smooth) + lam * _bare_psnr(x, r(z)).mean()  # Eq. 2
        step(opts[PHASE_A], loss)

    def reconstructor_batch() -> None:
        with rt.autocast():
            with torch.no_grad():
                z = f(x)
            loss = -_bare_psnr(x, r(z)).mean()  # Eq. 3
        step(opts[PHASE_B], loss)

    def obfuscator_batch() -> None:
        with rt.autocast():
            z = f(x)
            loss = F.cross_entropy(g(z), y, label_smoothing=smooth) + lam * _bare_psnr(x, r(z)).mean()
        step(opts[PHASE_C], loss)

    @torch.no_grad()
    def evaluate_batch(k: int = eb) -> torch.Tensor:
        with rt.autocast():
            z = f(x_eval[:k])
            return torch.stack([(g(z).argmax(1) == y_eval[:k]).sum().float(), _bare_psnr(x_eval[:k], r(z)).sum()])

    @torch.no_grad()
    def obfuscate_batch(k: int = eb) -> None:
        with rt.autocast():
            f(x_eval[:k]).float()

    def bare(batch: Callable[[], object], trained: tuple[nn.Module, ...]) -> Callable[[], None]:
        def run() -> None:
            modes(trained)
            for _ in range(n_batches):
                batch()
            _sync(dev)

        return run

    def bare_eval(batch: Callable[[int], object]) -> Callable[[], None]:
        def run() -> None:
            modes(())
            for k in eval_sizes:
                batch(k)
            _sync(dev)

        return run

    def once(batch: Callable[[], object], trained: tuple[nn.Module, ...]) -> Callable[[], object]:
        def run() -> object:
            modes(trained)
            return batch()

        return run

    def veil(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            _sync(dev)

        return run

    nat = channels == 3

    def g_(seed: int) -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(seed)

    lr_factor = pretrain_lr_factor(t.pretrain_schedule, 1, 1, n_batches)
    phases = {
        "pretrain": Phase(
            veil(lambda: train_obfuscator_classifier(nets, opts[PRETRAIN], data, nat, cfg, g_(1), Step(PRETRAIN, 0, 1), None, lr_factor, None, rt)),
            bare(pretrain_batch, (f, g)), n, count_flops(once(pretrain_batch, (f, g))) / b,
        ),
        "obfuscator_classifier": Phase(
            veil(lambda: train_obfuscator_classifier(nets, opts[PHASE_A], data, nat, cfg, g_(2), Step(PHASE_A, 1, 1), eq2, None, None, rt)),
            bare(phase_a_batch, (f, g)), n, count_flops(once(phase_a_batch, (f, g))) / b,
        ),
        "reconstructor": Phase(
            veil(lambda: train_reconstructor(nets, opts[PHASE_B], data, nat, cfg, g_(3), Step(PHASE_B, 1, 1), None, rt)),
            bare(reconstructor_batch, (r,)), n, count_flops(once(reconstructor_batch, (r,))) / b,
        ),
        "obfuscator": Phase(
            veil(lambda: train_obfuscator_classifier(nets, opts[PHASE_C], data, nat, cfg, g_(4), Step(PHASE_C, 1, 1), eq2, None, None, rt, with_classifier=False)),
            bare(obfuscator_batch, (f,)), n, count_flops(once(obfuscator_batch, (f,))) / b,
        ),
        "evaluate": Phase(veil(lambda: evaluate(nets, data, eb, True, rt)), bare_eval(evaluate_batch), n, count_flops(once(evaluate_batch, ())) / len(x_eval)),
        "obfuscate": Phase(veil(lambda: feature_maps(f, data.images, eb, rt)), bare_eval(obfuscate_batch), n, count_flops(once(obfuscate_batch, ())) / len(x_eval)),
    }
    wrap_networks(nets, rt)  # compile only now: the FLOP counter above ran on the plain networks
    return phases


def count_flops(batch: Callable[[], object]) -> int:
    """FLOPs of one batch (forward, and backward where it trains), from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        batch()
    return counter.get_total_flops()


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _process_peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def bench(
    cfg: Config, n_batches: int = 8, repeats: int = 5, warmup: int = 1, phases: tuple[str, ...] = PHASES, progress: bool = True, threads: int = 0,
) -> dict:
    """Time each phase through Veil and through the bare loop; return the figures as a dict.

    On CPU the ratio is also given in process CPU time (`cpu_ratio`), which other processes on a
    shared machine disturb far less than wall time (with one thread; more threads spin-wait).
    """
    from tqdm.auto import tqdm

    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ConfigError(f"bench: unknown phase(s) {', '.join(unknown)}; valid: {', '.join(PHASES)}")
    if min(n_batches, repeats) < 1 or warmup < 0:
        raise ConfigError(f"bench: batches and repeats must be >= 1 and warmup >= 0, got {n_batches}, {repeats}, {warmup}")

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    rt = resolve(cfg, device)
    rt.world_size, rt.rank = 1, 0  # one process: bench measures the single-device path
    built = build_phases(cfg, rt, n_batches)
    results = {}
    bar = tqdm(total=len(phases) * (warmup + repeats), desc="veil bench", leave=False, disable=not progress, dynamic_ncols=True)
    for name in phases:
        phase = built[name]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            phase.veil(), phase.bare()
            bar.update(1)
        wall: dict[str, list[float]] = {"veil": [], "bare": []}
        cpu: dict[str, list[float]] = {"veil": [], "bare": []}
        for k in range(repeats):
            # Alternate which loop goes first, so a load change on a shared machine hits both alike.
            for which in (("veil", "bare") if k % 2 == 0 else ("bare", "veil")):
                start, start_cpu = time.perf_counter(), time.process_time()
                (phase.veil if which == "veil" else phase.bare)()
                wall[which].append(time.perf_counter() - start)
                cpu[which].append(time.process_time() - start_cpu)
            bar.update(1)
        veil_ips, bare_ips = phase.images / statistics.median(wall["veil"]), phase.images / statistics.median(wall["bare"])
        results[name] = {
            "images_per_s": veil_ips,
            "bare_images_per_s": bare_ips,
            "ratio": veil_ips / bare_ips,
            "cpu_ratio": statistics.median(cpu["bare"]) / statistics.median(cpu["veil"]) if device.type == "cpu" else None,
            "bare_images_per_cpu_s": phase.images / statistics.median(cpu["bare"]) if device.type == "cpu" else None,
            "flop_per_image": phase.flop_per_image,
            "flop_per_s": phase.flop_per_image * veil_ips,
            "peak_memory_mb": _peak_memory_mb(device),
        }
    bar.close()
    peak = cpu_peak(rt.precision, torch.get_num_threads()) if device.type == "cpu" else {"gflops": None, "how": "", "model": ""}
    for p in results.values():
        p["share_of_peak"] = p["flop_per_s"] / (peak["gflops"] * 1e9) if peak["gflops"] else None
    return {
        "phases": results,
        "cpu_peak": peak,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "width": cfg.model.width,
        "reconstructor": cfg.model.reconstructor,
        "batch_size": cfg.train.batch_size,
        "eval_batch_size": cfg.train.eval_batch_size,
        "batches": n_batches,
        "repeats": repeats,
        "warmup": warmup,
        "precision": rt.precision,
        "channels_last": rt.channels_last,
        "compile": rt.compile,
        "peak_rss_mb": _process_peak_rss_mb(),
    }


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if k.strip()}


def _clock_ghz(info: dict[str, str]) -> float | None:
    """The highest clock the kernel reports (cpufreq's maximum, else /proc/cpuinfo's 'cpu MHz')."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        pass
    try:
        return float(info["cpu MHz"]) / 1e3
    except (KeyError, ValueError):
        return None


def cpu_peak(precision: str, threads: int) -> dict:
    """The CPU's peak matrix-product GFLOP/s on `threads` cores at `precision`, and how it was computed:
    cores x clock x FLOPs per cycle per core, the last from the units PyTorch finds. Assumed: two FMA pipes per
    core (2 x lanes x 2 FLOPs); 16 fp32 lanes with AVX-512, 8 with AVX2, 4 otherwise; AMD family 25 (Zen 3 and 4)
    runs a 512-bit FMA as two 256-bit halves, so 8 lanes; bf16 doubles the rate with AVX-512 BF16 (a dot product
    of bf16 pairs per fp32 lane) and is 1,024 FLOPs per cycle per core on AMX tiles (Intel's figure). The clock is the
    one the kernel reports, on a virtual machine often the base clock: a share above 100% means the chip ran faster."""
    info = _cpuinfo()
    ghz = _clock_ghz(info)
    avx512, avx2 = runtime_mod._cpu_check("avx512"), runtime_mod._cpu_check("avx2")
    lanes = 16 if avx512 else 8 if avx2 else 4
    zen34 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    if zen34 and avx512:
        lanes = 8
    per_cycle, unit = 2 * lanes * 2, "AVX-512" if avx512 else "AVX2" if avx2 else "SSE"
    if precision == "bf16":
        bf16 = runtime_mod.native_bf16()
        per_cycle, unit = (1024, "AMX") if bf16 == "AMX" else (2 * per_cycle, "AVX-512 BF16") if bf16 else (per_cycle, f"{unit}, no native bf16")
    how = (f"{threads} cores x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle ({unit}{', Zen 3/4 halves' if zen34 and avx512 and unit != 'AMX' else ''})"
           if ghz else "clock unknown")
    return {"gflops": threads * ghz * per_cycle if ghz else None, "how": how, "model": info.get("model name", "")}


def format_table(result: dict) -> str:
    """The bench result as a plain-text table."""
    lines = [
        f"veil bench: {result['device']}, {result['threads']} threads, torch {result['torch_version']}, width {result['width']}, "
        f"batch {result['batch_size']} (eval {result['eval_batch_size']}), {result['precision']}"
        f"{', channels_last' if result['channels_last'] else ''}{', compiled' if result['compile'] else ''}; "
        f"median of {result['repeats']} x {result['batches']} batches",
        f"{'phase':<22} {'veil img/s':>11} {'bare img/s':>11} {'ratio':>6} {'CPU-time ratio':>15} {'GFLOP/s':>9} {'% of peak':>9} {'peak MiB':>9}",
    ]
    for name, p in result["phases"].items():
        mem = "" if p["peak_memory_mb"] is None else f"{p['peak_memory_mb']:.0f}"
        cpu = "" if p.get("cpu_ratio") is None else f"{p['cpu_ratio']:.2f}"
        share = "" if p.get("share_of_peak") is None else f"{100 * p['share_of_peak']:.1f}%"
        lines.append(
            f"{name:<22} {p['images_per_s']:>11.1f} {p['bare_images_per_s']:>11.1f} {p['ratio']:>6.2f} {cpu:>15} {p['flop_per_s'] / 1e9:>9.1f} {share:>9} {mem:>9}"
        )
    peak = result.get("cpu_peak") or {}
    if peak.get("gflops"):
        lines.append(f"CPU peak {peak['gflops']:.0f} GFLOP/s at {result['precision']}: {peak['how']}; {peak['model']}")
    lines.append(f"process peak resident memory: {result['peak_rss_mb']:.0f} MiB")
    return "\n".join(lines)
