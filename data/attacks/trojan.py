"""Trojan (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018): an optimised additive patch.

x' = clip(x + mask · pattern) with a square ``mask`` in the bottom-right corner. Without
``--trigger-file`` the pattern is optimised on a clean surrogate model (``--clean-model``, or one the
training script trains for ``--surrogate-epochs``) so that it drives one internal neuron strongly:
the neuron of the penultimate layer with the largest outgoing weights (TrojanNN's choice of a
well-connected neuron), by gradient ascent on its mean activation over clean training images.
``--trigger-file`` takes a given pattern instead (RNP ships one as an ``.npz`` with key ``x``,
3×32×32); its non-zero pixels form the mask.

Defaults: 5% of the non-target images poisoned (ANP's rate), target 0, a 7×7 square (our choice: about
a quarter of the image side on CIFAR-10 and Fashion-MNIST), 200 Adam steps.
"""
from __future__ import annotations

import torch

from .base import Attack, AttackError, Option, register
from .blend import load_pattern_file

SURROGATE_OPTIONS = {
    "clean_model": Option(None, str, "clean model of the same --arch/--width for crafting the trigger "
                                     "(default: train one for --surrogate-epochs)"),
    "surrogate_epochs": Option(5, int, "epochs of the clean surrogate model trained when --clean-model is "
                                                     "not given", low=1),
}


def last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the surrogate model has no linear classifier layer")
    return linears[-1]


@register
class Trojan(Attack):
    name = "trojan"
    paper = "Liu et al., Trojaning Attack on Neural Networks, NDSS 2018"
    target_types = ("all2one", "all2all")
    options = {**Attack.options, **SURROGATE_OPTIONS,
               "trigger_size": Option(7, int, "side of the square trigger in pixels", low=1),
               "trigger_file": Option(None, str, "a given additive pattern instead of optimising one"),
               "trojan_steps": Option(200, int, "optimisation steps of the trigger", low=1)}

    @property
    def needs_surrogate(self) -> bool:
        return self.opts["trigger_file"] is None

    def build(self) -> None:
        h, w, c = self.image_shape
        if self.opts["trigger_file"]:
            self.pattern = load_pattern_file(self.opts["trigger_file"], self.image_shape)
            self.mask = (self.pattern > 0).to(torch.float32)
            return
        size = self.opts["trigger_size"]
        if not 0 < size <= min(h, w):
            raise AttackError("trigger_size", f"{size} does not fit a {h}×{w} image")
        self.pattern = torch.zeros(h, w, c, dtype=torch.uint8)  # set by prepare()
        self.mask = torch.zeros(h, w, c)
        self.mask[h - size:, w - size:, :] = 1.0

    def prepare(self, images, labels, surrogate, normalize, generator, indices=None) -> None:
        device = next(surrogate.parameters()).device
        linear = last_linear(surrogate)
        neuron = int(linear.weight.detach().abs().sum(0).argmax())
        features = {}
        handle = linear.register_forward_hook(lambda m, inputs, out: features.__setitem__("x", inputs[0]))
        was_training = surrogate.training
        surrogate.eval()
        grads = [p.requires_grad for p in surrogate.parameters()]
        for p in surrogate.parameters():
            p.requires_grad_(False)
        pick = torch.randperm(len(images), generator=generator)[:256]
        x = images[pick].to(device).float()
        mask = self.mask.to(device)
        theta = torch.zeros(self.image_shape, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([theta], lr=0.1)
        try:
            for _ in range(self.opts["trojan_steps"]):
                pattern = 255 * torch.sigmoid(theta)
                surrogate(normalize((x + mask * pattern).clamp(0, 255)))
                loss = -features["x"][:, neuron].mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            handle.remove()
            surrogate.train(was_training)
            for p, g in zip(surrogate.parameters(), grads):
                p.requires_grad_(g)
        self.pattern = (255 * torch.sigmoid(theta.detach()) * mask).round().to(torch.uint8).cpu()
        self.neuron = neuron

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        added = images.to(torch.int16) + (self.mask * self.pattern.float()).to(images.device, torch.int16)
        return added.clamp_(0, 255).to(torch.uint8)

    def state(self) -> dict:
        return {"pattern": self.pattern.clone(), "mask": self.mask.clone()}

    def load_state(self, state: dict) -> None:
        self.pattern = torch.as_tensor(state["pattern"]).to(torch.uint8)
        self.mask = torch.as_tensor(state["mask"]).to(torch.float32)
