"""Adaptive blend (Qi et al., "Revisiting the Assumption of Latent Separability for Backdoor Defenses",
ICLR 2023): a blend trigger cut into pieces, with "cover" images that keep their labels.

The blend pattern is cut into a 4×4 grid of pieces. Each poisoned training image gets a random half
of the pieces at α = 0.15 and is relabelled; as many "cover" images get a random half of the pieces
too but keep their labels, which weakens the latent separation that defenses look for. At test the
whole trigger is blended at α = 0.2. Defaults (the paper's): poison and cover rates 0.3% each,
4×4 pieces, half of them per image, α 0.15 at training and 0.2 at test. The pattern is Blend's fixed
Gaussian pattern (the paper uses a Hello-Kitty image: pass it with ``--trigger-file``).
"""
from __future__ import annotations

import torch

from .base import Option, PoisonedSet, register
from .blend import Blend
from .pattern import blend_rule


def piece_masks(count: int, image_shape, pieces: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` masks (float N×H×W×1), each the union of ``keep`` random cells of a pieces×pieces grid."""
    h, w, _ = image_shape
    order = torch.rand(count, pieces * pieces, generator=generator).argsort(dim=1)
    chosen = torch.zeros(count, pieces * pieces)
    chosen.scatter_(1, order[:, :keep], 1.0)
    cell = (torch.arange(h) * pieces // h).view(h, 1) * pieces + (torch.arange(w) * pieces // w).view(1, w)
    return chosen[:, cell].unsqueeze(-1)


@register
class AdaptiveBlend(Blend):
    name = "a-blend"
    paper = "Qi et al., ICLR 2023"
    target_types = ("all2one",)
    options = {**Blend.options,
               "poison_rate": Option(0.003, float, "share of the candidate images poisoned"),
               "cover_rate": Option(0.003, float, "share of the candidate images given the trigger with their labels"),
               "trigger_alpha": Option(0.2, float, "blend opacity at test"),
               "train_alpha": Option(0.15, float, "blend opacity of the training poisons and covers"),
               "pieces": Option(4, int, "the trigger is cut into pieces × pieces cells", low=1),
               "mask_rate": Option(0.5, float, "share of the pieces each training image gets")}

    def poison(self, images, labels, generator, candidates="non-target") -> PoisonedSet:
        opts = self.opts
        poison = self.choose(labels, opts["poison_rate"], generator, candidates)
        cover = self.choose_covers(labels, opts["cover_rate"], poison, generator, candidates)
        images, labels = images.clone(), labels.clone()
        both = torch.cat([poison, cover])
        if len(both):
            keep = max(1, round(opts["mask_rate"] * opts["pieces"] ** 2))
            masks = piece_masks(len(both), self.image_shape, opts["pieces"], keep, generator)
            images[both] = blend_rule(images[both], self.pattern, opts["train_alpha"] * masks * self.mask)
            labels[poison] = self.target_labels(labels[poison])
        return PoisonedSet(images, labels, poison, cover)
