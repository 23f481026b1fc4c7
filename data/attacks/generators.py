"""What the attacks that learn their trigger share: a small image-to-image network, and the plumbing
that keeps it on the training device and moves its weights into and out of the trigger info."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Attack, Option, PoisonedSet


class ImageGenerator(nn.Module):
    """Encoder-decoder (two poolings down, two upsamplings back) from images to ``out_channels`` maps.

    Works at any size (28×28, 32×32): the decoder upsamples to the input's size. Output unbounded;
    the attack decides the squashing (tanh, sigmoid).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.enc1, self.enc2, self.mid = block(in_channels, width), block(width, 2 * width), block(2 * width, 2 * width)
        self.dec2, self.dec1 = block(4 * width, width), block(2 * width, width)
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:]), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:]), e1], 1))
        return self.out(d1)


GENERATOR_OPTIONS = {
    "poison_rate": Option(0.1, float, "share of every training batch poisoned by the generator"),
    "generator_lr": Option(1e-3, float, "Adam learning rate of the trigger generator"),
    "generator_width": Option(16, int, "channels of the trigger generator", low=1),
}


class GeneratorAttack(Attack):
    """An attack whose trigger is ``trigger(x)`` of networks trained with the classifier (per batch).

    Subclasses define ``networks()`` (name -> module), ``trigger(x01)`` on float images in [0, 1]
    (N×C×H×W) and ``train_step(model, x01, labels, normalize)`` that updates the generator and returns
    the batch the classifier trains on. ``apply`` returns float32 pixel values (0–255): the trigger
    may be a fraction of a grey level, so nothing is rounded away.
    """

    float_output = True
    learns_trigger = True
    target_types = ("all2one", "all2all")

    def build(self) -> None:
        with torch.random.fork_rng(devices=[]):  # fixed initial weights, the global RNG untouched
            torch.manual_seed(0)
            self.nets = nn.ModuleDict(self.networks())
        self.device = torch.device("cpu")

    def networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def trigger(self, x01: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.nets.state_dict().items()}

    def load_state(self, state: dict) -> None:
        self.build()
        self.nets.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})

    @torch.no_grad()
    def apply(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        was_training = self.nets.training
        self.nets.eval()
        out = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(self.device).permute(0, 3, 1, 2).float() / 255
            out.append((self.trigger(x) * 255).permute(0, 2, 3, 1).to(images.device))
        self.nets.train(was_training)
        return torch.cat(out) if out else images.float()

    def poison(self, images, labels, generator, candidates="non-target") -> PoisonedSet:
        """Nothing is poisoned ahead of training: every batch is, by the hook."""
        empty = torch.empty(0, dtype=torch.long)
        return PoisonedSet(images.clone(), labels.clone(), empty, empty)

    def training_hook(self, poisoned, device, normalize):
        self.device = torch.device(device)
        self.nets.to(self.device).train()
        self.optimizer = torch.optim.Adam(self.nets.parameters(), lr=self.opts["generator_lr"])

        def hook(model, images, labels, batch_index):
            x01 = images.permute(0, 3, 1, 2).float() / 255
            x01, labels = self.train_step(model, x01, labels, normalize)
            return (x01 * 255).permute(0, 2, 3, 1), labels
        return hook

    def classifier_loss(self, model, x01: torch.Tensor, targets: torch.Tensor, normalize) -> torch.Tensor:
        """Cross-entropy of the classifier on float [0, 1] N×C×H×W images (gradients flow to the input)."""
        return F.cross_entropy(model(normalize((x01 * 255).permute(0, 2, 3, 1))), targets)

    def generator_step(self, loss: torch.Tensor) -> None:
        """Update only the generator; gradients the loss left on the classifier are dropped by its own step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
