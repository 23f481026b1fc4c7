"""The interface every attack implements.

An attack knows its trigger and its target rule. ``apply`` stamps the trigger on a batch of
uint8 images (vectorised over the batch); ``record`` returns plain tensors and Python types
for ``trigger_info.th`` (loadable with ``torch.load(weights_only=True)``); ``from_record``
rebuilds the attack from it. Choosing which training images to poison is generic
(:mod:`data.poison`).
"""
from __future__ import annotations

import torch

TARGET_TYPES = ("all2one", "all2all")


class Attack:
    name = "base"
    clean_label = False  # clean-label attacks poison target-class images and keep labels

    def __init__(self, target: int, num_classes: int, target_type: str = "all2one"):
        if target_type not in TARGET_TYPES:
            raise ValueError(f"target_type must be one of {TARGET_TYPES}, got {target_type!r}")
        self.target = int(target)
        self.num_classes = int(num_classes)
        self.target_type = target_type

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Return a triggered copy of uint8 images N×H×W×C."""
        raise NotImplementedError

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels a successful backdoor outputs: the target, or y+1 mod C for all-to-all."""
        if self.target_type == "all2all":
            return (labels + 1) % self.num_classes
        return torch.full_like(labels, self.target)

    def record(self) -> dict:
        return {"attack": self.name, "poison_target": torch.tensor([self.target]), "target": self.target,
                "target_type": self.target_type, "num_classes": self.num_classes}


class PatternAttack(Attack):
    """Triggers of the form x' = x + alpha · mask · (pattern − x) (BadNets patches, Blend).

    ``pattern`` is uint8 H×W×C, ``mask`` float H×W×C in [0, 1]. This is the original ANP
    tool's ``trigger_pattern`` / ``trigger_mask`` / ``trigger_alpha`` rule; like its
    ``astype(np.uint8)`` the result is truncated to integers.
    """

    def __init__(self, target: int, num_classes: int, pattern: torch.Tensor, mask: torch.Tensor,
                 alpha: float, target_type: str = "all2one", trigger_type: str = "custom"):
        super().__init__(target, num_classes, target_type)
        self.pattern = pattern.to(torch.uint8)
        self.mask = mask.to(torch.float32)
        self.alpha = float(alpha)
        self.trigger_type = trigger_type

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float64)
        weight = (self.alpha * self.mask).to(images.device, torch.float64)
        out = x + weight * (self.pattern.to(images.device, torch.float64) - x)
        # Small epsilon so that e.g. 0.8·100 + 0.2·100 does not truncate to 99 by rounding error.
        return (out + 1e-6).clamp_(0, 255).to(torch.uint8)

    def record(self) -> dict:
        return {**super().record(), "trigger_type": self.trigger_type,
                # The original ANP tool's keys: patterns with a leading batch axis of 1.
                "trigger_pattern": self.pattern.unsqueeze(0).clone(),
                "trigger_mask": self.mask.unsqueeze(0).clone(),
                "trigger_alpha": self.alpha}

    @classmethod
    def from_record(cls, record: dict) -> "PatternAttack":
        pattern = torch.as_tensor(record["trigger_pattern"])
        mask = torch.as_tensor(record["trigger_mask"])
        if pattern.dim() == 4:
            pattern, mask = pattern[0], mask[0]
        attack = cls.__new__(cls)
        PatternAttack.__init__(attack, int(_scalar(record["poison_target"])), int(record.get("num_classes", 10)),
                               pattern, mask, float(_scalar(record["trigger_alpha"])),
                               record.get("target_type", "all2one"), record.get("trigger_type", "custom"))
        return attack


def _scalar(value):
    """The original tool stores ``poison_target`` as a 1-element numpy array."""
    return torch.as_tensor(value).reshape(-1)[0].item()
