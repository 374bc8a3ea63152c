import math

import torch
import torch.nn.functional as F

from veil.metrics import MSE_FLOOR, _gaussian_window, psnr, ssim


def test_psnr_hand_computed():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.full((1, 1, 2, 2), 0.1)  # MSE = 0.01 -> 20 dB
    assert abs(psnr(a, b).item() - 20.0) < 1e-5
    # On the 8-bit scale: one pixel of four off by 255 -> MSE = 255^2/4 -> 10 log10(4) dB.
    c = torch.zeros(1, 1, 2, 2)
    c[0, 0, 0, 0] = 1.0
    assert abs(psnr(a, c).item() - 10 * math.log10(4)) < 1e-5


def test_psnr_is_per_image_then_averaged():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.cat([torch.full((1, 3, 4, 4), 0.1), torch.full((1, 3, 4, 4), 0.01)])
    per_image = psnr(a, b)
    assert torch.allclose(per_image, torch.tensor([20.0, 40.0]), atol=1e-4)
    pooled = -10 * math.log10(((0.1**2) + (0.01**2)) / 2)  # the other order gives a different number
    assert abs(per_image.mean().item() - 30.0) < 1e-4 and abs(pooled - 30.0) > 1


def test_psnr_identical_images_clamped_and_differentiable():
    a = torch.rand(3, 3, 8, 8)
    assert torch.allclose(psnr(a, a), torch.full((3,), -10 * math.log10(MSE_FLOOR)))
    b = a.clone().requires_grad_(True)
    c = (b + 0.05 * torch.randn_like(b))
    psnr(a, c).mean().backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_ssim_identical_is_one_and_noise_lowers_it():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-5)
    noise = torch.randn_like(a)
    scores = [ssim(a, (a + s * noise).clamp(0, 1)).mean().item() for s in (0.05, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2] and scores[2] < 0.8


def test_ssim_matches_a_direct_convolution_with_the_2d_window():
    # ssim blurs with the separable window as two matrix products; a grouped 2-D convolution with the
    # full 11 x 11 window is the textbook form, and must give the same values to float64 rounding.
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    a, b = x.double(), y.double()
    g = _gaussian_window(11, 1.5).double()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, 11, 11).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    num = (2 * mu_a * mu_b + 0.01**2) * (2 * (blur(a * b) - mu_a * mu_b) + 0.03**2)
    den = (mu_a**2 + mu_b**2 + 0.01**2) * (blur(a * a) - mu_a**2 + blur(b * b) - mu_b**2 + 0.03**2)
    direct = (num / den).flatten(1).mean(1)
    assert torch.allclose(ssim(x, y).double(), direct, atol=1e-6)
    assert ssim(x[:, :, :8, :12], y[:, :, :8, :12]).shape == (6,)  # a window cut to the smaller side


def test_ssim_of_constant_images_hand_computed():
    # Two flat images: variances and covariance are 0, so SSIM = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1).
    x, y = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert abs(ssim(x, y).item() - expected) < 1e-5
