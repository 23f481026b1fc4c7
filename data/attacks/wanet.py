"""WaNet (Nguyen & Tran, "WaNet — Imperceptible Warping-based Backdoor Attack", ICLR 2021).

One fixed smooth warping field per attack: a k×k field (k = 4) of uniform values in [−1, 1],
normalised by its mean absolute value, upsampled bicubically to the image size, scaled by s/H
(s = 0.5), added to the identity sampling grid, clamped to [−1, 1] and applied with ``grid_sample``.
The field is drawn from a fixed seed and saved in the trigger info (RNP's code draws a new field per
image; that is a bug, not copied).

Noise mode (the paper's, on by default): a further share of the training images (cross ratio 2 ×
the poison rate) is warped with the field plus fresh random noise every batch and keeps its labels,
so the model learns that only the exact field is the trigger. Defaults from the paper: 10% of the
non-target images poisoned, k = 4, s = 0.5, cross ratio 2. Warped images are rounded to uint8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, Option, PoisonedSet, register, to_uint8

FIELD_SEED = 4321


def warping_grid(image_shape, k: int, strength: float, seed: int = FIELD_SEED) -> torch.Tensor:
    """The sampling grid (H×W×2, in [−1, 1]) of WaNet's fixed warp."""
    h, w, _ = image_shape
    generator = torch.Generator().manual_seed(seed)
    field = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    field = field / field.abs().mean()
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)[0]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack((xs, ys), dim=-1)
    return (identity + strength * field / h).clamp(-1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Warp uint8 N×H×W×C images with one grid (H×W×2) or one per image (N×H×W×2); uint8 out."""
    x = images.permute(0, 3, 1, 2).float()
    grid = grid.to(images.device)
    grid = grid.unsqueeze(0).expand(len(x), -1, -1, -1) if grid.dim() == 3 else grid
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return to_uint8(out.permute(0, 2, 3, 1))


@register
class WaNet(Attack):
    name = "wanet"
    paper = "Nguyen & Tran, ICLR 2021"
    options = {"poison_rate": Option(0.1, float, "share of the candidate images poisoned"),
               "cross_ratio": Option(2.0, float, "noise mode: cover images = cross ratio × poison rate (0: off)",
                                     low=0),
               "warp_k": Option(4, int, "side of the random field before upsampling", low=2),
               "warp_strength": Option(0.5, float, "warping strength s")}

    def build(self) -> None:
        self.grid = warping_grid(self.image_shape, self.opts["warp_k"], self.opts["warp_strength"])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return warp(images, self.grid) if len(images) else images.clone()

    def poison(self, images, labels, generator, candidates="non-target") -> PoisonedSet:
        poisoned = super().poison(images, labels, generator, candidates)
        cover_rate = min(1.0, self.opts["cross_ratio"] * self.opts["poison_rate"])
        poisoned.cover_indices = self.choose_covers(labels, cover_rate, poisoned.poison_indices, generator, candidates)
        return poisoned

    def training_hook(self, poisoned: PoisonedSet, device, normalize):
        if not len(poisoned.cover_indices):
            return None
        is_cover = torch.zeros(len(poisoned.labels), dtype=torch.bool, device=device)
        is_cover[poisoned.cover_indices.to(device)] = True
        grid = self.grid.to(device)
        h = self.image_shape[0]

        def hook(model, images, labels, batch_index):
            # The whole batch is warped with fresh noise and the covers picked by a mask: no host sync per
            # batch (counting the covers would need one), at the cost of a grid_sample over a small batch.
            cover = is_cover[batch_index].view(-1, 1, 1, 1)
            noise = (torch.rand(len(images), *grid.shape, device=device) * 2 - 1) / h
            return torch.where(cover, warp(images, (grid.unsqueeze(0) + noise).clamp(-1, 1)), images), labels
        return hook

    def state(self) -> dict:
        return {"grid": self.grid.clone()}

    def load_state(self, state: dict) -> None:
        self.grid = torch.as_tensor(state["grid"]).float()
