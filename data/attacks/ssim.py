"""Structural similarity (SSIM, Wang et al., "Image Quality Assessment: From Error Visibility to Structural
Similarity", IEEE TIP 2004), per image, differentiable, on batched tensors.

The standard constants, as ``tf.image.ssim`` (which DFST's TensorFlow original bounds at 0.6) and scikit-image
with ``gaussian_weights=True``: an 11×11 Gaussian window of σ = 1.5, K1 = 0.01, K2 = 0.03, local statistics
over the valid part of the image only (no padding), the SSIM map averaged over positions and channels. On
images smaller than the window the window shrinks to the image's shorter side (odd).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_window(size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The 1-D Gaussian of ``size`` taps, summing to 1."""
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM of each image pair: ``x``, ``y`` float N×C×H×W in [0, ``data_range``] -> N values in [−1, 1]."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two N×C×H×W tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    channels, height, width = x.shape[1:]
    size = min(window, height, width)
    size -= 1 - size % 2  # odd
    g = gaussian_window(size, sigma, x.device, x.dtype)
    # Separable filtering: the 2-D Gaussian is the outer product of the 1-D one; one filter per channel.
    rows, cols = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)

    def local_mean(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, rows, groups=channels), cols, groups=channels)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
