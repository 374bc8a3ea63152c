"""The processes of a multi-process run, as torchrun starts them: joining, agreeing, BatchNorm.

`torchrun --nproc_per_node=N -m veil train ...` starts N copies of `veil train` with RANK,
WORLD_SIZE and LOCAL_RANK set; each joins the process group here (gloo on CPU, NCCL on CUDA).
Outside torchrun every function is a no-op, so single-process code calls them unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from veil.config import ConfigError


def process_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them): {e}") from None


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def join(device: torch.device) -> bool:
    """Join the torchrun job (NCCL for CUDA, gloo for CPU). True if this call started the process group."""
    if process_env()[1] <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def leave(started: bool, finished: bool) -> None:
    """Leave the process group that join() started.

    After a finish every process reached (the end, or a stop they agreed on), each first waits for
    the others: a gloo process that tears its connections down while a peer still works (process 0
    writing the summary) can abort at exit. After an error in one process the others may be blocked
    in a collective that never completes, so nothing waits: torchrun ends them.
    """
    if started and finished and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over the processes (in place); the tensor itself in a single process."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def any_process(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true in any process, so that all of them take the same branch."""
    if not active():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


# ----------------------------------------------------------------------------- BatchNorm across processes


class _GlobalBatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation with statistics over every process's images (output float32).

    Forward: mean and (biased) variance of the global batch from all-reduced sums (two passes,
    for accuracy). Backward: the standard BatchNorm gradient with its two sums all-reduced, which
    is the gradient of the sum of every process's loss; DDP's averaging then gives one process's
    gradient of the global-batch loss.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):  # noqa: ANN001, ANN205
        dims = [0, 2, 3]
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device)
        total = all_reduce_sum(torch.cat([count, xf.sum(dims)]))
        n, mean = total[0], total[1:] / total[0]
        centred = xf - mean[None, :, None, None]
        var = all_reduce_sum(centred.pow(2).sum(dims)) / n
        invstd = (var + eps).rsqrt()
        xhat = centred * invstd[None, :, None, None]
        ctx.save_for_backward(xhat, weight, invstd, n)
        ctx.dtype = x.dtype
        ctx.mark_non_differentiable(mean, var, n)
        return xhat * weight[None, :, None, None] + bias[None, :, None, None], mean, var, n

    @staticmethod
    def backward(ctx, grad_out, _mean, _var, _n):  # noqa: ANN001, ANN205
        xhat, weight, invstd, n = ctx.saved_tensors
        dims = [0, 2, 3]
        dy = grad_out.float()
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
        grad_bias, grad_weight = local.split(len(invstd))
        sum_dy, sum_dy_xhat = all_reduce_sum(local.clone()).split(len(invstd))
        grad_x = (dy - (sum_dy / n)[None, :, None, None] - xhat * (sum_dy_xhat / n)[None, :, None, None]) * (weight * invstd)[None, :, None, None]
        return grad_x.to(ctx.dtype), grad_weight, grad_bias, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every process (for gloo, where PyTorch's
    SyncBatchNorm does not run). Same parameters and buffers as BatchNorm2d; outside a
    process group, or in eval mode, it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        y, mean, var, n = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():  # running statistics as BatchNorm2d keeps them: unbiased variance, momentum
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean, factor)
            self.running_var.lerp_(var * n / (n - 1).clamp_min(1), factor)
        return y


def global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `module` with statistics over all processes: SyncBatchNorm on CUDA,
    GlobalBatchNorm2d elsewhere. Parameters and buffers keep their identity."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var, new.num_batches_tracked = child.running_mean, child.running_var, child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            global_batchnorm(child, device)
    return module
