"""One supervised training epoch over in-memory uint8 images (batched augmentation on the device)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm


def train_epoch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: Callable,
                optimizer: torch.optim.Optimizer, batch_size: int, autocast, generator: torch.Generator | None = None,
                progress: bool = True, desc: str = "train") -> tuple[float, float]:
    """Shuffle, augment, step. Returns mean loss and accuracy; accumulates on the device (one sync)."""
    model.train()
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for idx in tqdm(order.split(batch_size), desc=desc, leave=False, disable=not progress):
        x, y = augment(images[idx]), labels[idx]
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().float() * len(idx)
        correct += (logits.argmax(1) == y).sum()
    return total_loss.item() / len(labels), correct.item() / len(labels)
