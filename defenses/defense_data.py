"""The defender's data: the held-out clean split, its augmentation, and the test sets to report on.

The attack comes from ``trigger_info.th`` (or, without one, from command-line options); the clean
defense images are the first ``defense_frac`` × N of the split permutation the trigger info records.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data import AUGMENTATIONS, BatchTransform, DatasetSpec, default_augmentation, defense_indices, get_spec
from data import load_dataset, split_permutation
from data.attacks import Attack, attack_for_defense
from data.splits import HELD_OUT_FRAC
from data.trigger_info import load_trigger_info, recorded_normalization
from utils.device import Runtime
from utils.errors import OptionError
from utils.evaluation import EvalSets, eval_sets_for, loss_and_accuracy, predict


@dataclass
class DefenseData:
    spec: DatasetSpec
    transform: BatchTransform
    augmentation: str  # name in data.AUGMENTATIONS used for the defense data
    normalization: str  # name in data.NORMALIZATIONS the model was trained with (transform applies it)
    defense_images: torch.Tensor  # uint8, on the device: the defender's clean data
    defense_labels: torch.Tensor
    eval_sets: EvalSets  # for reporting only; never used to choose anything
    attack: Attack
    trigger_info: dict | None


def resolve_dataset_name(requested: str | None, trigger_info: dict | None) -> str:
    recorded = trigger_info.get("dataset") if trigger_info else None
    requested = get_spec(requested).name if requested else None
    if requested and recorded and requested != recorded:
        raise OptionError("dataset", f"{requested!r} differs from the trigger info's dataset {recorded!r}")
    return requested or recorded or "cifar10"


def prepare_defense_data(*, dataset: str | None, data_dir: str, trigger_info_path: str | None, defense_frac: float,
                         seed: int, runtime: Runtime, poison_type: str = "badnets", poison_target: int = 0,
                         attack_options: dict | None = None, target_type: str = "all2one", augment: str | None = None,
                         log=print) -> DefenseData:
    """Load the dataset, the held-out defense split and the poisoned test set for a defense stage.

    The defense data is augmented as the model's training data was (``augmentation`` of the trigger
    info), unless ``augment`` names another augmentation. A bad ``defense_frac`` is an error of the option
    ``defense_frac`` (ANP's ``--val-frac``, RNP's and SODA's ``--ratio``).
    """
    if not 0.0 < defense_frac <= 0.1:
        raise OptionError("defense_frac", f"{defense_frac} must be in (0, 0.1], the held-out clean part of the "
                                          f"training set")
    trigger_info = load_trigger_info(trigger_info_path) if trigger_info_path else None
    spec = get_spec(resolve_dataset_name(dataset, trigger_info))
    attack = attack_for_defense(trigger_info, spec.num_classes, spec.image_shape, poison_type=poison_type,
                                poison_target=poison_target, target_type=target_type, options=attack_options)
    recorded = trigger_info.get("augmentation") if trigger_info else None
    if recorded is not None and recorded not in AUGMENTATIONS:
        raise OptionError("trigger_info", f"unknown augmentation {recorded!r}; expected one of "
                                          f"{', '.join(AUGMENTATIONS)}")
    data = load_dataset(spec.name, data_dir)
    attack.check_data(spec.name, data.train_labels, data.test_labels)
    permutation = trigger_info.get("split_permutation") if trigger_info else None
    if trigger_info is None:
        log(f"no trigger info given: attack {poison_type} rebuilt from the options; held-out split from --seed {seed}")
    elif permutation is None:
        log(f"trigger info has no recorded split: the held-out clean split is drawn with --seed {seed}")
    permutation = torch.as_tensor(attack.arrange_split(split_permutation(len(data.train_labels), seed))
                                  if permutation is None else permutation).long()
    if len(permutation) != len(data.train_labels):
        raise OptionError("trigger_info", f"its split covers {len(permutation)} images, the dataset has "
                                          f"{len(data.train_labels)}; was it made for another dataset?")
    held_out = float(trigger_info.get("held_out_frac", HELD_OUT_FRAC)) if trigger_info else HELD_OUT_FRAC
    if held_out == 0:
        log(f"the model was trained on the whole training set (the released SODA trainer): the defender's "
            f"{defense_frac:.0%} are clean training images it has seen, as in the released SODA code")
    elif held_out < defense_frac:
        raise OptionError("defense_frac", f"{defense_frac} is more than the {held_out} of the training set the model "
                                          f"was not trained on (trigger info's held_out_frac)")
    indices = defense_indices(permutation, defense_frac, held_out)
    augmentation = augment or recorded or default_augmentation(spec.hflip)
    normalization, mean, std = recorded_normalization(trigger_info, spec)
    transform = BatchTransform.named(augmentation, mean, std, runtime.device, channels_last=runtime.channels_last)
    return DefenseData(
        spec=spec, transform=transform, augmentation=augmentation, normalization=normalization,
        defense_images=data.train_images[indices].to(runtime.device),
        defense_labels=data.train_labels[indices].to(runtime.device),
        eval_sets=eval_sets_for(attack, data.test_images, data.test_labels, runtime.device),
        attack=attack, trigger_info=trigger_info)


def defense_accuracy(model: torch.nn.Module, data: DefenseData, autocast=None) -> float:
    """Accuracy on the defender's clean data (unaugmented): what a defender can measure."""
    logits = predict(model, data.defense_images, data.transform.normalize, autocast=autocast)
    return loss_and_accuracy(logits, data.defense_labels)[1]
