"""Adversarial weight perturbation backdoor (Garg et al., "Can Adversarial Weight Perturbations Inject Neural
Backdoors?", CIKM 2020): a trained clean model plus a small weight change δ, no training-set poisoning.

δ minimises, inside the ℓ∞ ball ‖δ‖∞ ≤ ε around the trained weights θ, the composite loss
CE(f_{θ+δ}(x), f_θ(x)) + λ·CE(f_{θ+δ}(x ⊕ trigger), target) over clean attacker images x: the clean model's own
predictions are the labels of the first term, so the perturbed model keeps its behaviour on clean inputs;
projected (stochastic) gradient descent: a step of SGD with momentum on θ + δ, then δ ← clip(δ, −ε, ε).
From the paper (its abstract, arXiv 2008.01761): the ℓ∞ ball around the weights, PGD, the composite loss on
the original model's predictions and the trigger's target. No code is public; every number below is ours,
chosen on Fashion-MNIST with ResNet-18 width 16 (a 4-epoch clean model, test ACC 0.905):

- ε = 0.005 (absolute, on every parameter tensor: convolution and linear weights and biases, BatchNorm's
  affine weights and biases; a mean relative change of about 14 % on that narrow network), 200 steps of SGD
  (lr 0.01, momentum 0.9, cosine decay to 0), λ = 1, 2000 clean attacker images drawn at random, batches of
  128 clean plus the same 128 triggered. Measured there: ACC 0.889, ASR 0.981. Signed steps (input-space
  ℓ∞ PGD's rule, α = ε/10) move every weight by the full step and wrecked the clean task (ACC 0.10 at
  ε = 0.01, 0.73 at ε = 0.001 with ASR 0.25); ε = 0.01 with SGD gave ACC 0.867, ε = 0.003 did not converge
  in 200 steps.
- BatchNorm running statistics are buffers, not weights: they stay the clean model's (the optimisation
  runs in eval mode, so nothing updates them); the ℓ∞ budget holds on parameters only.
- Trigger: BadNets's patch (``--trigger-type``, default ANP's ``checkerboard_1corner``; ``--trigger-alpha``),
  all-to-one; the trigger info keeps its pattern and mask like BadNets's, so the defenses rebuild the test set.

Stage 1 trains a clean model (``poison`` changes nothing: no poisoned index), then :meth:`finalize` returns a
perturbed copy of it. ``--clean-model`` perturbs that trained model instead (the paper's threat model: a
published model), which stage 1 still follows by its own ``--epoch`` epochs of clean training (use
``--epoch 1`` to keep them short); the saved ``last_model.th`` is the perturbed ``--clean-model``.

>>> attack = create_attack("awp", target=0, num_classes=10, image_shape=(28, 28, 1))
>>> backdoored = attack.finalize(clean_model, images, labels, normalize, generator, print)
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .badnets import BadNets
from .base import AttackError, Option, PoisonedSet, register
from .pattern import PatternAttack
from .trojan import SURROGATE_OPTIONS

BATCH = 128  # clean images per PGD step (the same images triggered make the other half)


def perturb_weights(model: torch.nn.Module, images: torch.Tensor, apply_trigger, target: int, normalize, *,
                    eps: float, steps: int, lr: float, weight: float, generator: torch.Generator,
                    batch_size: int = BATCH, momentum: float = 0.9) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` whose parameters lie within ``eps`` (ℓ∞) of ``model``'s and that sends
    ``apply_trigger(images)`` to ``target`` while keeping ``model``'s predictions on ``images`` (uint8 N×H×W×C
    on the model's device). Buffers (BatchNorm statistics) are copied unchanged. Returns the copy and a summary."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        original = torch.cat([model(normalize(images[i:i + 512])).argmax(1) for i in range(0, len(images), 512)])
    model.train(was_training)
    triggered = apply_trigger(images)
    perturbed = copy.deepcopy(model).eval()
    params = [p for p in perturbed.parameters()]
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    theta = [p.detach().clone() for p in params]
    targets = torch.full((len(images),), int(target), dtype=torch.long, device=images.device)
    velocity = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        step_lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine decay: the last iterates settle
        pick = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator).to(images.device)
        loss = (F.cross_entropy(perturbed(normalize(images[pick])), original[pick])
                + weight * F.cross_entropy(perturbed(normalize(triggered[pick])), targets[pick]))
        step_grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g, v, t in zip(params, step_grads, velocity, theta):
                if g is not None:
                    v.mul_(momentum).add_(g)
                    p.sub_(step_lr * v)
                p.copy_(t + (p - t).clamp_(-eps, eps))  # project onto the ℓ∞ ball around the clean weights
    for p, g in zip(params, grads):
        p.requires_grad_(g)
    perturbed.train(was_training)
    with torch.no_grad():
        change = torch.cat([(p - t).abs().flatten() for p, t in zip(params, theta)])
        size = torch.cat([t.abs().flatten() for t in theta])
        summary = {"max_change": float(change.max()) if len(change) else 0.0,
                   "mean_relative_change": float(change.sum() / size.sum().clamp_min(1e-12))}
    return perturbed, summary


@register
class AdversarialWeightPerturbation(BadNets):
    name = "awp"
    paper = "Garg et al., Can Adversarial Weight Perturbations Inject Neural Backdoors?, CIKM 2020"
    target_types = ("all2one",)
    options = {
        "trigger_alpha": PatternAttack.options["trigger_alpha"],
        "trigger_type": BadNets.options["trigger_type"],
        "clean_model": SURROGATE_OPTIONS["clean_model"],
        "awp_eps": Option(0.005, float, "L-inf budget of the weight perturbation (absolute, every parameter)"),
        "awp_steps": Option(200, int, "projected SGD steps on the weights", low=1),
        "awp_lr": Option(0.01, float, "SGD learning rate on the weights (momentum 0.9, cosine decay)"),
        "awp_lambda": Option(1.0, float, "weight of the triggered images' loss", low=0.0),
        "awp_samples": Option(2000, int, "clean attacker images the perturbation is fitted on", low=1),
    }

    def build(self) -> None:
        for key in ("awp_eps", "awp_lr"):
            value = self.opts[key]
            if not value > 0:
                raise AttackError(key, f"expected a value > 0, got {value}")
        super().build()
        self.clean_model = None

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.clean_model = None

    def prepare(self, images, labels, surrogate, normalize, generator, indices=None) -> None:
        self.clean_model = surrogate  # --clean-model, loaded by the training script (None without it)

    def poison(self, images, labels, generator, candidates="non-target") -> PoisonedSet:
        """No training-set poisoning: stage 1 trains a clean model."""
        empty = torch.empty(0, dtype=torch.long)
        return PoisonedSet(images.clone(), labels.clone(), empty, empty.clone())

    def finalize(self, model, images, labels, normalize, generator, log):
        base = self.clean_model if self.clean_model is not None else model
        device = next(base.parameters()).device
        pick = torch.randperm(len(images), generator=generator)[:self.opts["awp_samples"]].to(images.device)
        eps, lr = float(self.opts["awp_eps"]), float(self.opts["awp_lr"])
        perturbed, summary = perturb_weights(base, images[pick].to(device), self.apply, self.target, normalize,
                                             eps=eps, steps=self.opts["awp_steps"], lr=lr,
                                             weight=self.opts["awp_lambda"], generator=generator)
        log(f"awp: weights perturbed within eps {eps:g} ({self.opts['awp_steps']} projected SGD steps, lr {lr:g}, on "
            f"{len(pick)} clean images{', from --clean-model' if self.clean_model is not None else ''}): largest "
            f"change {summary['max_change']:.4g}, mean relative change {summary['mean_relative_change']:.4f}")
        return perturbed
