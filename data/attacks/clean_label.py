"""Label-consistent backdoor (Turner, Tsipras & Madry, 2019): hard target-class images plus a patch.

Target-class training images are made hard to classify by an L∞ PGD perturbation (ε = 16 grey levels,
ANP's recipe) computed against a clean surrogate model, then stamped with the four-corner checkerboard
(``checkerboard_4corner``); labels unchanged. At test the four-corner patch alone is stamped on the
non-target images. Defaults (ANP): 80% of the target class poisoned, ε = 16/255; PGD with 10 steps of
ε/4 from the clean image (our choice of steps: Turner et al. use PGD to a fixed budget).

``--clean-model`` gives the surrogate; without it the training script trains one (``--surrogate-epochs``).
``--clb-dir`` takes the original's pre-computed adversarial training set instead (``train_images.npy``
N×H×W×C uint8 and ``train_labels.npy``, in the training set's order).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .badnets import corner_patch
from .base import Attack, AttackError, Option, PoisonedSet, register
from .pattern import blend_rule
from .trojan import SURROGATE_OPTIONS


def pgd_away(model, images: torch.Tensor, labels: torch.Tensor, normalize, eps: float, steps: int,
             batch_size: int = 256) -> torch.Tensor:
    """L∞ PGD that raises the loss of the true labels; uint8 in, uint8 out, within ``eps`` grey levels."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x0 = images[start:start + batch_size].to(device).float()
        y = labels[start:start + batch_size].to(device)
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(normalize(x)), y)
            grad, = torch.autograd.grad(loss, x)
            x = x.detach() + (eps / 4) * grad.sign()
            x = torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0, 255)
        out.append(x.detach().round().to(torch.uint8).cpu())
    model.train(was_training)
    return torch.cat(out) if out else images.clone()


@register
class CleanLabel(Attack):
    name = "clean-label"
    paper = "Turner et al., Label-Consistent Backdoor Attacks, 2019"
    clean_label = True
    options = {"poison_rate": Option(0.8, float, "share of the target-class images poisoned"), **SURROGATE_OPTIONS,
               "pgd_eps": Option(16.0, float, "L-inf budget of the adversarial perturbation, in grey levels", low=0),
               "pgd_steps": Option(10, int, "PGD steps (step size eps/4)", low=0),
               "clb_dir": Option(None, str, "folder with the original's adversarial train_images.npy/train_labels.npy")}

    @property
    def needs_surrogate(self) -> bool:
        return self.opts["clb_dir"] is None

    def build(self) -> None:
        self.pattern, self.mask = corner_patch(self.image_shape, "4corner")

    def prepare(self, images, labels, surrogate, normalize, generator, indices=None) -> None:
        self.surrogate, self.normalize, self.adversarial = surrogate, normalize, None
        folder = self.opts["clb_dir"]
        if folder is None:
            return
        paths = [os.path.join(folder, f"train_{k}.npy") for k in ("images", "labels")]
        for path in paths:
            if not os.path.isfile(path):
                raise AttackError("clb_dir", f"{path} does not exist")
        array = np.load(paths[0], allow_pickle=False)
        total = None if indices is None else int(indices.max()) + 1
        if array.shape[1:] != self.image_shape or (total is not None and len(array) < total):
            raise AttackError("clb_dir", f"train_images.npy has shape {array.shape}; expected the whole training "
                              f"set as N×{'×'.join(map(str, self.image_shape))}")
        array = torch.from_numpy(array.astype(np.uint8))
        self.adversarial = array[indices] if indices is not None else array

    def poison(self, images, labels, generator, candidates="non-target") -> PoisonedSet:
        self.check_poison_count(labels, candidates)
        indices = self.choose(labels, self.opts["poison_rate"], generator, candidates)
        images = images.clone()
        if len(indices):
            if getattr(self, "adversarial", None) is not None:
                hard = self.adversarial[indices]
            else:
                hard = pgd_away(self.surrogate, images[indices], labels[indices], self.normalize,
                                self.opts["pgd_eps"], self.opts["pgd_steps"])
            images[indices] = self.apply(hard)
        return PoisonedSet(images, labels.clone(), indices, torch.empty(0, dtype=torch.long))

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return blend_rule(images, self.pattern, self.mask)

    def state(self) -> dict:
        return {"pattern": self.pattern.clone(), "mask": self.mask.clone()}

    def load_state(self, state: dict) -> None:
        self.pattern = torch.as_tensor(state["pattern"]).to(torch.uint8)
        self.mask = torch.as_tensor(state["mask"]).to(torch.float32)
