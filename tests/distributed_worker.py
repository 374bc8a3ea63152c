"""Run by torchrun from tests/test_distributed.py (not a test module itself).

    distributed_worker.py batchnorm OUT.safetensors    GlobalBatchNorm2d over the processes
    distributed_worker.py crash N -- ARGS...           `veil ARGS` with process 0 killed after N checkpoints
"""

import sys

import torch
import torch.distributed as dist


def batchnorm(out: str) -> None:
    """Each process normalises its half of one batch; process 0 saves outputs and gradients of both."""
    from veil.distributed import GlobalBatchNorm2d
    from veil.io import save_tensors

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 1  # the whole batch, identical in every process
    weights = torch.randn(8, 3, 4, 4)  # loss = sum(weights * y): a gradient that differs per element
    bn = GlobalBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    xp = x[part].clone().requires_grad_(True)
    y = bn(xp)
    (weights[part] * y).sum().backward()
    parts = {"y": y.detach(), "grad_x": xp.grad}
    gathered = {k: [torch.empty_like(v) for _ in range(world)] for k, v in parts.items()}
    for k, v in parts.items():
        dist.all_gather(gathered[k], v.contiguous())
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)  # the sum of every process's parameter gradient (DDP would average it)
    if rank == 0:
        save_tensors(out, {**{k: torch.cat(v) for k, v in gathered.items()}, "grad_wb": grads, "running_mean": bn.running_mean, "running_var": bn.running_var})
    dist.barrier()  # as veil.distributed.leave: no process tears down while another still works
    dist.destroy_process_group()


def crash(after: int, argv: list[str]) -> int:
    """`veil argv`, with process 0 dying right after its `after`-th checkpoint, as a kill would."""
    import os

    from veil import cli, rundir

    real = rundir.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):  # noqa: ANN002, ANN003
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == after:
            os._exit(3)

    rundir.save_checkpoint = save_then_die
    return cli.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "batchnorm":
        batchnorm(sys.argv[2])
    else:
        sys.exit(crash(int(sys.argv[2]), sys.argv[4:]))
