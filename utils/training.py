"""Supervised training over in-memory uint8 images (batched augmentation on the device)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm


def train_epoch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: Callable,
                optimizer: torch.optim.Optimizer, batch_size: int, autocast, generator: torch.Generator | None = None,
                progress: bool = True, desc: str = "train", batch_hook: Callable | None = None) -> tuple[float, float]:
    """Shuffle, (hook,) augment, step. Returns mean loss and accuracy; accumulates on the device (one sync).

    ``batch_hook(model, images, labels, batch_index) -> (images, labels)`` may change a batch before
    augmentation (attacks that poison per batch or train a trigger generator with the classifier).
    """
    model.train()
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    seen = 0  # a hook may add images to a batch (semantic attacks)
    for idx in tqdm(order.split(batch_size), desc=desc, leave=False, disable=not progress):
        x, y = images[idx], labels[idx]
        if batch_hook is not None:
            x, y = batch_hook(model, x, y, idx)
        x = augment(x)
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return total_loss.item() / max(seen, 1), correct.item() / max(seen, 1)


def sgd_with_schedule(model: torch.nn.Module, lr: float, milestones: list[int]):
    """The original tools' optimiser: SGD (momentum 0.9, weight decay 5e-4), lr ÷10 at ``milestones``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
