"""The interface every attack implements, and the registry that builds attacks by name.

An attack is one class registered under its ``name`` (``@register``). Its options and their
defaults live in the class (``options``, a dict of :class:`Option`); the command-line flags of
``train_backdoor_cifar.py`` are generated from them (:mod:`data.attacks.cli`).

Lifecycle, each step with a default that is plain data poisoning (BadNets):

1. ``prepare(images, labels, surrogate, normalize, generator, indices)`` — attacks with ``needs_surrogate``
   craft their trigger or poisons with a clean model (Trojan, label-consistent).
2. ``poison(images, labels, generator, candidates)`` — choose and transform the training poisons;
   returns a :class:`PoisonedSet` (poisoned indices relabelled unless clean-label; "cover" indices
   keep their labels).
3. ``training_hook(poisoned, device, normalize)`` — optional per-batch hook that changes a training batch
   (and may train a trigger generator with the classifier): ``hook(model, images, labels, batch_index)``.
   ``epoch_hook(model, epoch, poisoned, device, normalize, log)`` runs after every epoch (DFST's
   detoxification); ``finalize(model, images, labels, normalize, generator, log)`` after the last one may
   return a changed model (AWP's weight perturbation).
4. ``apply(images)`` / ``test_set(images, labels)`` — the trigger on test images, vectorised over the
   batch; uint8 in, uint8 out for stamped triggers, float32 pixel values (0–255) out where the trigger is
   too faint for integers (``float_output``, LIRA).

``record()`` returns the trigger info's attack part: the name, the resolved options and ``state()``
(tensors only: patterns, warping fields, generator weights), so ``attack_from_record`` rebuilds any
attack from a ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from utils.errors import OptionError, flag_of

TARGET_TYPES = ("all2one", "all2all")
CANDIDATE_RULES = ("non-target", "all")
ATTACKS: dict[str, type["Attack"]] = {}


class AttackError(OptionError, ValueError):
    """A bad attack option: ``option`` names it (``poison_rate``; ``str()`` gives ``--poison-rate: ...``). A
    flag (``--poison-rate``, as callers wrote it before) is taken as its option."""

    def __init__(self, option: str, detail: str):
        super().__init__(option.lstrip("-").replace("-", "_"), detail)

    @property
    def flag(self) -> str:
        """The option's canonical command-line flag."""
        return flag_of(self.option)


@dataclass(frozen=True)
class Option:
    default: Any
    type: Callable = float
    help: str = ""
    choices: tuple | None = None
    low: float | None = None  # smallest allowed value

    def check(self, name: str, value):
        if value is None:
            return None
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise AttackError(name, f"expected a {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise AttackError(name, f"expected one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.low is not None and value < self.low:
            raise AttackError(name, f"expected at least {self.low}, got {value!r}")
        return value


def option_flag(name: str) -> str:
    """The command-line flag of an attack option (:func:`utils.errors.flag_of`)."""
    return flag_of(name)


def register(cls: type["Attack"]) -> type["Attack"]:
    """Class decorator: make ``cls`` available as ``--poison-type cls.name``."""
    if cls.name in ATTACKS:
        raise ValueError(f"attack {cls.name!r} registered twice")
    for key, option in cls.options.items():
        for other in ATTACKS.values():
            if key in other.options and other.options[key].type is not option.type:
                raise ValueError(f"option {key!r} of {cls.name} has another type than in {other.name}")
    ATTACKS[cls.name] = cls
    return cls


@dataclass
class PoisonedSet:
    images: torch.Tensor  # uint8 N×H×W×C: the attacker's training images, poisons applied
    labels: torch.Tensor
    poison_indices: torch.Tensor  # indices into the given images, sorted
    cover_indices: torch.Tensor  # images that carry (part of) the trigger but keep their labels
    # True: the poisoned images are not part of the shuffled passes over the training set; only the training
    # hook draws them into batches (the released SODA trainer's batch mix).
    drawn_by_hook: bool = False


class Attack:
    name = "base"
    paper = ""
    clean_label = False  # poisons are target-class images that keep their labels
    needs_surrogate = False  # prepare() needs a clean model
    float_output = False  # apply() returns float32 pixel values
    learns_trigger = False  # the trigger changes during training (re-create the poisoned test set per epoch)
    target_types: tuple[str, ...] = ("all2one",)
    has_backdoor = True  # False for a clean model: no ASR to report
    source_class: int | None = None  # the one class the backdoor acts on (semantic attacks), else None
    options: dict[str, Option] = {"poison_rate": Option(0.05, float, "share of the candidate images poisoned")}

    def __init__(self, target: int, num_classes: int, image_shape, target_type: str = "all2one",
                 state: dict | None = None, **options):
        """``state`` (from a trigger info) restores the trigger instead of building it anew."""
        if target_type not in self.target_types:
            raise AttackError("target_type", f"{self.name} supports {' | '.join(self.target_types)}, "
                              f"got {target_type!r}")
        if not 0 <= int(target) < int(num_classes):
            raise AttackError("poison_target", f"{target} is outside the class range 0..{int(num_classes) - 1}")
        unknown = [k for k in options if k not in self.options and options[k] is not None]
        if unknown:
            own = ", ".join(option_flag(k) for k in self.options) or "none"
            raise AttackError(unknown[0], f"not an option of {self.name} (its options: {own})")
        self.target = int(target)
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.target_type = target_type
        self.opts = {k: opt.default for k, opt in self.options.items()}
        self.opts.update({k: self.options[k].check(k, v) for k, v in options.items() if v is not None})
        for key, value in self.opts.items():
            if key.endswith("_rate") and not 0.0 <= value <= 1.0:
                raise AttackError(key, f"{value} is outside [0, 1]")
        if state is None:
            self.build()
        else:
            self.load_state(state)

    # --- construction -----------------------------------------------------------------------
    def build(self) -> None:
        """Make the trigger from the options (deterministic); learnt parts come from prepare/training."""

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the options, re-create the trigger."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned."""

    # --- how stage 1 trains ---------------------------------------------------------------------
    def recipe(self, dataset: str) -> dict:
        """Stage 1's defaults this attack's released trainer implies, overridable by flags: ``augment`` (a name
        in data.AUGMENTATIONS), ``normalization`` (data.NORMALIZATIONS), ``held_out_frac``. Default: none (the
        toolkit's: the dataset's augmentation and normalisation, 10 % held out)."""
        return {}

    def check_training(self, batch_size: int) -> None:
        """Refuse options that do not fit stage 1's batch size (one-line error), before anything is written;
        attacks whose hook composes batches keep the size."""
        self.batch_size = int(batch_size)

    def tune_phase(self) -> tuple[int, float] | None:
        """(epochs, lr) of a tune that follows stage 1's epochs (the released SODA stripet trainer), or None."""
        return None

    def begin_tune(self) -> None:
        """Switch the training hook to the tune phase's batch composition."""

    # --- lifecycle hooks ----------------------------------------------------------------------
    def check_data(self, dataset: str, train_labels: torch.Tensor, test_labels: torch.Tensor) -> None:
        """Refuse a dataset the attack was not made for (one-line error), before anything is written."""

    def arrange_split(self, permutation: torch.Tensor) -> torch.Tensor:
        """The held-out split's order (its first 10% are never poisoned); semantic attacks move their images
        out of the held-out part."""
        return permutation

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, surrogate: torch.nn.Module | None,
                normalize: Callable, generator: torch.Generator, indices: torch.Tensor | None = None) -> None:
        """Craft the trigger or poisons before :meth:`poison`: with the clean ``surrogate`` model where
        ``needs_surrogate`` (else None). ``indices`` are the images' positions in the full training set."""

    def candidate_pool(self, labels: torch.Tensor, candidates: str) -> torch.Tensor:
        """Indices that may be poisoned: data.md's rules (clean-label: the target class)."""
        if candidates not in CANDIDATE_RULES:
            raise AttackError("poison_candidates", f"expected one of {', '.join(CANDIDATE_RULES)}")
        if self.clean_label:
            return (labels == self.target).nonzero().flatten()
        if candidates == "non-target" and self.target_type == "all2one":
            return (labels != self.target).nonzero().flatten()
        return torch.arange(len(labels))

    def choose(self, labels: torch.Tensor, rate: float, generator: torch.Generator,
               candidates: str = "non-target") -> torch.Tensor:
        """``rate`` × (size of the candidate pool) indices drawn from the pool, sorted."""
        pool = self.candidate_pool(labels, candidates)
        return pool[torch.randperm(len(pool), generator=generator)[:int(rate * len(pool))]].sort().values

    def choose_covers(self, labels: torch.Tensor, rate: float, poison: torch.Tensor, generator: torch.Generator,
                      candidates: str = "non-target") -> torch.Tensor:
        """Cover images (trigger, own label): ``rate`` × (size of the candidate pool) indices drawn from every
        image that is not a poison, sorted."""
        pool = torch.arange(len(labels))
        pool = pool[~torch.isin(pool, poison)]
        count = min(len(pool), int(rate * len(self.candidate_pool(labels, candidates))))
        return pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values

    def check_poison_count(self, labels: torch.Tensor, candidates: str = "non-target") -> None:
        """A rate that poisons no image (e.g. a clean-label attack with too few target-class images) is an error."""
        rate = self.opts.get("poison_rate", 0.0)
        pool = len(self.candidate_pool(labels, candidates))
        if rate > 0 and not self.learns_trigger and int(rate * pool) == 0:
            what = "target-class" if self.clean_label else "candidate"
            raise AttackError("poison_rate", f"{rate} of {pool} {what} images poisons none; raise the rate or "
                              f"use more data")

    def poison(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
               candidates: str = "non-target") -> PoisonedSet:
        """Default: trigger on ``poison_rate`` of the candidates, relabelled unless clean-label."""
        self.check_poison_count(labels, candidates)
        indices = self.choose(labels, self.opts.get("poison_rate", 0.0), generator, candidates)
        images, labels = images.clone(), labels.clone()
        if len(indices):
            images[indices] = self.apply(images[indices])
            if not self.clean_label:
                labels[indices] = self.target_labels(labels[indices])
        return PoisonedSet(images, labels, indices, torch.empty(0, dtype=torch.long))

    def training_hook(self, poisoned: PoisonedSet, device, normalize: Callable) -> Callable | None:
        """A per-batch hook ``(model, images, labels, batch_index) -> (images, labels)`` or None.

        ``images`` are the batch's stored training images (uint8, before augmentation), ``batch_index``
        their indices into ``poisoned``; the hook may return float pixel values. ``normalize`` turns
        pixel values into the classifier's input (for hooks that train a generator through it)."""
        return None

    def epoch_hook(self, model: torch.nn.Module, epoch: int, poisoned: PoisonedSet, device, normalize: Callable,
                   log: Callable[[str], None]) -> None:
        """Called after every training epoch of stage 1 (``epoch`` counts from 1): attacks that change how
        they poison as the classifier trains (DFST's detoxification) do it here. Default: nothing."""

    def finalize(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Callable,
                 generator: torch.Generator, log: Callable[[str], None]) -> torch.nn.Module:
        """After stage 1's last epoch: attacks that change the trained model itself (AWP's weight perturbation)
        return the changed model; ``images``/``labels`` are the attacker's training data on the model's device.
        Default: the model unchanged."""
        return model

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Return a triggered copy of uint8 images N×H×W×C."""
        raise NotImplementedError

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels a successful backdoor outputs: the target, or y+1 mod C for all-to-all."""
        if self.target_type == "all2all":
            return (labels + 1) % self.num_classes
        return torch.full_like(labels, self.target)

    def test_set(self, images: torch.Tensor, labels: torch.Tensor):
        """Triggered test images whose true label is not the target (all of them for all-to-all).

        Returns ``(images, target_labels, true_labels)``: ASR is measured against the first,
        robust accuracy (RA) against the second.
        """
        keep = labels != self.target if self.target_type == "all2one" else torch.ones_like(labels, dtype=torch.bool)
        true_labels = labels[keep]
        return self.apply(images[keep]), self.target_labels(true_labels), true_labels

    def clean_test_set(self, images: torch.Tensor, labels: torch.Tensor):
        """The clean test set ACC is measured on: all of it, but for attacks that take test images away."""
        return images, labels

    # --- trigger info -------------------------------------------------------------------------
    def record(self) -> dict:
        return {"attack": self.name, "options": dict(self.opts), "state": self.state(),
                "image_shape": list(self.image_shape), "poison_target": torch.tensor([self.target]),
                "target": self.target, "target_type": self.target_type, "num_classes": self.num_classes}


def create_attack(name: str, target: int, num_classes: int, image_shape, target_type: str = "all2one",
                  **options) -> Attack:
    """Build the registered attack ``name`` (options left out or None take the class's defaults)."""
    if name not in ATTACKS:
        raise AttackError("poison_type", f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
    return ATTACKS[name](target, num_classes, image_shape, target_type, **options)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixel values (0–255) -> uint8, rounded and clipped."""
    return pixels.round().clamp_(0, 255).to(torch.uint8)
