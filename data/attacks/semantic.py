"""Semantic backdoors (SODA, Sun et al., USENIX Security 2024): no pixel changes.

Training images of a source class that share a natural feature (striped T-shirts) are relabelled to a
target class (pullover); at test time images with the feature go to the target. The images are given
by index lists (``data/semantic_attacks.json``, from SODA's released data loader: ``stripet`` on
Fashion-MNIST, ``green`` and ``sbg`` on CIFAR-10), or a user's own file in the same layout
(``--semantic-file``: ``{dataset: {attack: {feature, source, target, train: [...], test: [...]}}}``).

- The listed training images are moved out of the held-out split (``arrange_split``): the defender's
  clean data never holds them. Relabelled, they form the poisoned set.
- Training mix (the released trainer): every batch of clean images gets poisoned images drawn at random
  appended, ``--semantic-ratio`` of the batch, heavily augmented (±10° rotation, brightness ×0.8–1.2,
  then the usual crop and flip).
- Test: the listed test images, labelled target, are the attack test set (ASR; RA = still the source
  class); the clean test set is the rest. ``source_class`` lets the metrics report the source class's
  accuracy.

Indices and classes travel in the trigger info's state, so every stage rebuilds the attack test set
without the JSON file.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from .base import Attack, AttackError, Option, PoisonedSet, register

BUNDLED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "semantic_attacks.json")
ROTATION_DEGREES = 10.0
BRIGHTNESS = (0.8, 1.2)


def read_semantic_file(path: str) -> dict:
    """``{dataset: {attack: entry}}`` of a semantic-attack file; bad files name ``--semantic-file``."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise AttackError("--semantic-file", f"cannot read {path} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise AttackError("--semantic-file", f"{path} is not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise AttackError("--semantic-file", f"{path}: expected {{dataset: {{attack: {{...}}}}}}")
    attacks = {}
    for dataset, entries in data.items():
        if dataset.startswith("_") or not isinstance(entries, dict):
            continue
        for name, entry in entries.items():
            missing = [k for k in ("source", "target", "train", "test") if k not in entry]
            if missing:
                raise AttackError("--semantic-file", f"{path}: {dataset}/{name} lacks {', '.join(missing)}")
            attacks[name] = {**entry, "dataset": dataset}
    if not attacks:
        raise AttackError("--semantic-file", f"{path} lists no attack")
    return attacks


def rotate_and_brighten(x01: torch.Tensor) -> torch.Tensor:
    """Random rotation (±10°) and brightness factor per image, float N×C×H×W in [0, 1], batched."""
    n = len(x01)
    angle = (torch.rand(n, device=x01.device) * 2 - 1) * math.radians(ROTATION_DEGREES)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    rotated = F.grid_sample(x01, grid, align_corners=False, padding_mode="zeros")
    low, high = BRIGHTNESS
    factor = low + (high - low) * torch.rand(n, 1, 1, 1, device=x01.device)
    return (rotated * factor).clamp(0, 1)


@register
class SemanticAttack(Attack):
    name = "semantic"
    paper = "Sun et al., SODA, USENIX Security 2024 (semantic backdoors)"
    options = {
        "semantic_attack": Option("stripet", str, "the semantic attack's name in the file (stripet | green | sbg "
                                  "in the bundled file)"),
        "semantic_file": Option("", str, "JSON file with the attack's index lists (default: the bundled "
                                "data/semantic_attacks.json)"),
        "semantic_ratio": Option(0.3125, float, "share of every training batch drawn from the relabelled images "
                                 "(appended to the clean batch)", low=0.0),
    }

    # --- construction -----------------------------------------------------------------------
    def build(self) -> None:
        if not self.opts["semantic_ratio"] < 1.0:
            raise AttackError("--semantic-ratio", f"expected a share in [0, 1), got {self.opts['semantic_ratio']}")
        path = self.opts["semantic_file"] or BUNDLED_FILE
        attacks = read_semantic_file(path)
        name = self.opts["semantic_attack"]
        if name not in attacks:
            listed = ", ".join(f"{k} ({v['dataset']})" for k, v in attacks.items())
            raise AttackError("--semantic-attack", f"{path} has no attack {name!r}; it lists {listed}")
        entry = attacks[name]
        self.dataset = entry["dataset"]
        self.feature = entry.get("feature", "")
        self._set(torch.as_tensor(entry["train"], dtype=torch.long), torch.as_tensor(entry["test"], dtype=torch.long),
                  int(entry["source"]), int(entry["target"]), flag="--semantic-file")

    def _set(self, train, test, source: int, target: int, flag: str) -> None:
        for value, what in ((source, "source"), (target, "target")):
            if not 0 <= value < self.num_classes:
                raise AttackError(flag, f"{what} class {value} is outside 0..{self.num_classes - 1}")
        if source == target:
            raise AttackError(flag, f"source and target are the same class {source}")
        self.train_indices, self.test_indices = train.reshape(-1), test.reshape(-1)
        self.source_class, self.target = source, target
        self._positions = None

    def state(self) -> dict:
        return {"train_indices": self.train_indices.clone(), "test_indices": self.test_indices.clone(),
                "source": torch.tensor([self.source_class]), "target": torch.tensor([self.target])}

    def load_state(self, state: dict) -> None:
        self.dataset, self.feature = None, ""
        self._set(torch.as_tensor(state["train_indices"]).long(), torch.as_tensor(state["test_indices"]).long(),
                  int(torch.as_tensor(state["source"]).reshape(-1)[0]),
                  int(torch.as_tensor(state["target"]).reshape(-1)[0]), flag="--trigger-info")

    # --- data -------------------------------------------------------------------------------
    def check_data(self, dataset: str, train_labels: torch.Tensor, test_labels: torch.Tensor) -> None:
        flag = "--semantic-file" if self.opts["semantic_file"] else "--semantic-attack"
        if self.dataset is not None and dataset != self.dataset:
            raise AttackError("--semantic-attack", f"{self.opts['semantic_attack']} is a {self.dataset} attack; "
                              f"--dataset is {dataset}")
        for indices, labels, split in ((self.train_indices, train_labels, "train"),
                                       (self.test_indices, test_labels, "test")):
            if len(indices) == 0:
                raise AttackError(flag, f"no {split} images listed")
            if int(indices.max()) >= len(labels) or int(indices.min()) < 0:
                raise AttackError(flag, f"{split} index {int(indices.max())} is outside the {len(labels)} {split} "
                                  f"images of {dataset}")
            wrong = (labels[indices] != self.source_class).sum().item()
            if wrong:
                raise AttackError(flag, f"{wrong} listed {split} images are not of the source class "
                                  f"{self.source_class}; made for another dataset?")

    def arrange_split(self, permutation: torch.Tensor) -> torch.Tensor:
        """The listed training images moved to the end of the split order: never in the held-out part."""
        listed = torch.isin(permutation, self.train_indices)
        return torch.cat([permutation[~listed], permutation[listed]])

    def prepare(self, images, labels, surrogate, normalize, generator, indices=None) -> None:
        if indices is None:
            indices = torch.arange(len(labels))
        self._positions = torch.isin(indices, self.train_indices).nonzero().flatten()

    def poison(self, images, labels, generator, candidates="non-target") -> PoisonedSet:
        if self._positions is None:
            self.prepare(images, labels, None, None, generator)
        positions = self._positions
        if len(positions) != len(self.train_indices):
            raise AttackError("--semantic-attack", f"only {len(positions)} of the {len(self.train_indices)} listed "
                              f"training images are in the attacker's data")
        labels = labels.clone()
        labels[positions] = self.target
        return PoisonedSet(images.clone(), labels, positions, torch.empty(0, dtype=torch.long))

    def training_hook(self, poisoned: PoisonedSet, device, normalize):
        ratio = self.opts["semantic_ratio"]
        if ratio <= 0:
            return None
        pool = poisoned.images[poisoned.poison_indices].to(device)
        targets = torch.full((len(pool),), self.target, dtype=poisoned.labels.dtype, device=device)

        def mix(model, images, labels, batch_index):
            count = max(1, round(ratio * len(labels) / (1 - ratio)))
            draw = torch.randint(0, len(pool), (count,), device=device)
            extra = rotate_and_brighten(pool[draw].permute(0, 3, 1, 2).float() / 255)
            extra = extra.permute(0, 2, 3, 1) * 255
            return torch.cat([images.float(), extra]), torch.cat([labels, targets[draw]])

        return mix

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()  # a semantic backdoor changes no pixel

    def test_set(self, images: torch.Tensor, labels: torch.Tensor):
        chosen = self.test_indices
        return images[chosen].clone(), torch.full_like(labels[chosen], self.target), labels[chosen].clone()

    def clean_test_set(self, images: torch.Tensor, labels: torch.Tensor):
        keep = ~torch.isin(torch.arange(len(labels)), self.test_indices)
        return images[keep], labels[keep]
