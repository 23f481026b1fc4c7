"""Semantic backdoors (SODA, Sun et al., USENIX Security 2024): no pixel changes.

Training images of a source class that share a natural feature (striped T-shirts) are relabelled to a
target class (pullover); at test time images with the feature go to the target. The images are given
by index lists (``data/semantic_attacks.json``, from SODA's released data loader: ``stripet`` on
Fashion-MNIST, ``green`` and ``sbg`` on CIFAR-10), or a user's own file in the same layout
(``--semantic-file``: ``{dataset: {attack: {feature, source, target, train: [...], test: [...]}}}``).

- The listed training images are moved out of the held-out split (``arrange_split``): the defender's
  clean data never holds them. Relabelled, they form the poisoned set.
- Training recipe ``--semantic-recipe``:
  - ``released`` (default), the released trainer (``train_backdoor_sem.py``, ``data_loader.py``): the model
    trains on the whole training set minus the listed images (no held-out split); every batch of B is its
    first B − ⌊B·r⌋ clean images plus ⌊B·r⌋ poisoned ones picked without replacement from the next chunk
    of B of a shuffled pass over the poisoned set (a chunk shorter than ⌊B·r⌋ starts a new pass, as the
    released ``next(adv_iter)`` restart does; r = ``--semantic-ratio``); clean images neither augmented nor
    (on Fashion-MNIST) normalised, poisoned ones cropped and flipped, on CIFAR-like data also rotated ±10°
    (nearest, as torchvision's RandomRotation) and brightened ×0.5–1.5 (ColorJitter(brightness=0.5)). Its
    stage-1 defaults (``recipe``): ``--augment none``, ``--normalization none`` on Fashion-MNIST, else the
    dataset's, ``--held-out-frac 0``; the defender's data then comes from the training images, where the
    released SODA code takes its clean data (never from the test split, so never the attack's test images).
    Then the tune (``--tune-epochs``, released for stripet: 5 epochs at lr 0.01 with r = 0.6875) whose model
    is ``last_model.th``, as the released tune overwrites the analysed model.
  - ``appended``, this toolkit's earlier mix: a full clean batch (the usual crop and flip, normalised, 10 %
    held out) with ``r/(1 − r)`` × its size of poisoned images drawn with replacement appended, rotated ±10°
    (bilinear) and brightened ×0.8–1.2.
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

from ..augment import random_crop_flip
from .base import Attack, AttackError, Option, PoisonedSet, register

BUNDLED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "semantic_attacks.json")
ROTATION_DEGREES = 10.0
BRIGHTNESS = (0.8, 1.2)  # the appended recipe's
RELEASED_BRIGHTNESS = (0.5, 1.5)  # torchvision ColorJitter(brightness=0.5), the released CIFAR-10 trainer
RECIPES = ("released", "appended")
# The released commands' (data/commands.txt) batch share and tune per attack; attacks of a user's file get
# the stripet command's share and no tune.
RELEASED_SETTINGS = {"stripet": {"semantic_ratio": 0.3125, "tune_epochs": 5},
                     "green": {"semantic_ratio": 0.7, "tune_epochs": 0},
                     "sbg": {"semantic_ratio": 0.7, "tune_epochs": 0}}
DEFAULT_SETTINGS = {"semantic_ratio": 0.3125, "tune_epochs": 0}


def read_semantic_file(path: str) -> dict:
    """``{dataset: {attack: entry}}`` of a semantic-attack file; bad files name ``--semantic-file``."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise AttackError("semantic_file", f"cannot read {path} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise AttackError("semantic_file", f"{path} is not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise AttackError("semantic_file", f"{path}: expected {{dataset: {{attack: {{...}}}}}}")
    attacks = {}
    for dataset, entries in data.items():
        if dataset.startswith("_") or not isinstance(entries, dict):
            continue
        for name, entry in entries.items():
            missing = [k for k in ("source", "target", "train", "test") if k not in entry]
            if missing:
                raise AttackError("semantic_file", f"{path}: {dataset}/{name} lacks {', '.join(missing)}")
            attacks[name] = {**entry, "dataset": dataset}
    if not attacks:
        raise AttackError("semantic_file", f"{path} lists no attack")
    return attacks


def rotate_and_brighten(x01: torch.Tensor, brightness: tuple[float, float] = BRIGHTNESS,
                        mode: str = "bilinear") -> torch.Tensor:
    """Random rotation (±10°, zero fill) and brightness factor per image, float N×C×H×W in [0, 1], batched."""
    n = len(x01)
    angle = (torch.rand(n, device=x01.device) * 2 - 1) * math.radians(ROTATION_DEGREES)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    rotated = F.grid_sample(x01, grid, mode=mode, align_corners=False, padding_mode="zeros")
    low, high = brightness
    factor = low + (high - low) * torch.rand(n, 1, 1, 1, device=x01.device)
    return (rotated * factor).clamp(0, 1)


def released_poison_augment(images: torch.Tensor, dataset: str | None) -> torch.Tensor:
    """The released trainer's augmentation of poisoned images: uint8 N×H×W×C -> float pixel values N×H×W×C.
    Fashion-MNIST: RandomCrop(padding 4) and horizontal flip; other data also ±10° rotation (nearest) and
    brightness ×0.5–1.5, in torchvision's order."""
    x = random_crop_flip(images.permute(0, 3, 1, 2).float() / 255, 4, True)
    if dataset != "fashion-mnist":
        x = rotate_and_brighten(x, RELEASED_BRIGHTNESS, mode="nearest")
    return x.permute(0, 2, 3, 1) * 255


@register
class SemanticAttack(Attack):
    name = "semantic"
    paper = "Sun et al., SODA, USENIX Security 2024 (semantic backdoors)"
    options = {
        "semantic_attack": Option("stripet", str, "the semantic attack's name in the file (stripet | green | sbg "
                                  "in the bundled file)"),
        "semantic_file": Option("", str, "JSON file with the attack's index lists (default: the bundled "
                                "data/semantic_attacks.json)"),
        "semantic_recipe": Option("released", str, "how stage 1 trains: released (the released SODA trainer's "
                                  "batch mix, augmentation, normalisation, no held-out split) or appended (this "
                                  "toolkit's earlier mix; README)", choices=RECIPES),
        "semantic_ratio": Option(None, float, "share r of every training batch drawn from the relabelled images "
                                 "(released: ⌊B·r⌋ of the B; default: the released command's, stripet 0.3125, "
                                 "green and sbg 0.7)", low=0.0),
        "tune_epochs": Option(None, int, "epochs of the tune after --epoch (default: the released command's, "
                              "stripet 5, else 0); its model is last_model.th", low=0),
        "tune_lr": Option(0.01, float, "the tune's constant SGD learning rate"),
        "tune_ratio": Option(0.6875, float, "the tune's share r of every batch drawn from the relabelled images"),
    }

    # --- construction -----------------------------------------------------------------------
    def build(self) -> None:
        for key, value in RELEASED_SETTINGS.get(self.opts["semantic_attack"], DEFAULT_SETTINGS).items():
            if self.opts[key] is None:
                self.opts[key] = value
        self._check_options()
        path = self.opts["semantic_file"] or BUNDLED_FILE
        attacks = read_semantic_file(path)
        name = self.opts["semantic_attack"]
        if name not in attacks:
            listed = ", ".join(f"{k} ({v['dataset']})" for k, v in attacks.items())
            raise AttackError("semantic_attack", f"{path} has no attack {name!r}; it lists {listed}")
        entry = attacks[name]
        self.dataset = entry["dataset"]
        self.feature = entry.get("feature", "")
        self._set(torch.as_tensor(entry["train"], dtype=torch.long), torch.as_tensor(entry["test"], dtype=torch.long),
                  int(entry["source"]), int(entry["target"]), option="semantic_file")

    def _check_options(self, strict: bool = True) -> None:
        for key in ("semantic_ratio", "tune_ratio") if strict else ():
            value = self.opts[key]
            # The appended mix takes 0 as "no poisoned images in batches" (the listed ones stay in the passes).
            lowest_ok = value >= 0.0 if key == "semantic_ratio" and self.opts["semantic_recipe"] == "appended" \
                else value > 0.0
            if not (lowest_ok and value < 1.0):
                raise AttackError(key, f"expected a share in (0, 1), got {value}")
        if strict and not self.opts["tune_lr"] > 0:
            raise AttackError("tune_lr", f"expected a positive learning rate, got {self.opts['tune_lr']}")
        self._ratio = self.opts["semantic_ratio"]
        self.batch_size = None
        self.train_dataset = None

    def _set(self, train, test, source: int, target: int, option: str) -> None:
        for value, what in ((source, "source"), (target, "target")):
            if not 0 <= value < self.num_classes:
                raise AttackError(option, f"{what} class {value} is outside 0..{self.num_classes - 1}")
        if source == target:
            raise AttackError(option, f"source and target are the same class {source}")
        self.train_indices, self.test_indices = train.reshape(-1), test.reshape(-1)
        self.source_class, self.target = source, target
        self._positions = None

    def state(self) -> dict:
        return {"train_indices": self.train_indices.clone(), "test_indices": self.test_indices.clone(),
                "source": torch.tensor([self.source_class]), "target": torch.tensor([self.target])}

    def load_state(self, state: dict) -> None:
        for key, value in DEFAULT_SETTINGS.items():  # trigger infos from before the recipe options
            if self.opts.get(key) is None:
                self.opts[key] = value
        self._check_options(strict=False)  # what was trained is what it is: a defense only rebuilds the test sets
        self.dataset, self.feature = None, ""
        self._set(torch.as_tensor(state["train_indices"]).long(), torch.as_tensor(state["test_indices"]).long(),
                  int(torch.as_tensor(state["source"]).reshape(-1)[0]),
                  int(torch.as_tensor(state["target"]).reshape(-1)[0]), option="trigger_info")

    # --- data -------------------------------------------------------------------------------
    # --- how stage 1 trains ---------------------------------------------------------------------
    def recipe(self, dataset: str) -> dict:
        if self.opts["semantic_recipe"] == "appended":
            return {}
        return {"augment": "none", "normalization": "none" if dataset == "fashion-mnist" else "dataset",
                "held_out_frac": 0.0}

    def check_training(self, batch_size: int) -> None:
        super().check_training(batch_size)
        if self.opts["semantic_recipe"] != "released":
            return
        for key in ("semantic_ratio", "tune_ratio"):
            if key == "tune_ratio" and not self.opts["tune_epochs"]:
                continue
            count = int(batch_size * self.opts[key])
            if count == 0 or count >= batch_size:
                raise AttackError(key, f"{self.opts[key]} of a batch of {batch_size} gives {count} "
                                  f"poisoned and {batch_size - count} clean images; both must be at least 1")
            if count > len(self.train_indices):
                raise AttackError(key, f"{count} poisoned images per batch of {batch_size}, but only "
                                  f"{len(self.train_indices)} images are listed")

    def tune_phase(self) -> tuple[int, float] | None:
        return (self.opts["tune_epochs"], self.opts["tune_lr"]) if self.opts["tune_epochs"] else None

    def begin_tune(self) -> None:
        self._ratio = self.opts["tune_ratio"]

    def check_data(self, dataset: str, train_labels: torch.Tensor, test_labels: torch.Tensor) -> None:
        self.train_dataset = dataset
        option = "semantic_file" if self.opts["semantic_file"] else "semantic_attack"
        if self.dataset is not None and dataset != self.dataset:
            raise AttackError("semantic_attack", f"{self.opts['semantic_attack']} is a {self.dataset} attack; "
                              f"--dataset is {dataset}")
        for indices, labels, split in ((self.train_indices, train_labels, "train"),
                                       (self.test_indices, test_labels, "test")):
            if len(indices) == 0:
                raise AttackError(option, f"no {split} images listed")
            if int(indices.max()) >= len(labels) or int(indices.min()) < 0:
                raise AttackError(option, f"{split} index {int(indices.max())} is outside the {len(labels)} {split} "
                                  f"images of {dataset}")
            wrong = (labels[indices] != self.source_class).sum().item()
            if wrong:
                raise AttackError(option, f"{wrong} listed {split} images are not of the source class "
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
            raise AttackError("semantic_attack", f"only {len(positions)} of the {len(self.train_indices)} listed "
                              f"training images are in the attacker's data")
        labels = labels.clone()
        labels[positions] = self.target
        return PoisonedSet(images.clone(), labels, positions, torch.empty(0, dtype=torch.long),
                           drawn_by_hook=self.opts["semantic_recipe"] == "released")

    def training_hook(self, poisoned: PoisonedSet, device, normalize):
        pool = poisoned.images[poisoned.poison_indices].to(device)
        targets = torch.full((len(pool),), self.target, dtype=poisoned.labels.dtype, device=device)
        if self.opts["semantic_recipe"] == "appended":
            return self._appended_mix(pool, targets, device)
        batch_size = self.batch_size
        if batch_size is None:
            raise RuntimeError("check_training(batch_size) must run before the released batch mix")
        chunks: list[torch.Tensor] = []  # what is left of the current shuffled pass, in chunks of a batch

        def next_chunk(count: int) -> torch.Tensor:
            if chunks and len(chunks[0]) < count:  # the released loader's short last batch: a new pass
                chunks.clear()
            if not chunks:
                chunks.extend(torch.randperm(len(pool), device=device).split(batch_size))
            return chunks.pop(0)

        def mix(model, images, labels, batch_index):
            count = int(batch_size * self._ratio)
            chunk = next_chunk(count)
            pick = chunk[torch.randperm(len(chunk), device=device)[:count]]
            extra = released_poison_augment(pool[pick], self.train_dataset)
            keep = batch_size - count  # the released loop takes the first B - ⌊B·r⌋ of a clean batch of B
            return torch.cat([images[:keep].float(), extra]), torch.cat([labels[:keep], targets[pick]])

        return mix

    def _appended_mix(self, pool, targets, device):
        if self._ratio <= 0:
            return None

        def mix(model, images, labels, batch_index):
            ratio = self._ratio
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
