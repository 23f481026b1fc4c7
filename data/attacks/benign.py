"""No attack: a clean model. Its poisoned test set is the clean one (ASR is then plain error to the target)."""
from __future__ import annotations

import torch

from .base import Attack, Option, register


@register
class Benign(Attack):
    name = "benign"
    paper = "none (clean training)"
    has_backdoor = False
    options = {"poison_rate": Option(0.0, float, "ignored: nothing is poisoned")}

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()
