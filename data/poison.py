"""Poisoning as pure functions on tensors (data.md's rules)."""
from __future__ import annotations

import torch

from .attacks import Attack

CANDIDATE_RULES = ("non-target", "all")


def choose_poison_indices(labels: torch.Tensor, rate: float, attack: Attack, generator: torch.Generator,
                          candidates: str = "non-target") -> torch.Tensor:
    """Indices (into ``labels``) of the images to poison, sorted.

    - ``non-target`` (ANP's rule, default): rate × (number of non-target images), chosen among them.
    - ``all`` (RNP's rule): rate × (number of images), chosen among all images.
    Clean-label attacks choose among target-class images only; all-to-all uses every image.
    """
    if candidates not in CANDIDATE_RULES:
        raise ValueError(f"candidates must be one of {CANDIDATE_RULES}, got {candidates!r}")
    if attack.clean_label:
        pool = (labels == attack.target).nonzero().flatten()
    elif candidates == "non-target" and attack.target_type == "all2one":
        pool = (labels != attack.target).nonzero().flatten()
    else:
        pool = torch.arange(len(labels))
    count = int(rate * len(pool))
    chosen = pool[torch.randperm(len(pool), generator=generator)[:count]]
    return chosen.sort().values


def poison_training_set(images: torch.Tensor, labels: torch.Tensor, attack: Attack, indices: torch.Tensor):
    """Return copies of ``images``/``labels`` with the trigger on ``indices`` (relabelled unless clean-label)."""
    images, labels = images.clone(), labels.clone()
    if len(indices):
        images[indices] = attack.apply(images[indices])
        if not attack.clean_label:
            labels[indices] = attack.target_labels(labels[indices])
    return images, labels


def poisoned_test_set(images: torch.Tensor, labels: torch.Tensor, attack: Attack):
    """Triggered test images whose true label is not the target (all of them for all-to-all).

    Returns ``(images, target_labels, true_labels)``: ASR is measured against the first,
    robust accuracy (RA) against the second.
    """
    keep = labels != attack.target if attack.target_type == "all2one" else torch.ones_like(labels, dtype=torch.bool)
    true_labels = labels[keep]
    return attack.apply(images[keep]), attack.target_labels(true_labels), true_labels
