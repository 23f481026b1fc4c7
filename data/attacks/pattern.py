"""Triggers of the form x' = x + α · mask · (pattern − x): BadNets patches, Blend, their relatives.

``pattern`` is uint8 H×W×C, ``mask`` float H×W×C in [0, 1]. This is the original ANP tool's
``trigger_pattern`` / ``trigger_mask`` / ``trigger_alpha`` rule; like its ``astype(np.uint8)`` the
result is truncated to integers. The ANP keys are written into the trigger info as well, so the
original tool reads our files, and a trigger info of the original tool (numpy arrays, no attack
name) is rebuilt as a :class:`PatternAttack`.
"""
from __future__ import annotations

import torch

from .base import Attack, Option


def blend_rule(images: torch.Tensor, pattern: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x + weight · (pattern − x), truncated to uint8 like the original's ``astype(np.uint8)``."""
    x = images.to(torch.float64)
    out = x + weight.to(images.device, torch.float64) * (pattern.to(images.device, torch.float64) - x)
    # Small epsilon so that e.g. 0.8·100 + 0.2·100 does not truncate to 99 by rounding error.
    return (out + 1e-6).clamp_(0, 255).to(torch.uint8)


class PatternAttack(Attack):
    """An attack whose trigger is a pattern, a mask and an opacity; subclasses make the pattern in ``build``."""

    name = "pattern"
    target_types = ("all2one", "all2all")
    options = {**Attack.options, "trigger_alpha": Option(1.0, float, "trigger opacity")}
    pattern: torch.Tensor
    mask: torch.Tensor

    @property
    def alpha(self) -> float:
        return float(self.opts["trigger_alpha"])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return blend_rule(images, self.pattern, self.alpha * self.mask)

    def state(self) -> dict:
        return {"pattern": self.pattern.clone(), "mask": self.mask.clone()}

    def load_state(self, state: dict) -> None:
        self.pattern = torch.as_tensor(state["pattern"]).to(torch.uint8)
        self.mask = torch.as_tensor(state["mask"]).to(torch.float32)

    def record(self) -> dict:
        # The original ANP tool's keys: patterns with a leading batch axis of 1.
        trigger_type = getattr(self, "trigger_name", None) or self.opts.get("trigger_type", "custom")
        return {**super().record(), "trigger_type": trigger_type,
                "trigger_pattern": self.pattern.unsqueeze(0).clone(),
                "trigger_mask": self.mask.unsqueeze(0).clone(), "trigger_alpha": self.alpha}

    @classmethod
    def from_anp_record(cls, record: dict) -> "PatternAttack":
        """A trigger info with only the ANP keys (the original tool's, or ours before the registry)."""
        pattern = torch.as_tensor(record["trigger_pattern"])
        mask = torch.as_tensor(record["trigger_mask"])
        if pattern.dim() == 4:
            pattern, mask = pattern[0], mask[0]
        target = int(torch.as_tensor(record["poison_target"]).reshape(-1)[0].item())
        alpha = float(torch.as_tensor(record["trigger_alpha"]).reshape(-1)[0].item())
        attack = cls(target, int(record.get("num_classes", 10)), tuple(pattern.shape),
                     record.get("target_type", "all2one"), state={"pattern": pattern, "mask": mask},
                     trigger_alpha=alpha)
        attack.name = record.get("attack") or "pattern"
        attack.trigger_name = record.get("trigger_type")
        return attack
