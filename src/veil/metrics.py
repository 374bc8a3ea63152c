"""Metrics on images in [0, 1]: tensors in, numbers (or per-image tensors) out."""

from __future__ import annotations

import torch

# Eq. 1 divides by the MSE, which is 0 for identical images. We clamp the MSE at 1e-10
# (on the [0, 1] scale), so PSNR never exceeds 100 dB and its gradient stays finite.
MSE_FLOOR = 1e-10


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Eq. 1 per image, in dB. Images in [0, 1], so p_max = 1 (the same as 255 on 0..255).

    The MSE averages over every pixel and channel of one image. Differentiable: this is the
    loss of Eq. 2 and Eq. 3. Returns a tensor of N values; average it for the paper's figure.
    """
    if original.shape != reconstruction.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(original.shape)} vs {tuple(reconstruction.shape)}")
    mse = (original.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(MSE_FLOOR))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def _blur_matrix(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n - k + 1) x n matrix whose row i holds the k taps of g at columns i .. i + k - 1: a valid 1-D
    convolution along one axis as a matrix product."""
    k = len(g)
    rows = torch.arange(n - k + 1, device=g.device)[:, None] + torch.arange(k, device=g.device)
    return torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device).scatter_(1, rows, g.expand(n - k + 1, k))


def ssim(original: torch.Tensor, reconstruction: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) per image: Gaussian window 11/1.5, K1=0.01, K2=0.03,
    data range 1, averaged over channels and valid positions. Returns N values in [-1, 1]."""
    if original.shape != reconstruction.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(original.shape)} vs {tuple(reconstruction.shape)}")
    x, y = original.double(), reconstruction.double()  # float64: var = E[x^2] - E[x]^2 cancels badly in float32
    window = min(window, x.shape[-1], x.shape[-2])
    g = _gaussian_window(window, sigma).to(x.device, torch.float64)
    # The Gaussian window is separable: blur columns, then rows, as two matrix products (25x faster
    # on a CPU than a grouped float64 convolution with the 2-D window, and the same to float64 rounding).
    down, across = _blur_matrix(x.shape[-2], g), _blur_matrix(x.shape[-1], g).T

    def blur(t: torch.Tensor) -> torch.Tensor:
        return down @ t @ across

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


# ----------------------------------------------------------------------------- re-identification


def draw_candidates(rows: torch.Tensor, n_pool: int, n_candidates: int, generator: torch.Generator) -> torch.Tensor:
    """For each true index in `rows`, a candidate set of pool indices: column 0 is the true index,
    the other n_candidates - 1 are distinct others drawn uniformly at random. Returns len(rows) x N."""
    if not 2 <= n_candidates <= n_pool:
        raise ValueError(f"n_candidates must be in 2..{n_pool} (the pool size), got {n_candidates}")
    out = torch.empty(len(rows), n_candidates, dtype=torch.long)
    for j, i in enumerate(rows.tolist()):
        others = torch.randperm(n_pool - 1, generator=generator)[: n_candidates - 1]
        others += (others >= i).long()  # skip the true index itself
        out[j, 0], out[j, 1:] = i, others
    return out


def standardised(images: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Each image to mean 0 and std 1, per channel over its pixels or over all its values (any leading
    dims; the last three are C x H x W). A flat image (std 0) maps to zeros, not to inf."""
    flat = images.flatten(-2 if per_channel else -3)
    mean, std = flat.mean(-1, keepdim=True), flat.std(-1, keepdim=True, unbiased=False)
    return ((flat - mean) / std.clamp_min(1e-3)).reshape(images.shape)


def match_counts(queries: torch.Tensor, pool: torch.Tensor, candidates: torch.Tensor, chunk: int = 256, standardise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, how many of its candidates are strictly closer to it than the true one (column 0
    of `candidates`) and how many are exactly as close (ties: behind a deterministic quantiser every
    candidate sharing the true one's code is at the same distance), by MSE. With `standardise`, query and
    candidates are first standardised per channel, so the match weighs shapes, not brightness or colour
    cast (what an attacker does against an f that cannot see those).
    queries: M x C x H x W, pool: P x C x H x W, candidates: M x N. Returns (ahead, tied), each M."""
    if len(queries) != len(candidates):
        raise ValueError(f"reid_ranks: {len(queries)} reconstructions but {len(candidates)} candidate sets")
    # |c - r|^2 = |c|^2 - 2 c.r + |r|^2, in float64; |r|^2 is the same for every candidate of r, so
    # the order is that of |c|^2 - 2 c.r: one matrix product per chunk instead of gathering
    # M x N images (each pool image standardised once, not once per candidate set it is in). The product
    # is M x P x D multiply-adds, so it grows with the pool: 0.3 s for 2,000 users, 7-9 s for 10,000 on 2 cores.
    flat = (standardised(pool.double()) if standardise else pool.double()).flatten(1)  # P x D
    norms = flat.pow(2).sum(1)
    ahead, tied = [], []
    for start in range(0, len(candidates), chunk):
        rec = queries[start : start + chunk].to(pool.device).double()
        if standardise:
            rec = standardised(rec)
        rec = rec.flatten(1)
        cand = candidates[start : start + chunk].to(pool.device)  # m x N
        dist = norms[cand] - 2 * (rec @ flat.T).gather(1, cand)  # m x N, minus |r|^2
        # Equal candidates give equal distances up to the rounding of the product (the order of its sums may
        # differ between rows): a tie is a difference below 1e-9 of the distances' scale, far below any real gap.
        scale = norms[cand].max(1, keepdim=True).values + rec.pow(2).sum(1, keepdim=True)
        gap = dist[:, 1:] - dist[:, :1]
        same = gap.abs() <= 1e-9 * scale
        ahead.append(((gap < 0) & ~same).sum(1).cpu())
        tied.append(same.sum(1).cpu())
    return torch.cat(ahead), torch.cat(tied)


def reid_ranks(reconstructions: torch.Tensor, pool: torch.Tensor, candidates: torch.Tensor, chunk: int = 256, standardise: bool = False) -> torch.Tensor:
    """1-based rank of the true image (column 0 of `candidates`) among its candidates, ordered by
    pixel MSE to the reconstruction, with every tie counted against the attacker (a candidate exactly
    as close as the true image ranks ahead of it): the lower bound beside expected_top_k's rate.
    reconstructions: M x C x H x W, pool: P x C x H x W, candidates: M x N."""
    ahead, tied = match_counts(reconstructions, pool, candidates, chunk, standardise)
    return 1 + ahead + tied


def top_k_rate(ranks: torch.Tensor, k: int) -> float:
    """Fraction of reconstructions whose true image ranks in the top k."""
    return (ranks <= k).float().mean().item()


def expected_top_k(ahead: torch.Tensor, tied: torch.Tensor, k: int) -> float:
    """Top-k rate of an attacker who breaks ties uniformly at random: with `ahead` candidates strictly
    closer and `tied` as close as the true one, the true one's rank is ahead + 1 + U, U uniform on
    0..tied, so it is in the top k with probability clamp((k - ahead) / (tied + 1), 0, 1). A j-way tie
    at the top scores 1/j for top-1."""
    return ((k - ahead).float() / (tied + 1).float()).clamp(0, 1).mean().item()


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertical and horizontal neighbours, per image (N values)."""
    dy = (images[..., 1:, :] - images[..., :-1, :]).pow(2).flatten(1).mean(1)
    dx = (images[..., :, 1:] - images[..., :, :-1]).pow(2).flatten(1).mean(1)
    return dy + dx
