"""Adversarial Neuron Pruning, mask optimisation (Wu & Wang, NeurIPS 2021).

Per iteration on a batch of the defender's clean data (``anp.md``):
1. if eps > 0: draw noise and noise_bias uniformly in [-eps, eps]; then ``steps`` times take a
   signed-gradient ascent step (lr eps/steps) on the cross-entropy of the perturbed model;
2. update the masks with loss = alpha·CE(unperturbed) + (1 − alpha)·CE(perturbed), then clip
   them to [0, 1].
Faithful defaults: BatchNorm in train mode (batch statistics, running statistics drift) and the
perturbation is not projected back into [-eps, eps] after its step. ``bn_mode="eval"`` and
``project_noise=True`` give the corrected variants.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import (mask_parameters, masked_layers, noise_parameters, reset_perturbation, set_perturbation,
                    train_only)
from utils.training import DeviceTotals, augmented, run_batches, sampled_order, uses_cuda_graphs


@dataclass
class ANPConfig:
    nb_iter: int = 2000
    batch_size: int = 128
    lr: float = 0.2  # mask optimiser (SGD, momentum 0.9)
    anp_eps: float = 0.4
    anp_steps: int = 1
    anp_alpha: float = 0.2
    print_every: int = 500
    bn_mode: str = "train"  # "train" (original) or "eval"
    project_noise: bool = False  # original: no projection back into [-eps, eps]


BN_MODES = ("train", "eval")
DRAW_CHUNK = 500  # iterations whose batch indices are drawn and copied to the device at once (with a generator)


def clip_to_unit(tensors: list[torch.Tensor]) -> None:
    """Clip every tensor to [0, 1] in place, all at once (two kernels on a GPU instead of two per layer);
    the same values as ``models.clip_masks``."""
    with torch.no_grad():
        torch._foreach_clamp_min_(tensors, 0.0)
        torch._foreach_clamp_max_(tensors, 1.0)


def make_optimizers(model: torch.nn.Module, config: ANPConfig):
    """``(mask optimiser, perturbation optimiser)`` as the original: SGD on the masks (lr, momentum 0.9)
    and plain SGD on the perturbations with lr eps/steps, so ``steps`` signed steps span eps."""
    mask_opt = torch.optim.SGD(mask_parameters(model), lr=config.lr, momentum=0.9)
    noise_opt = torch.optim.SGD(noise_parameters(model), lr=config.anp_eps / max(config.anp_steps, 1))
    return mask_opt, noise_opt


def perturb_neurons(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, noise_opt: torch.optim.Optimizer,
                    config: ANPConfig, autocast) -> None:
    """``anp_steps`` signed-gradient *ascent* steps on the perturbed model's cross-entropy, starting from
    the perturbation the layers hold now (``neuron_noise`` and ``neuron_noise_bias`` both move)."""
    noise_params = [p for group in noise_opt.param_groups for p in group["params"]]
    for _ in range(config.anp_steps):
        set_perturbation(model, True)
        with autocast():
            loss_noise = -F.cross_entropy(model(x), y)  # descending on -CE is ascending on CE
        noise_opt.zero_grad(set_to_none=True)
        loss_noise.backward()
        # The original steps along the gradient's sign, not the gradient (in place, all tensors at once).
        torch._foreach_sign_([p.grad for p in noise_params])
        noise_opt.step()
        if config.project_noise:
            with torch.no_grad():
                for p in noise_params:
                    p.clamp_(-config.anp_eps, config.anp_eps)


def mask_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask_opt: torch.optim.Optimizer,
              config: ANPConfig, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask update on alpha·CE(unperturbed) + (1 − alpha)·CE(perturbed, with the perturbation the
    layers hold now; the term is dropped when eps = 0), then masks clipped to [0, 1].
    Returns ``(loss, unperturbed logits)``, detached."""
    mask_opt.zero_grad(set_to_none=True)
    with autocast():
        if config.anp_eps > 0.0:
            set_perturbation(model, True)
            loss_rob = F.cross_entropy(model(x), y)
        else:
            loss_rob = 0.0
        set_perturbation(model, False)
        logits = model(x)
        loss_nat = F.cross_entropy(logits, y)
        loss = config.anp_alpha * loss_nat + (1 - config.anp_alpha) * loss_rob
    loss.backward()
    mask_opt.step()
    clip_to_unit([p for group in mask_opt.param_groups for p in group["params"]])  # the masks
    return loss.detach(), logits.detach()


def anp_iteration(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask_opt: torch.optim.Optimizer,
                  noise_opt: torch.optim.Optimizer, config: ANPConfig, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One ANP iteration on a batch: random perturbation in [-eps, eps] (global RNG), its signed ascent
    steps, then the mask step; BatchNorm in ``config.bn_mode``. Returns ``mask_step``'s result."""
    model.train(config.bn_mode == "train")
    if config.anp_eps > 0.0:
        reset_perturbation(model, rand_init=True, eps=config.anp_eps)
        perturb_neurons(model, x, y, noise_opt, config, autocast)
    return mask_step(model, x, y, mask_opt, config, autocast)


def optimize_masks(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: Callable,
                   config: ANPConfig, autocast, on_report: Callable[[int, dict], None] | None = None,
                   generator: torch.Generator | None = None, progress: bool = True) -> torch.nn.Module:
    """Learn ``neuron_mask`` of a masked model on clean ``images`` (uint8, on the device); returns the model.

    ``on_report(iteration, train_stats)`` is called every ``config.print_every`` iterations and at
    the end with the mean train loss and accuracy since the previous report.
    """
    if config.bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {config.bn_mode!r}")
    train_only(model, mask_parameters(model) + noise_parameters(model))
    mask_opt, noise_opt = make_optimizers(model, config)
    device = images.device
    # Batches drawn with replacement, as the original's RandomSampler(replacement=True); with a generator of
    # their own DRAW_CHUNK iterations' batches at once (utils.training.sampled_order).
    order = sampled_order(len(labels), config.batch_size, config.nb_iter, device, generator, chunk=DRAW_CHUNK)
    make_batch = augmented(images, labels, augment)

    def step(x, y):
        return anp_iteration(model, x, y, mask_opt, noise_opt, config, autocast)

    # One pass of run_batches per report (the mean loss and accuracy since the previous one: one host sync).
    window = config.print_every if on_report is not None else config.nb_iter
    with tqdm(order, total=config.nb_iter, desc="ANP", leave=False, disable=not progress) as bar:
        batches = iter(bar)
        for done in range(0, config.nb_iter, window):
            it = min(done + window, config.nb_iter)
            totals = run_batches(itertools.islice(batches, it - done), make_batch, step,
                                 DeviceTotals(device, mean_over="batches"), mark_steps=uses_cuda_graphs(model, device))
            if on_report is not None:
                train_loss, train_acc = totals.means()
                set_perturbation(model, False)
                on_report(it, {"train_loss": train_loss, "train_acc": train_acc})
    set_perturbation(model, False)
    reset_perturbation(model)
    return model


def mask_values(model: torch.nn.Module) -> list[tuple[str, int, float]]:
    """``(layer name, channel, mask value)`` for every neuron, in model order."""
    values = []
    for name, layer in masked_layers(model):
        for idx, value in enumerate(layer.neuron_mask.detach().float().cpu().tolist()):
            values.append((name, idx, value))
    return values
