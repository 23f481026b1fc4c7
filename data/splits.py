"""The held-out clean split of the original tools.

A seeded permutation of the training set: its first ``held_out_frac`` (10%) is never poisoned
or trained on, and the defense's clean data is the first ``val_frac`` × N of the same
permutation (ANP's ``--val-frac 0.01``, RNP's ``--ratio 0.01``: 500 CIFAR-10 images).
"""
from __future__ import annotations

import torch

HELD_OUT_FRAC = 0.1


def split_permutation(num_train: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_train, generator=generator)


def held_out_indices(permutation: torch.Tensor, frac: float = HELD_OUT_FRAC) -> torch.Tensor:
    return permutation[: int(round(len(permutation) * frac))]


def attacker_indices(permutation: torch.Tensor, frac: float = HELD_OUT_FRAC) -> torch.Tensor:
    return permutation[int(round(len(permutation) * frac)):]


def defense_indices(permutation: torch.Tensor, val_frac: float, held_out_frac: float = HELD_OUT_FRAC) -> torch.Tensor:
    """First ``val_frac`` × N images of the permutation; they must lie in the held-out part."""
    if not 0.0 < val_frac <= held_out_frac:
        raise ValueError(f"val_frac must be in (0, {held_out_frac}] so the defense data is held-out clean data")
    return permutation[: int(round(len(permutation) * val_frac))]
