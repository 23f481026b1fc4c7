"""BatchNorm layers that carry a per-neuron mask and an adversarial neuron perturbation.

One class serves both defenses:
- ANP (Wu & Wang, NeurIPS 2021) multiplies the BatchNorm scale by ``mask + noise`` and
  the shift by ``1 + noise_bias`` while the perturbation is switched on.
- RNP (Li et al., ICML 2023) only learns ``neuron_mask``; the perturbation stays off.

The parameter names (``neuron_mask``, ``neuron_noise``, ``neuron_noise_bias``) are those of
the original ANP tool, so layer names in ``mask_values.txt`` and checkpoints match it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _MaskedBatchNorm(_BatchNorm):
    """Batch norm with weight ``gamma * mask`` (or ``gamma * (mask + noise)`` when perturbed)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, **factory):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory)
        self.neuron_mask = nn.Parameter(torch.ones(num_features, **factory))
        self.neuron_noise = nn.Parameter(torch.zeros(num_features, **factory))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.is_perturbed = False

    def reset_noise(self, rand_init: bool = False, eps: float = 0.0) -> None:
        """Zero the perturbation, or draw it uniformly in [-eps, eps]."""
        with torch.no_grad():
            if rand_init:
                self.neuron_noise.uniform_(-eps, eps)
                self.neuron_noise_bias.uniform_(-eps, eps)
            else:
                self.neuron_noise.zero_()
                self.neuron_noise_bias.zero_()

    def include_noise(self) -> None:
        self.is_perturbed = True

    def exclude_noise(self) -> None:
        self.is_perturbed = False

    def effective_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (weight, bias) the normalised input is scaled and shifted by: ``gamma * mask`` and ``beta``, or
        ``gamma * (mask + noise)`` and ``beta * (1 + noise_bias)`` when perturbed."""
        if self.is_perturbed:
            return self.weight * (self.neuron_mask + self.neuron_noise), self.bias * (1.0 + self.neuron_noise_bias)
        return self.weight * self.neuron_mask, self.bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # Same momentum / batch-statistics bookkeeping as torch's own _BatchNorm.forward.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        weight, bias = self.effective_affine()
        return F.batch_norm(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            weight, bias, use_batch_stats, momentum, self.eps)


class MaskedBatchNorm2d(_MaskedBatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class MaskedBatchNorm1d(_MaskedBatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


# The original tools' class names, so code written for them reads the same.
NoisyBatchNorm2d = MaskedBatchNorm2d
MaskBatchNorm2d = MaskedBatchNorm2d

MASK_PARAM_NAMES = ("neuron_mask", "neuron_noise", "neuron_noise_bias")


def masked_layers(model: nn.Module):
    """Yield ``(name, module)`` for every masked BatchNorm layer, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, _MaskedBatchNorm):
            yield name, module


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.neuron_mask for _, m in masked_layers(model)]


def noise_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in masked_layers(model) for p in (m.neuron_noise, m.neuron_noise_bias)]


def train_only(model: nn.Module, parameters: list[nn.Parameter]) -> None:
    """Gradients for ``parameters`` only: every other parameter of ``model`` is frozen. During mask
    optimisation (ANP: masks and perturbations; RNP's recovery: masks) the weights need no gradients, and
    not computing them makes a step about 1.4x faster."""
    keep = {id(p) for p in parameters}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def set_perturbation(model: nn.Module, on: bool) -> None:
    for _, m in masked_layers(model):
        m.include_noise() if on else m.exclude_noise()


def reset_perturbation(model: nn.Module, rand_init: bool = False, eps: float = 0.0) -> None:
    for _, m in masked_layers(model):
        m.reset_noise(rand_init=rand_init, eps=eps)


def clip_masks(model: nn.Module, low: float = 0.0, high: float = 1.0) -> None:
    with torch.no_grad():
        for p in mask_parameters(model):
            p.clamp_(low, high)


def is_mask_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in MASK_PARAM_NAMES
