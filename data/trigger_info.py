"""``trigger_info.th``: everything needed to re-create the poisoned test set and the held-out split.

Stored as tensors and plain Python types (``torch.load(weights_only=True)`` reads it). The
original ANP tool's keys (``trigger_pattern``, ``trigger_mask``, ``trigger_alpha``,
``poison_target``) are written too; its numpy-array version is read as well.
"""
from __future__ import annotations

import torch

from utils.checkpoint import argument_error, safe_load
from utils.errors import OptionError

from .attacks import Attack, attack_from_record
from .augment import NORMALIZATIONS, normalization_stats
from .splits import HELD_OUT_FRAC


def make_trigger_info(attack: Attack, dataset: str, split_seed: int, permutation: torch.Tensor,
                      poison_indices: torch.Tensor, poison_candidates: str, augmentation: str,
                      cover_indices: torch.Tensor | None = None, normalization: str = "dataset",
                      mean=None, std=None, held_out_frac: float = HELD_OUT_FRAC) -> dict:
    return {
        **attack.record(),
        "dataset": dataset,
        "split_seed": int(split_seed),
        "held_out_frac": float(held_out_frac),
        "split_permutation": permutation.clone(),
        # Indices into the full training set (the ANP tool's ``data_index`` names the same thing).
        "poison_indices": poison_indices.clone(),
        "data_index": poison_indices.clone(),
        "cover_indices": (cover_indices if cover_indices is not None else torch.empty(0, dtype=torch.long)).clone(),
        "poison_rate": float(attack.opts.get("poison_rate", 0.0)),
        "poison_candidates": poison_candidates,
        # The training augmentation (a name in data.AUGMENTATIONS); the defenses augment their clean data alike.
        "augmentation": augmentation,
        # The input normalisation the model was trained with (a name in data.NORMALIZATIONS and its values);
        # trigger infos without it (older ones, the original tools') mean the dataset's mean and std.
        "normalization": normalization,
        **({"normalize_mean": [float(v) for v in mean], "normalize_std": [float(v) for v in std]}
           if mean is not None else {}),
    }


def recorded_normalization(trigger_info: dict | None, spec) -> tuple[str, tuple, tuple]:
    """(name, mean, std) the model of ``trigger_info`` was trained with (the dataset's without a record)."""
    name = (trigger_info or {}).get("normalization", "dataset")
    if name not in NORMALIZATIONS:
        raise OptionError("trigger_info", f"unknown normalization {name!r}; expected one of "
                                          f"{', '.join(NORMALIZATIONS)}")
    mean, std = normalization_stats(name, spec)
    if trigger_info and "normalize_mean" in trigger_info:
        mean, std = tuple(trigger_info["normalize_mean"]), tuple(trigger_info["normalize_std"])
    if len(mean) != len(spec.mean) or len(std) != len(spec.std):
        raise OptionError("trigger_info", f"its normalization has {len(mean)} channels, {spec.name} has "
                                          f"{len(spec.mean)}")
    return name, mean, std


def load_trigger_info(path: str, argument: str = "trigger_info") -> dict:
    """The trigger-info record at ``path`` (checked: it rebuilds its attack); ``argument``: the option that gave
    ``path`` (or a label: :func:`utils.checkpoint.argument_error`)."""
    record = safe_load(path, argument)
    if not isinstance(record, dict):
        raise argument_error(argument, f"{path} does not hold a trigger-info dictionary")
    try:
        attack_from_record(record)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise argument_error(argument, f"{path} is not a usable trigger info ({err})") from None
    return record
