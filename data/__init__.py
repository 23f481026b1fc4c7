"""Datasets as uint8 tensors, splits, and the attack zoo (poisoning lives in each attack's hooks)."""
from .attacks import ATTACKS, Attack, AttackError, attack_from_record, create_attack
from .augment import AUGMENTATIONS, NORMALIZATIONS, BatchTransform, default_augmentation, normalization_stats
from .datasets import DATASETS, Dataset, DatasetSpec, get_spec, load_dataset
from .splits import attacker_indices, defense_indices, held_out_indices, split_permutation

__all__ = ["ATTACKS", "Attack", "AttackError", "attack_from_record", "create_attack", "AUGMENTATIONS", "NORMALIZATIONS",
           "normalization_stats", "BatchTransform", "default_augmentation", "DATASETS", "Dataset", "DatasetSpec",
           "get_spec", "load_dataset", "attacker_indices", "defense_indices", "held_out_indices", "split_permutation"]
