"""Reconstructive Neuron Pruning, phases 1 and 2 (Li et al., ICML 2023).

1. ``unlearn``: gradient *ascent* on the clean cross-entropy of the defender's data (SGD lr 0.01,
   momentum 0.9, wd 5e-4, MultiStepLR), until the training accuracy falls to ``clean_threshold``.
   The gradient norm is clipped at 20 *after* the backward pass (the original clips before it,
   which does nothing).
2. ``recover_masks``: on the unlearned weights, learn only ``neuron_mask`` (SGD lr 0.2, momentum
   0.9, loss alpha·CE, masks clipped to [0, 1]); backdoor neurons stay low because restoring them
   does not help the clean loss.
Phase 3 is ANP's pruning stage (:mod:`defenses.pruning`) on the original model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import clip_masks, mask_parameters

STOP_CHECKS = ("epoch", "batch")


@dataclass
class RNPConfig:
    batch_size: int = 128
    unlearning_lr: float = 0.01
    unlearning_epochs: int = 20
    schedule: list = field(default_factory=lambda: [10, 20])
    clean_threshold: float = 0.20
    stop_check: str = "batch"  # "batch" (default): after each batch; "epoch": after each epoch, as the paper
    clip_grad_norm: float = 20.0
    recovering_lr: float = 0.2
    recovering_epochs: int = 20
    alpha: float = 0.2


@dataclass
class UnlearnResult:
    epochs_run: int
    stopped: bool  # whether the training accuracy reached the threshold
    train_acc: float  # the accuracy the stop rule saw last (epoch or batch, per ``stop_check``)
    epoch_train_acc: float
    epoch_train_loss: float


def _batches(num: int, batch_size: int, device, generator):
    return torch.randperm(num, generator=generator).to(device).split(batch_size)


def unlearn(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: Callable,
            config: RNPConfig, autocast, on_epoch: Callable[[int, float, dict], None] | None = None,
            generator: torch.Generator | None = None, progress: bool = True) -> UnlearnResult:
    """Maximise the clean loss of a plain model in place; stop at ``clean_threshold`` accuracy."""
    if config.stop_check not in STOP_CHECKS:
        raise ValueError(f"stop_check must be one of {STOP_CHECKS}")
    optimizer = torch.optim.SGD(model.parameters(), lr=config.unlearning_lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.schedule), gamma=0.1)
    result = UnlearnResult(0, False, 1.0, 1.0, 0.0)
    for epoch in tqdm(range(1, config.unlearning_epochs + 1), desc="unlearn", leave=False, disable=not progress):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        total_loss, correct, seen = 0.0, 0, 0
        for idx in _batches(len(labels), config.batch_size, images.device, generator):
            x, y = augment(images[idx]), labels[idx]
            with autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            batch_correct = (logits.argmax(1) == y).sum().item()
            total_loss += loss.item() * len(y)
            correct += batch_correct
            seen += len(y)
            if config.stop_check == "batch" and batch_correct / len(y) <= config.clean_threshold:
                # The model that met the rule is the current one: keep it, skip this batch's ascent step.
                result.stopped, result.train_acc = True, batch_correct / len(y)
                break
            optimizer.zero_grad(set_to_none=True)
            (-loss).backward()
            # Clip after the backward pass (the original clips before it, where it has no effect).
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=config.clip_grad_norm)
            optimizer.step()
        result.epochs_run = epoch
        result.epoch_train_loss, result.epoch_train_acc = total_loss / seen, correct / seen
        if config.stop_check == "epoch":
            result.train_acc = result.epoch_train_acc
            result.stopped = result.epoch_train_acc <= config.clean_threshold
        if on_epoch is not None:
            on_epoch(epoch, lr, {"train_loss": result.epoch_train_loss, "train_acc": result.epoch_train_acc})
        if result.stopped:
            break
        scheduler.step()
    return result


def recover_masks(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: Callable,
                  config: RNPConfig, autocast, on_epoch: Callable[[int, float, dict], None] | None = None,
                  generator: torch.Generator | None = None, progress: bool = True) -> torch.nn.Module:
    """Learn the masks of a masked model holding the unlearned weights; only masks change."""
    masks = mask_parameters(model)
    keep = {id(p) for p in masks}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    optimizer = torch.optim.SGD(masks, lr=config.recovering_lr, momentum=0.9)
    for epoch in tqdm(range(1, config.recovering_epochs + 1), desc="recover", leave=False, disable=not progress):
        model.train()
        total_loss = torch.zeros((), device=images.device)
        correct = torch.zeros((), device=images.device, dtype=torch.long)
        for idx in _batches(len(labels), config.batch_size, images.device, generator):
            x, y = augment(images[idx]), labels[idx]
            with autocast():
                logits = model(x)
                loss = config.alpha * F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clip_masks(model)
            total_loss += loss.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
        if on_epoch is not None:
            on_epoch(epoch, config.recovering_lr,
                     {"train_loss": total_loss.item() / len(labels), "train_acc": correct.item() / len(labels)})
    return model
