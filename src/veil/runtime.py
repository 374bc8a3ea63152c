"""How the networks run: device, precision, memory layout, compilation, and the processes of a
multi-process run. Resolved once from the config into a `Runtime` that every phase function takes.

    precision      fp32, or bf16 autocast: convolutions and linear layers in bfloat16; weights,
                   BatchNorm (statistics, affine parameters) and the losses stay float32
    channels_last  NHWC layout of weights and activations (faster convolutions on GPUs and on CPUs:
                   1.2-1.9x per phase on a 2-core x86-64 CPU, docs/benchmarks.md); the attack harness and the
                   store classifier use it too (veil.runtime.memory_format)
    compile        torch.compile each network (nn.Module.compile: state_dict keys unchanged)
    processes      under torchrun: one process per device, each network in its own
                   DistributedDataParallel wrapper (gloo on CPU, NCCL on CUDA)

Every option can be switched off, and the result is the same within floating-point tolerance
(bf16 within bf16's ~3 significant digits). tests/test_runtime.py checks this on CPU.

Multi-process runs: `torchrun --nproc_per_node=N -m veil train ...` (or `veil train --nproc N`).
`train.batch_size` stays the global batch; each process takes a disjoint 1/N slice of every
batch of the same epoch permutation, so N processes see exactly the batches one process sees.
Gradients are averaged across processes by DDP. Only the networks a phase trains go through their
DDP wrapper; frozen ones are called directly (no gradient, nothing to synchronise). BatchNorm:
with train.sync_batchnorm (the default) training statistics are over the global batch, so N
processes compute what one process computes (SyncBatchNorm on CUDA; on CPU, where PyTorch has
none, distributed.GlobalBatchNorm2d). With it off each process normalises with its own slice's
statistics (faster on many GPUs) and DDP copies process 0's running statistics to the others.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from veil.config import Config
from veil.data import to_float
from veil.distributed import global_batchnorm, process_env
from veil.errors import TrainingError
from veil.models.reconstructors import use_layout

ON, OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile: bool = False
    rank: int = 0  # this process's index in a torchrun job
    world_size: int = 1  # number of processes
    replicas: dict[str, nn.Module] = field(default_factory=dict)  # DDP wrapper of each network, by name

    @property
    def is_main(self) -> bool:
        """Process 0 writes files, logs and shows progress; the others only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the forward passes; a no-op at fp32."""
        return autocast(self.precision, self.device)

    def replica(self, nets: dict[str, nn.Module], name: str) -> nn.Module:
        """The network as a phase trains it: its DDP wrapper in a multi-process run, else itself."""
        return self.replicas.get(name, nets[name])


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for a resolved precision of 'bf16'; a no-op at 'fp32'. The attack's learned
    attackers and the store classifier run under it too (their own precision settings)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- resolving options


def _cpu_check(name: str) -> bool:
    """One of PyTorch's own CPU feature checks (torch.cpu._is_*_supported); False where this PyTorch lacks it."""
    check = getattr(torch.cpu, f"_is_{name}_supported", None)
    return bool(check()) if check is not None else False


def native_bf16() -> str:
    """The unit this CPU multiplies bf16 matrices with, asked of PyTorch (not assumed from the model name):
    'AMX' (Intel's tile unit), 'AVX-512 BF16' (bf16 dot products in the vector unit), or '' for none."""
    return "AMX" if _cpu_check("amx_tile") else "AVX-512 BF16" if _cpu_check("avx512_bf16") else ""


def resolve_precision(value: str, device: torch.device) -> str:
    """auto -> bf16 on a CUDA device that supports it, else fp32. On a CPU auto stays fp32 even where the CPU has
    native bf16 (native_bf16()): there bf16 trains the private configuration 1.44x faster with its figures inside the
    fp32 seed range at three seeds, but at the paper's cut (lambda 1) bf16 training moved them at three seeds: the
    strongest attacker 0.56 dB stronger on average, above the fp32 range, and accuracy 2.35 points lower; the attack's
    own precision moved it by -0.26 to +0.22 dB (docs/benchmarks.md). train.precision=bf16 asks for it."""
    if value == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return value


def precision_note(value: str, device: torch.device, key: str = "train.precision=bf16") -> str:
    """Why resolve_precision chose what it chose, for the log and summary.json / attack.json; `key` is how to ask for bf16."""
    chosen = resolve_precision(value, device)
    if value != "auto":
        return f"{chosen} (asked for)"
    if device.type == "cuda":
        return f"{chosen} (auto: {'the GPU supports bf16' if chosen == 'bf16' else 'no bf16 on this GPU'})"
    unit = native_bf16()
    return f"{chosen} (auto on a CPU; " + (f"it has {unit}, bf16 is opt-in: {key})" if unit else "no native bf16 unit)")


def resolve_channels_last(value: str, device: torch.device) -> bool:
    """auto -> on for CUDA and CPU: NHWC measured 1.2-1.9x faster than NCHW per phase on a 2-core
    x86-64 CPU, with AVX-512 and capped at AVX2 alike (docs/benchmarks.md)."""
    value = str(value).lower()
    if value == "auto":
        return device.type in ("cuda", "cpu")
    return value in ON


def memory_format(value: str, device: torch.device) -> torch.memory_format:
    """The layout for a channels_last setting (auto | on | off) on `device`: the same rule for the
    attack harness and the store classifier as for training."""
    return torch.channels_last if resolve_channels_last(value, device) else torch.contiguous_format


def resolve(cfg: Config, device: torch.device) -> Runtime:
    """The Runtime of this process: options resolved for `device`, rank and size from torchrun's environment."""
    rank, world_size, local_rank = process_env()
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one process per GPU
    t = cfg.train
    return Runtime(
        device=device,
        precision=resolve_precision(t.precision, device),
        channels_last=resolve_channels_last(t.channels_last, device),
        compile=t.compile,
        rank=rank,
        world_size=world_size,
    )


# ----------------------------------------------------------------------------- networks


def prepare_networks(nets: dict[str, nn.Module], rt: Runtime, sync_batchnorm: bool = True) -> None:
    """Move the networks to the device and layout, in place; global-batch BatchNorm in a multi-process run.

    Call before building optimisers (parameters keep their identity either way). `wrap_networks`
    comes after a checkpoint is loaded, since DDP copies process 0's weights to every process.
    """
    for name, net in nets.items():
        net.to(rt.device)
        if rt.distributed and sync_batchnorm:
            nets[name] = net = global_batchnorm(net, rt.device)
        use_layout(net, rt.memory_format)


def wrap_networks(nets: dict[str, nn.Module], rt: Runtime) -> None:
    """torch.compile each network in place, then give each its own DDP wrapper in a multi-process run.

    Each network gets its own wrapper because the phases train different subsets of them
    (Algorithm 1): a phase runs its trained networks through their wrappers, so every parameter
    of a wrapper gets a gradient in every backward (no find_unused_parameters needed).
    """
    for name, net in nets.items():
        if rt.compile:
            net.compile()
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [rt.device.index] if rt.device.type == "cuda" else None
            rt.replicas[name] = DistributedDataParallel(net, device_ids=ids)


# ----------------------------------------------------------------------------- running f (training, the attack and the store share it)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' was asked for, but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


@torch.no_grad()
def feature_maps(obfuscator: nn.Module, images: torch.Tensor, batch_size: int, rt: Runtime | None = None) -> torch.Tensor:
    """f(I) for uint8 images N x C x H x W, batch by batch in eval mode: N x 128w x H/4 x W/4 float32."""
    rt = rt or Runtime(images.device)
    mode = obfuscator.training
    obfuscator.eval()
    out = []
    for start in range(0, len(images), batch_size):
        with rt.autocast():
            out.append(obfuscator(to_float(images[start : start + batch_size], rt.memory_format)).float())
    obfuscator.train(mode)
    return torch.cat(out).contiguous()


@torch.no_grad()
def read_logits(obfuscator: nn.Module, classifier: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The logits g(f(image)) of every uint8 image, batch by batch in eval mode: N x classes float32 (what a logits store keeps)."""
    features = feature_maps(obfuscator, images, batch_size)
    mode = classifier.training
    classifier.eval()
    out = torch.cat([classifier(features[i : i + batch_size]).float() for i in range(0, len(features), batch_size)])
    classifier.train(mode)
    return out


def read_classes(obfuscator: nn.Module, classifier: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The class g(f(image)) of every uint8 image (what a label store keeps)."""
    return read_logits(obfuscator, classifier, images, batch_size).argmax(1)
