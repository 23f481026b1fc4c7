"""Datasets as uint8 tensors, splits, attacks and poisoning."""
from .attacks import ATTACKS, Attack, attack_from_record, build_attack
from .augment import AUGMENTATIONS, BatchTransform, default_augmentation, epoch_batches, sampled_batches
from .datasets import DATASETS, Dataset, DatasetSpec, get_spec, load_dataset
from .poison import choose_poison_indices, poison_training_set, poisoned_test_set
from .splits import attacker_indices, defense_indices, held_out_indices, split_permutation

__all__ = ["ATTACKS", "Attack", "attack_from_record", "build_attack", "AUGMENTATIONS", "BatchTransform",
           "default_augmentation", "epoch_batches",
           "sampled_batches", "DATASETS", "Dataset", "DatasetSpec", "get_spec", "load_dataset",
           "choose_poison_indices", "poison_training_set", "poisoned_test_set", "attacker_indices",
           "defense_indices", "held_out_indices", "split_permutation"]
