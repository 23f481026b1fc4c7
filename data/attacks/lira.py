"""LIRA (Doan et al., "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021).

A generator T adds an imperceptible, input-specific trigger: x' = clip(x + ε·tanh(T(x)), 0, 1).
Trained per batch with the classifier, alternating as in LIRA's first stage: a generator step that
makes the current classifier send x' to the target, then a classifier step on the batch in which a
``poison_rate`` share is replaced by x' with the target label. The trigger is a few grey levels, so
the poisoned test set stays float (no rounding to uint8).

Defaults: ε = 0.02 (about 5 grey levels; our choice within "a few grey levels"), 10% of each batch
poisoned (LIRA weighs the clean and poisoned losses over the whole batch instead; a share keeps the
training loop shared with the other attacks), Adam lr 1e-3 for the generator. LIRA's second stage
(fine-tuning the classifier with the generator fixed) is not run.
"""
from __future__ import annotations

import torch

from .base import Option, register
from .generators import GENERATOR_OPTIONS, GeneratorAttack, ImageGenerator


@register
class LIRA(GeneratorAttack):
    name = "lira"
    paper = "Doan et al., ICCV 2021"
    options = {**GENERATOR_OPTIONS, "lira_eps": Option(0.02, float, "trigger bound in [0, 1] pixel units", low=0)}

    def networks(self):
        channels = self.image_shape[2]
        return {"trigger": ImageGenerator(channels, channels, self.opts["generator_width"])}

    def trigger(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 + self.opts["lira_eps"] * torch.tanh(self.nets["trigger"](x01))).clamp(0, 1)

    def train_step(self, model, x01, labels, normalize):
        targets = self.target_labels(labels)
        self.generator_step(self.classifier_loss(model, self.trigger(x01), targets, normalize))
        nb = int(round(self.opts["poison_rate"] * len(labels)))
        with torch.no_grad():
            x, labels = x01.clone(), labels.clone()
            if nb:
                x[:nb] = self.trigger(x01[:nb])
                labels[:nb] = targets[:nb]
        return x, labels
