"""Batched normalisation and augmentation on the model's device (no per-image Python).

Images stay uint8 N×H×W×C on the device; each batch is turned into normalised float N×C×H×W,
and for training randomly cropped (zero padding 4, as torchvision's RandomCrop(padding=4))
and horizontally flipped, all as tensor ops over the batch.
"""
from __future__ import annotations

import torch

# Training augmentations by name: (zero padding of the random crop, random horizontal flip).
# "crop-flip" is the papers' CIFAR recipe; "crop" suits data where a mirror image changes the meaning;
# "none" only normalises.
AUGMENTATIONS = {"crop-flip": (4, True), "crop": (4, False), "none": (0, False)}
# Input normalisations by name: "dataset" subtracts the dataset's mean and divides by its std (the original tools);
# "none" feeds pixel values in [0, 1] (the released SODA trainer on Fashion-MNIST: its Normalize lines are commented
# out). Stage 1 records the one it used in trigger_info.th; every later stage feeds the model the same.
NORMALIZATIONS = ("dataset", "none")


def default_augmentation(hflip: bool) -> str:
    """The dataset's training augmentation (its spec says whether flipping is allowed)."""
    return "crop-flip" if hflip else "crop"


class BatchTransform:
    def __init__(self, mean, std, hflip: bool, device, pad: int = 4, channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.hflip = hflip
        self.pad = pad
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @classmethod
    def named(cls, augmentation: str, mean, std, device, channels_last: bool = False) -> "BatchTransform":
        """The transform for one of :data:`AUGMENTATIONS`."""
        pad, hflip = AUGMENTATIONS[augmentation]
        return cls(mean, std, hflip, device, pad=pad, channels_last=channels_last)

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float pixel values 0–255, e.g. LIRA's) N×H×W×C -> float N×C×H×W in [0, 1], a new tensor."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float() / 255

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float pixel values) N×H×W×C -> normalised float N×C×H×W."""
        x = self.to_unit(images)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Random crop with zero padding and random horizontal flip, then normalise."""
        x = random_crop_flip(self.to_unit(images), self.pad, self.hflip)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def random_crop_flip(x: torch.Tensor, pad: int, hflip: bool) -> torch.Tensor:
    """torchvision's RandomCrop(padding=pad) then RandomHorizontalFlip, batched: float N×C×H×W in pixel space
    (zero padding = black, as torchvision pads before normalising); a random draw per image."""
    n, _, h, w = x.shape
    if pad:
        padded = torch.nn.functional.pad(x, (pad,) * 4)
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
        rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
        cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


def normalization_stats(name: str, spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a normalisation in :data:`NORMALIZATIONS` for a dataset spec."""
    if name == "none":
        channels = len(spec.mean)
        return (0.0,) * channels, (1.0,) * channels
    return tuple(spec.mean), tuple(spec.std)
