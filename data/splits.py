"""The held-out clean split of the original tools.

A seeded permutation of the training set: its first ``held_out_frac`` (10%; 0 for the released
SODA trainer, which trains on everything) is never poisoned or trained on, and the defense's clean data is
the first ``defense_frac`` × N of the same permutation (``--defense-frac``: ANP's ``--val-frac 0.01``, RNP's
``--ratio 0.01``: 500 CIFAR-10 images).
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


def defense_indices(permutation: torch.Tensor, defense_frac: float,
                    held_out_frac: float = HELD_OUT_FRAC) -> torch.Tensor:
    """First ``defense_frac`` × N images of the permutation; they must lie in the held-out part.

    ``held_out_frac`` 0 means the model was trained on the whole training set (the released SODA trainer):
    the defender's images are then clean training images the model has seen, as in the released SODA code
    (its removal uses 5 % of the clean training data)."""
    if not 0.0 < defense_frac <= (held_out_frac if held_out_frac > 0 else 1.0):
        raise ValueError(f"defense_frac must be in (0, {held_out_frac}] so the defense data is held-out clean data")
    return permutation[: int(round(len(permutation) * defense_frac))]
