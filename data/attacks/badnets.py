"""BadNets (Gu et al., 2017): a 3×3 patch in the bottom-right corner, relabelled to the target.

Defaults (ANP): 5% of the non-target images poisoned, target 0, alpha 1. Patches of the literature,
placed relative to the corner so they work at any image size:

- ``checkerboard_1corner`` — ANP's trigger (rows/columns 29–31 of 32×32).
- ``gridTrigger`` — RNP's trigger (the last three rows and columns).
  Both set, by row from the top, [0, 0, 255], [0, 255, 0], [255, 0, 255] in every channel: the two
  tools write the same pixels, one as a pattern with a mask, one pixel by pixel.
- ``checkerboard_4corner`` — the patch in all four corners, mirrored on the left side (the
  label-consistent attack's trigger; RNP's ``fourCornerTrigger``).

``--target-type all2all`` relabels y → (y + 1) mod C.

>>> attack = create_attack("badnets", target=0, num_classes=10, image_shape=(32, 32, 3))
>>> attack.apply(images_uint8_NHWC)  # same shape, patch stamped
"""
from __future__ import annotations

import torch

from .base import Option, register
from .pattern import PatternAttack

PATCH = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
TRIGGER_TYPES = ("checkerboard_1corner", "gridTrigger", "checkerboard_4corner")


def corner_patch(image_shape, corners: str = "1corner", patch: torch.Tensor = PATCH):
    """Pattern (uint8) and mask (float) H×W×C with ``patch`` in the bottom-right (or all four) corners."""
    h, w, c = image_shape
    ph, pw = patch.shape
    pattern = torch.zeros(h, w, c, dtype=torch.uint8)
    mask = torch.zeros(h, w, c)
    placements = [(slice(h - ph, h), slice(w - pw, w), patch)]
    if corners == "4corner":
        mirrored = patch.flip(1)  # mirrored on the left side
        placements += [(slice(0, ph), slice(w - pw, w), patch), (slice(0, ph), slice(0, pw), mirrored),
                       (slice(h - ph, h), slice(0, pw), mirrored)]
    for rows, cols, values in placements:
        pattern[rows, cols, :] = values.unsqueeze(-1)
        mask[rows, cols, :] = 1.0
    return pattern, mask


@register
class BadNets(PatternAttack):
    name = "badnets"
    paper = "Gu et al., BadNets, 2017"
    options = {**PatternAttack.options,
               "trigger_type": Option("checkerboard_1corner", str, "badnets patch", TRIGGER_TYPES)}

    def build(self) -> None:
        corners = "4corner" if self.opts["trigger_type"] == "checkerboard_4corner" else "1corner"
        self.pattern, self.mask = corner_patch(self.image_shape, corners)
