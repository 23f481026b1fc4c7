"""Blend (Chen et al., 2017): x' = (1 − α)·x + α·pattern over the whole image.

Defaults (ANP's recipe): α = 0.2 at training and test, 5% of the non-target images poisoned.
ANP's pattern is a fixed Gaussian-noise image; ours is drawn from a fixed seed at the dataset's
image size (N(128, 64²), clipped to [0, 255]), so every run uses the same one. ``--trigger-file``
takes any image instead (resized to the dataset's size), e.g. the original's or Hello Kitty.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .base import AttackError, Option, register
from .pattern import PatternAttack

PATTERN_SEED = 1234


def gaussian_pattern(image_shape, seed: int = PATTERN_SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tuple(image_shape), generator=generator) * 64 + 128
    return noise.round().clamp(0, 255).to(torch.uint8)


def load_pattern_file(path: str, image_shape) -> torch.Tensor:
    """Read an image file (any format PIL reads, or ``.npy``/``.npz`` arrays) as uint8 H×W×C, resized."""
    from PIL import Image

    h, w, c = image_shape
    if not os.path.isfile(path):
        raise AttackError("trigger_file", f"{path} does not exist")
    try:
        if path.endswith((".npy", ".npz")):
            array = np.load(path, allow_pickle=False)
            array = array[array.files[0]] if hasattr(array, "files") else array
            array = np.asarray(array, dtype=np.float64).squeeze()
            if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
                array = array.transpose(1, 2, 0)  # C×H×W -> H×W×C
            if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3)):
                raise AttackError("trigger_file", f"{path} holds an array of shape {array.shape}; expected "
                                  f"H×W, H×W×C or C×H×W with 1 or 3 channels")
            if array.max() <= 1.0:
                array = array * 255
            image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8).squeeze())
        else:
            image = Image.open(path)
        image = image.convert("L" if c == 1 else "RGB").resize((w, h))
    except AttackError:
        raise
    except Exception as err:
        raise AttackError("trigger_file", f"cannot read {path} as an image ({err})") from None
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).reshape(h, w, c).copy())


@register
class Blend(PatternAttack):
    name = "blend"
    paper = "Chen et al., Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning, 2017"
    options = {**PatternAttack.options, "trigger_alpha": Option(0.2, float, "blend opacity"),
               "trigger_file": Option(None, str, "image blended instead of the fixed Gaussian pattern")}

    def build(self) -> None:
        path = self.opts["trigger_file"]
        self.pattern = load_pattern_file(path, self.image_shape) if path else gaussian_pattern(self.image_shape)
        self.mask = torch.ones(self.image_shape)
        self.trigger_name = os.path.basename(path) if path else "gaussian_noise"
