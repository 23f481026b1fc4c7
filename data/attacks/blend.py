"""Blend (Chen et al., 2017): x' = (1 − α)·x + α·pattern over the whole image (α = 0.2, ANP's recipe).

ANP's pattern is a fixed Gaussian-noise image; ours is drawn from a fixed seed at the dataset's
image size (N(128, 64²), clipped to [0, 255]), so every run uses the same one. ``trigger_file``
takes any image instead (resized to the dataset's size), e.g. the original's or Hello Kitty.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from utils.errors import UserError

from .base import PatternAttack

PATTERN_SEED = 1234


def gaussian_pattern(image_shape, seed: int = PATTERN_SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tuple(image_shape), generator=generator) * 64 + 128
    return noise.round().clamp(0, 255).to(torch.uint8)


def load_pattern_file(path: str, image_shape) -> torch.Tensor:
    """Read an image file (any format PIL reads, or ``.npy``/``.npz`` arrays) as uint8 H×W×C."""
    h, w, c = image_shape
    if not os.path.isfile(path):
        raise UserError(f"--trigger-file: {path} does not exist")
    try:
        if path.endswith((".npy", ".npz")):
            array = np.load(path, allow_pickle=False)
            array = array[array.files[0]] if hasattr(array, "files") else array
            if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
                array = array.transpose(1, 2, 0)  # C×H×W -> H×W×C
            if array.max() <= 1.0:
                array = array * 255
            from PIL import Image
            image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8).squeeze())
        else:
            from PIL import Image
            image = Image.open(path)
        image = image.convert("L" if c == 1 else "RGB").resize((w, h))
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"--trigger-file: cannot read {path} as an image ({err})") from None
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).reshape(h, w, c).copy())


class Blend(PatternAttack):
    name = "blend"

    def __init__(self, target: int, num_classes: int, image_shape, alpha: float = 0.2,
                 trigger_file: str | None = None, target_type: str = "all2one"):
        pattern = load_pattern_file(trigger_file, image_shape) if trigger_file else gaussian_pattern(image_shape)
        mask = torch.ones(tuple(image_shape))
        super().__init__(target, num_classes, pattern, mask, alpha, target_type,
                         trigger_type=os.path.basename(trigger_file) if trigger_file else "gaussian_noise")
