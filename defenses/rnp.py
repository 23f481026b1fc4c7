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

from defenses.anp import clip_to_unit
from models import mask_parameters, train_only
from utils.training import DeviceTotals, augmented, descent_step, epoch_order, run_batches

STOP_CHECKS = ("epoch", "batch")


@dataclass
class RNPConfig:
    batch_size: int = 128
    unlearning_lr: float = 0.01
    unlearning_epochs: int = 20
    schedule: list = field(default_factory=lambda: [10, 20])
    clean_threshold: float = 0.20
    stop_check: str = "epoch"  # "epoch" (default): after each epoch, as the paper's code; "batch": before each step
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


class _Snapshots:
    """Two copies of a model's parameters and buffers, written in turn (no host synchronisation): the
    per-batch stop rule on the GPU reads a batch's verdict one step late, and then puts back the model
    that met the rule from the copy taken before its ascent step."""

    def __init__(self, model: torch.nn.Module):
        self.tensors = [p.data for p in model.parameters()] + list(model.buffers())
        self.slots = [[torch.empty_like(t) for t in self.tensors] for _ in range(2)]
        self.next = 0

    def save(self) -> int:
        """Copy the model into the slot not written last; returns that slot."""
        slot, self.next = self.next, 1 - self.next
        with torch.no_grad():
            torch._foreach_copy_(self.slots[slot], self.tensors)
        return slot

    def restore(self, slot: int) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, self.slots[slot])


def _to_host(values: torch.Tensor):
    """Start copying ``values`` to the host without waiting; returns ``read()``, which waits for them only."""
    if values.device.type != "cuda":
        return lambda: values.tolist()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return lambda: (ready.synchronize(), host.tolist())[1]


def unlearn(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: Callable,
            config: RNPConfig, autocast, on_epoch: Callable[[int, float, dict], None] | None = None,
            generator: torch.Generator | None = None, progress: bool = True,
            defer_check: bool | None = None) -> UnlearnResult:
    """Maximise the clean loss of a plain model in place; stop at ``clean_threshold`` accuracy.

    No host synchronisation per step: loss and accuracy accumulate on the device (in float64, so the sums
    are those of Python floats), the per-epoch rule reads them once per epoch. The per-batch rule needs a
    verdict per batch: with ``defer_check`` (default: on CUDA) batch k's verdict is read after batch k+1's
    step has been queued, and if batch k met the rule the model is put back to its state before batch
    k's step (:class:`_Snapshots`), i.e. exactly the model the eager check keeps.
    """
    if config.stop_check not in STOP_CHECKS:
        raise ValueError(f"stop_check must be one of {STOP_CHECKS}")
    per_batch = config.stop_check == "batch"
    defer = (images.device.type == "cuda" if defer_check is None else defer_check) and per_batch
    snapshots = _Snapshots(model) if defer else None
    optimizer = torch.optim.SGD(model.parameters(), lr=config.unlearning_lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.schedule), gamma=0.1)
    result = UnlearnResult(0, False, 1.0, 1.0, 0.0)
    device = images.device
    pending = None  # deferred: (snapshot slot, its verdict's reader, batch size) of the batch before

    def settle(entry) -> bool:
        """A deferred batch's verdict; True (the model put back) if it met the rule."""
        slot, read, n = entry
        met, hits = read()
        if met:
            snapshots.restore(slot)
            result.stopped, result.train_acc = True, hits / n
        return bool(met)

    def ascent_step(x, y):
        """Forward; the per-batch rule (eager: before the step, which it then skips); the clipped ascent step;
        deferred: then the previous batch's verdict (None: it met the rule, this batch does not count)."""
        nonlocal pending
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        if per_batch:
            batch_correct = (logits.argmax(1) == y).sum()
            if not defer and batch_correct.item() / len(y) <= config.clean_threshold:
                # The model that met the rule is the current one: keep it, skip this batch's ascent step.
                result.stopped, result.train_acc = True, batch_correct.item() / len(y)
                return loss, logits
            if defer:
                met = batch_correct.double() / len(y) <= config.clean_threshold
                entry = (snapshots.save(), _to_host(torch.stack([met.double(), batch_correct.double()])), len(y))
        optimizer.zero_grad(set_to_none=True)
        (-loss).backward()
        # Clip after the backward pass (the original clips before it, where it has no effect).
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=config.clip_grad_norm)
        optimizer.step()
        if defer:
            if pending is not None and settle(pending):
                pending = None
                return None
            pending = entry
        return loss, logits

    make_batch = augmented(images, labels, augment)
    for epoch in tqdm(range(1, config.unlearning_epochs + 1), desc="unlearn", leave=False, disable=not progress):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        totals = DeviceTotals(device, torch.float64)  # float64: the sums of Python floats
        run_batches(epoch_order(len(labels), config.batch_size, device, generator), make_batch, ascent_step, totals,
                    batch_size=config.batch_size, until=lambda: per_batch and result.stopped)
        if pending is not None:  # the epoch's last batch
            settle(pending)
            pending = None
        result.epochs_run = epoch
        result.epoch_train_loss, result.epoch_train_acc = totals.means()
        if not per_batch:
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
    train_only(model, masks)
    optimizer = torch.optim.SGD(masks, lr=config.recovering_lr, momentum=0.9)
    step = descent_step(model, optimizer, autocast, loss_fn=lambda logits, y: config.alpha * F.cross_entropy(logits, y),
                        after_step=lambda: clip_to_unit(masks))
    make_batch = augmented(images, labels, augment)
    for epoch in tqdm(range(1, config.recovering_epochs + 1), desc="recover", leave=False, disable=not progress):
        model.train()
        totals = run_batches(epoch_order(len(labels), config.batch_size, images.device, generator), make_batch, step,
                             DeviceTotals(images.device), batch_size=config.batch_size)
        if on_epoch is not None:
            loss, accuracy = totals.means()
            on_epoch(epoch, config.recovering_lr, {"train_loss": loss, "train_acc": accuracy})
    return model
