"""The attack's scoring, timed against the textbook forms it replaced, on one reduced-CIFAR-10-sized
set: 2,000 users' images, 100 candidates each, reconstructions = image + noise (and a constant image,
the floor's kind, for the rank check). Prints seconds and checks that both forms agree.

    python benchmarks/scoring.py [--users 2000] [--candidates 100] [--threads N]

SSIM: veil.metrics.ssim blurs with the separable Gaussian window as two matrix products; the direct
form is a grouped float64 convolution with the 11 x 11 window. Re-identification: veil.metrics.reid_ranks
orders candidates by |c|^2 - 2 c.r (one matrix product per chunk, each pool image standardised once);
the direct form gathers every candidate set and takes the mean squared difference.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from veil.metrics import _gaussian_window, draw_candidates, reid_ranks, ssim, standardised


def direct_ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    x, y = original.double(), reconstruction.double()
    c = x.shape[1]
    g = _gaussian_window(11, 1.5).double()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    num = (2 * mu_x * mu_y + 0.01**2) * (2 * (blur(x * y) - mu_x * mu_y) + 0.03**2)
    den = (mu_x**2 + mu_y**2 + 0.01**2) * (blur(x * x) - mu_x**2 + blur(y * y) - mu_y**2 + 0.03**2)
    return (num / den).flatten(1).mean(1).float()


def direct_reid(reconstructions: torch.Tensor, pool: torch.Tensor, candidates: torch.Tensor, standardise: bool = False) -> torch.Tensor:
    ranks = []
    for start in range(0, len(candidates), 16):
        rec, cand = reconstructions[start : start + 16].double(), pool[candidates[start : start + 16]].double()
        if standardise:
            rec, cand = standardised(rec), standardised(cand)
        dist = (cand.flatten(2) - rec.flatten(1)[:, None]).pow(2).mean(2)
        ranks.append(1 + (dist[:, 1:] <= dist[:, :1]).sum(1))
    return torch.cat(ranks)


def timed(fn) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    users = torch.rand(args.users, 3, 32, 32)
    rebuilt = (users + 0.3 * torch.randn_like(users)).clamp(0, 1)
    constant = users.mean(0, keepdim=True).expand_as(users)
    cands = draw_candidates(torch.arange(args.users), args.users, args.candidates, torch.Generator().manual_seed(0))
    print(f"{args.users} users, {args.candidates} candidates, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':26s} {'direct s':>9s} {'veil s':>9s} {'speed-up':>9s}  agree")
    rows = [("ssim", lambda: direct_ssim(users, rebuilt), lambda: ssim(users, rebuilt))]
    for std in (False, True):
        for what, rec in (("noisy", rebuilt), ("constant", constant)):
            rows.append((f"reid {'standardised' if std else 'pixels'} {what}",
                         lambda rec=rec, std=std: direct_reid(rec, users, cands, std), lambda rec=rec, std=std: reid_ranks(rec, users, cands, standardise=std)))
    for name, direct, fast in rows:
        t_direct, a = timed(direct)
        t_fast, b = timed(fast)
        agree = torch.equal(a, b) if a.dtype == torch.long else f"max diff {(a - b).abs().max().item():.1e}"
        print(f"{name:26s} {t_direct:9.3f} {t_fast:9.3f} {t_direct / t_fast:8.1f}x  {agree}", flush=True)


if __name__ == "__main__":
    main()
