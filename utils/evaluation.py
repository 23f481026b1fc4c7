"""Evaluation on whole test sets, in large batches without per-step host syncs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .device import eval_batch_size
from .incremental import NotTraceable, predict_folded


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, transform: Callable, batch_size: int | None = None,
            autocast=None) -> torch.Tensor:
    """Logits (float32) of uint8 N×H×W×C ``images``; ``transform`` normalises a batch on the device.
    ``batch_size`` None: :func:`eval_batch_size` of the images' device.

    The model runs with its BatchNorms folded into the convolutions, in channels_last
    (:func:`utils.incremental.predict_folded`; the same logits up to float rounding), or as it is where
    ``torch.fx`` cannot trace it."""
    try:
        return predict_folded(model, images, transform, batch_size, autocast)
    except NotTraceable:
        return predict_plain(model, images, transform, batch_size, autocast)


@torch.inference_mode()
def predict_plain(model: torch.nn.Module, images: torch.Tensor, transform: Callable, batch_size: int | None = None,
                  autocast=None) -> torch.Tensor:
    """:func:`predict` with the model's own forward, batch by batch (the original tools' evaluation)."""
    batch_size = batch_size or eval_batch_size(images.device)
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = transform(images[start:start + batch_size])
        if autocast is not None:
            with autocast():
                outputs.append(model(x).float())
        else:
            outputs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item() if len(labels) else 0.0
    acc = (logits.argmax(1) == labels).float().mean().item() if len(labels) else 0.0
    return loss, acc


@dataclass
class EvalSets:
    """The clean test set and the poisoned test set (uint8 images, or float pixel values, on the device)."""
    clean_images: torch.Tensor
    clean_labels: torch.Tensor
    poison_images: torch.Tensor
    poison_targets: torch.Tensor  # what the backdoor outputs
    poison_true: torch.Tensor  # the images' true classes (for RA)
    source_class: int | None = None  # the class a semantic backdoor acts on: its clean accuracy is reported


def eval_sets_for(attack, test_images: torch.Tensor, test_labels: torch.Tensor, device) -> EvalSets:
    """The clean test set (``attack.clean_test_set``) and ``attack``'s poisoned test set (``attack.test_set``)
    on ``device``."""
    poison_images, poison_targets, poison_true = attack.test_set(test_images, test_labels)
    clean_images, clean_labels = attack.clean_test_set(test_images, test_labels)
    return EvalSets(clean_images.to(device), clean_labels.to(device), poison_images.to(device),
                    poison_targets.to(device), poison_true.to(device), attack.source_class)


def backdoor_metrics(model: torch.nn.Module, sets: EvalSets, transform: Callable, batch_size: int | None = None,
                     autocast=None) -> dict:
    """ACC and clean loss on the clean test set; ASR, RA and poison loss on the poisoned test set; with a
    ``source_class``, that class's accuracy on the clean test set too (``source_acc``)."""
    clean_logits = predict(model, sets.clean_images, transform, batch_size, autocast)
    poison_logits = predict(model, sets.poison_images, transform, batch_size, autocast)
    return metrics_from_logits(clean_logits, poison_logits, sets)


def metrics_from_logits(clean_logits: torch.Tensor, poison_logits: torch.Tensor, sets: EvalSets) -> dict:
    """:func:`backdoor_metrics` from the logits of ``sets``' clean and poisoned images."""
    clean_loss, clean_acc = loss_and_accuracy(clean_logits, sets.clean_labels)
    poison_loss, asr = loss_and_accuracy(poison_logits, sets.poison_targets)
    _, ra = loss_and_accuracy(poison_logits, sets.poison_true)
    metrics = {"clean_loss": clean_loss, "clean_acc": clean_acc, "poison_loss": poison_loss, "asr": asr, "ra": ra}
    if sets.source_class is not None:
        metrics["source_acc"] = class_accuracy(clean_logits, sets.clean_labels, sets.source_class)
    return metrics


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor, cls: int) -> float | None:
    """Accuracy on the images of class ``cls`` (None without any)."""
    chosen = labels.to(logits.device) == cls
    return loss_and_accuracy(logits[chosen], labels[chosen])[1] if chosen.any() else None
