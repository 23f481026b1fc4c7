"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a generator makes each image's trigger.

A pattern network G and a mask network M map an image x to a pattern p(x) ∈ [0, 1] and a near-binary
mask m(x); the poisoned image is x + m(x)·(p(x) − x). Trained per batch with the classifier:
- backdoor: a ``poison_rate`` share of the batch gets its own trigger and the target label;
- cross-trigger: a further ``cross_rate`` share gets the trigger of another image and keeps its label
  (so a trigger only works with the image it was made for);
- diversity: ‖x₁ − x₂‖ / ‖G(x₁) − G(x₂)‖ (weight ``lambda_div``) keeps patterns input-specific;
- mask norm: relu(mean m − ``mask_density``) keeps masks small.
Defaults from the paper: backdoor and cross rates 0.1, λ_div 1, mask density 0.032. Simplification
(ours): the mask network is trained jointly with the pattern network rather than in a separate first
stage; Adam with lr 1e-3 for both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Option, register
from .generators import GENERATOR_OPTIONS, GeneratorAttack, ImageGenerator


@register
class InputAware(GeneratorAttack):
    name = "dynamic"
    paper = "Nguyen & Tran, Input-Aware Dynamic Backdoor Attack, NeurIPS 2020"
    options = {**GENERATOR_OPTIONS,
               "cross_rate": Option(0.1, float, "share of every batch given another image's trigger, label kept"),
               "lambda_div": Option(1.0, float, "weight of the diversity loss"),
               "mask_density": Option(0.032, float, "mean mask value above which the mask is penalised")}

    def networks(self):
        channels = self.image_shape[2]
        width = self.opts["generator_width"]
        return {"pattern": ImageGenerator(channels, channels, width), "mask": ImageGenerator(channels, 1, width)}

    def pattern_and_mask(self, x01: torch.Tensor):
        pattern = (torch.tanh(self.nets["pattern"](x01)) + 1) / 2
        # The original's soft step on a sigmoid output: masks near 0 or 1, with a live gradient at 0.5 (a soft
        # step on the raw output would start at tanh(-10), where no gradient ever turns a mask on).
        mask = (torch.tanh(torch.sigmoid(self.nets["mask"](x01)) * 20 - 10) + 1) / 2
        return pattern, mask

    def trigger(self, x01: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        pattern, mask = self.pattern_and_mask(x01 if source is None else source)
        return x01 + mask * (pattern - x01)

    def train_step(self, model, x01, labels, normalize):
        n = len(labels)
        nb = int(round(self.opts["poison_rate"] * n))
        nc = min(n - nb, int(round(self.opts["cross_rate"] * n)))
        shuffled = x01[torch.randperm(n, device=x01.device)]
        # Generator step: backdoor, cross-trigger and diversity terms through the current classifier.
        pattern, mask = self.pattern_and_mask(x01)
        other_pattern, other_mask = self.pattern_and_mask(shuffled)
        poisoned = x01 + mask * (pattern - x01)
        crossed = x01 + other_mask * (other_pattern - x01)
        targets = self.target_labels(labels)
        loss = self.classifier_loss(model, poisoned[:nb], targets[:nb], normalize) if nb else 0.0
        if nc:
            loss = loss + self.classifier_loss(model, crossed[nb:nb + nc], labels[nb:nb + nc], normalize)
        distance_x = (x01 - shuffled).flatten(1).norm(dim=1)
        distance_p = (pattern - other_pattern).flatten(1).norm(dim=1)
        diversity = (distance_x / (distance_p + 1e-3)).mean()
        mask_norm = F.relu(mask.mean() - self.opts["mask_density"]) * 100
        self.generator_step(loss + self.opts["lambda_div"] * diversity + mask_norm)
        # The classifier's batch: poisoned | cross-trigger | clean, made by the updated generator.
        with torch.no_grad():
            x = x01.clone()
            if nb:
                x[:nb] = self.trigger(x01[:nb])
            if nc:
                x[nb:nb + nc] = self.trigger(x01[nb:nb + nc], source=shuffled[nb:nb + nc])
            labels = labels.clone()
            labels[:nb] = targets[:nb]
        return x, labels
