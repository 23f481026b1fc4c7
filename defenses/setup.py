"""What every defense stage needs: the model's data transform, the defender's clean data, the
test sets, and the attack (from ``trigger_info.th`` or from command-line options)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data import (AUGMENTATIONS, BatchTransform, DatasetSpec, attack_from_record, create_attack, default_augmentation,
                  defense_indices, get_spec, load_dataset, split_permutation)
from data.attacks import Attack
from data.trigger_info import load_trigger_info
from utils.device import Runtime
from utils.errors import UserError
from utils.evaluation import EvalSets, loss_and_accuracy, predict


@dataclass
class DefenseData:
    spec: DatasetSpec
    transform: BatchTransform
    augmentation: str  # name in data.AUGMENTATIONS used for the defense data
    defense_images: torch.Tensor  # uint8, on the device: the defender's clean data
    defense_labels: torch.Tensor
    eval_sets: EvalSets  # for reporting only; never used to choose anything
    attack: Attack
    trigger_info: dict | None


def make_eval_sets(test_images: torch.Tensor, test_labels: torch.Tensor, attack: Attack, device) -> EvalSets:
    poison_images, poison_targets, poison_true = attack.test_set(test_images, test_labels)
    return EvalSets(test_images.to(device), test_labels.to(device), poison_images.to(device),
                    poison_targets.to(device), poison_true.to(device))


def resolve_dataset_name(requested: str | None, trigger_info: dict | None) -> str:
    recorded = trigger_info.get("dataset") if trigger_info else None
    requested = get_spec(requested).name if requested else None
    if requested and recorded and requested != recorded:
        raise UserError(f"--dataset: {requested!r} differs from the trigger info's dataset {recorded!r}")
    return requested or recorded or "cifar10"


def prepare_defense_data(*, dataset: str | None, data_dir: str, trigger_info_path: str | None, val_frac: float,
                         seed: int, runtime: Runtime, poison_type: str, poison_target: int,
                         attack_options: dict | None = None, target_type: str = "all2one", augment: str | None = None,
                         log=print) -> DefenseData:
    """Load the dataset, the held-out defense split and the poisoned test set for a defense stage.

    The defense data is augmented as the model's training data was (``augmentation`` of the trigger
    info), unless ``augment`` names another augmentation. Without a trigger info the attack is built
    from ``poison_type`` and ``attack_options``; attacks whose trigger is made in training need one.
    """
    trigger_info = load_trigger_info(trigger_info_path) if trigger_info_path else None
    spec = get_spec(resolve_dataset_name(dataset, trigger_info))
    data = load_dataset(spec.name, data_dir)
    if trigger_info is not None:
        attack = attack_from_record(trigger_info)
        permutation = trigger_info.get("split_permutation")
        if permutation is None:
            log(f"trigger info has no recorded split: the held-out clean split is drawn with --seed {seed}")
            permutation = split_permutation(len(data.train_labels), seed)
        attack.num_classes = spec.num_classes
    else:
        attack = create_attack(poison_type, poison_target, spec.num_classes, spec.image_shape, target_type,
                               **(attack_options or {}))
        if attack.needs_surrogate or attack.learns_trigger:
            raise UserError(f"--trigger-info: the {poison_type} trigger is made during training; give the "
                            f"trigger_info.th that train_backdoor_cifar.py wrote")
        log(f"no trigger info given: attack {poison_type} rebuilt from the options; held-out split from --seed {seed}")
        permutation = split_permutation(len(data.train_labels), seed)
    permutation = torch.as_tensor(permutation).long()
    if len(permutation) != len(data.train_labels):
        raise UserError(f"--trigger-info: its split covers {len(permutation)} images, the dataset has "
                        f"{len(data.train_labels)}; was it made for another dataset?")
    if not 0.0 < val_frac <= 0.1:
        raise UserError(f"--val-frac/--ratio: {val_frac} must be in (0, 0.1], the held-out clean part of the training set")
    indices = defense_indices(permutation, val_frac)
    recorded = trigger_info.get("augmentation") if trigger_info else None
    if recorded is not None and recorded not in AUGMENTATIONS:
        raise UserError(f"--trigger-info: unknown augmentation {recorded!r}; expected one of "
                        f"{', '.join(AUGMENTATIONS)}")
    augmentation = augment or recorded or default_augmentation(spec.hflip)
    transform = BatchTransform.named(augmentation, spec.mean, spec.std, runtime.device,
                                     channels_last=runtime.channels_last)
    return DefenseData(
        spec=spec, transform=transform, augmentation=augmentation,
        defense_images=data.train_images[indices].to(runtime.device),
        defense_labels=data.train_labels[indices].to(runtime.device),
        eval_sets=make_eval_sets(data.test_images, data.test_labels, attack, runtime.device),
        attack=attack, trigger_info=trigger_info)


def check_model_args(arch: str, width: int) -> None:
    """``--arch`` and ``--width`` as one-line errors, before a run writes anything."""
    from models import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise UserError(f"--arch: unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if width <= 0:
        raise UserError(f"--width: expected a positive channel count, got {width}")


def make_model(arch: str, spec: DatasetSpec, width: int, masked: bool, runtime: Runtime) -> torch.nn.Module:
    """The registry's ``arch`` for ``spec``'s classes and channels, on the runtime's device."""
    from models import create_model

    check_model_args(arch, width)
    try:
        model = create_model(arch, spec.num_classes, spec.image_shape[2], width, masked=masked)
    except ValueError as err:
        raise UserError(str(err)) from None
    return runtime.prepare(model)


def model_description(arch: str, width: int, spec: DatasetSpec) -> str:
    return f"--arch {arch} --width {width} with {spec.num_classes} classes and {spec.image_shape[2]} input channels"


def defense_accuracy(model: torch.nn.Module, data: DefenseData, autocast=None) -> float:
    """Accuracy on the defender's clean data (unaugmented): what a defender can measure."""
    logits = predict(model, data.defense_images, data.transform.normalize, autocast=autocast)
    return loss_and_accuracy(logits, data.defense_labels)[1]
