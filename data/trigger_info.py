"""``trigger_info.th``: everything needed to re-create the poisoned test set and the held-out split.

Stored as tensors and plain Python types (``torch.load(weights_only=True)`` reads it). The
original ANP tool's keys (``trigger_pattern``, ``trigger_mask``, ``trigger_alpha``,
``poison_target``) are written too; its numpy-array version is read as well.
"""
from __future__ import annotations

import torch

from utils.checkpoint import safe_load
from utils.errors import UserError

from .attacks import Attack, attack_from_record
from .splits import HELD_OUT_FRAC


def make_trigger_info(attack: Attack, dataset: str, split_seed: int, permutation: torch.Tensor,
                      poison_indices: torch.Tensor, poison_candidates: str, augmentation: str,
                      cover_indices: torch.Tensor | None = None) -> dict:
    return {
        **attack.record(),
        "dataset": dataset,
        "split_seed": int(split_seed),
        "held_out_frac": HELD_OUT_FRAC,
        "split_permutation": permutation.clone(),
        # Indices into the full training set (the ANP tool's ``data_index`` names the same thing).
        "poison_indices": poison_indices.clone(),
        "data_index": poison_indices.clone(),
        "cover_indices": (cover_indices if cover_indices is not None else torch.empty(0, dtype=torch.long)).clone(),
        "poison_rate": float(attack.opts.get("poison_rate", 0.0)),
        "poison_candidates": poison_candidates,
        # The training augmentation (a name in data.AUGMENTATIONS); the defenses augment their clean data alike.
        "augmentation": augmentation,
    }


def load_trigger_info(path: str, argument: str = "--trigger-info") -> dict:
    record = safe_load(path, argument)
    if not isinstance(record, dict):
        raise UserError(f"{argument}: {path} does not hold a trigger-info dictionary")
    try:
        attack_from_record(record)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"{argument}: {path} is not a usable trigger info ({err})") from None
    return record
