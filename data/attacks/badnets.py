"""BadNets (Gu et al., 2017): a 3×3 patch in the bottom-right corner, relabelled to the target.

Two patches of the literature, placed relative to the corner so they work at any image size:
- ``checkerboard_1corner`` — ANP's trigger (rows/columns 29–31 of 32×32), alpha 1.
- ``gridTrigger`` — RNP's trigger (the last three rows and columns).
Both set, by row from the top, [0, 0, 255], [0, 255, 0], [255, 0, 255] in every channel: the two
tools write the same pixels, one as a pattern with a mask, one pixel by pixel.
"""
from __future__ import annotations

import torch

from .base import PatternAttack

PATCH = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
TRIGGER_TYPES = ("checkerboard_1corner", "gridTrigger")


def corner_patch(image_shape: tuple[int, int, int], patch: torch.Tensor = PATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Pattern (uint8) and mask (float) H×W×C with ``patch`` in the bottom-right corner."""
    h, w, c = image_shape
    ph, pw = patch.shape
    pattern = torch.zeros(h, w, c, dtype=torch.uint8)
    mask = torch.zeros(h, w, c)
    pattern[h - ph:, w - pw:, :] = patch.unsqueeze(-1)
    mask[h - ph:, w - pw:, :] = 1.0
    return pattern, mask


class BadNets(PatternAttack):
    name = "badnets"

    def __init__(self, target: int, num_classes: int, image_shape, trigger_type: str = "checkerboard_1corner",
                 alpha: float = 1.0, target_type: str = "all2one"):
        if trigger_type not in TRIGGER_TYPES:
            raise ValueError(f"trigger_type must be one of {TRIGGER_TYPES}, got {trigger_type!r}")
        pattern, mask = corner_patch(tuple(image_shape))
        super().__init__(target, num_classes, pattern, mask, alpha, target_type, trigger_type)
