"""No attack: a clean model. Its poisoned test set is the clean one (ASR is then plain error to the target)."""
from __future__ import annotations

import torch

from .base import Attack


class Benign(Attack):
    name = "benign"

    def __init__(self, target: int, num_classes: int, image_shape=None, target_type: str = "all2one"):
        super().__init__(target, num_classes, target_type)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()

    @classmethod
    def from_record(cls, record: dict) -> "Benign":
        return cls(int(record.get("target", 0)), int(record.get("num_classes", 10)),
                   target_type=record.get("target_type", "all2one"))
