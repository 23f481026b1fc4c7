"""Cutting a registry model in two at a named stage: ``front(x)`` gives the hidden activations there,
``back(h)`` the logits from them (SODA's split model).

Every architecture lists its ``stages()`` in forward order (ResNet: stem, layer1 … layer4, pool,
linear). The default split point is the input of the last linear layer (the penultimate features,
after pooling); an earlier stage (``layer4``, ``layer3`` …) gives a deeper split, where every element of
the flattened activation map counts as one hidden neuron, as in the original tool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils.errors import OptionError

PENULTIMATE = "penultimate"


def model_stages(model: nn.Module) -> list:
    stages = getattr(model, "stages", None)
    if stages is None:
        raise OptionError("arch", f"{type(model).__name__} lists no stages(); SODA needs the penultimate features "
                                  f"and the head (a final nn.Linear)")
    return stages()


def split_points(model: nn.Module) -> list[str]:
    """Names ``--split`` accepts for ``model``: ``penultimate`` and every stage before the head."""
    return [PENULTIMATE] + [name for name, _ in model_stages(model)[:-1]]


def head_of(model: nn.Module) -> nn.Linear:
    """The final linear layer (``linear`` in ResNet and MobileNetV2, ``classifier`` in VGG)."""
    name, head = model_stages(model)[-1]
    if not isinstance(head, nn.Linear):
        raise OptionError("arch", f"the last stage {name!r} of {type(model).__name__} is not a linear layer; "
                                  f"no head to split at")
    return head


@dataclass
class SplitModel:
    """``model`` cut after stage ``at``: ``back(front(x)) == model(x)``; ``neurons`` = size of ``front(x)[0]``."""
    model: nn.Module
    at: str
    index: int  # stages[:index + 1] are the front

    def front(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in model_stages(self.model)[:self.index + 1]:
            x = stage(x)
        return x

    def back(self, h: torch.Tensor) -> torch.Tensor:
        for _, stage in model_stages(self.model)[self.index + 1:]:
            h = stage(h)
        return h

    @property
    def is_head(self) -> bool:
        """The back is the head alone (the causality matrix has a closed form)."""
        return self.index == len(model_stages(self.model)) - 2

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits with the hidden neurons multiplied by ``mask`` (flat, one entry per neuron)."""
        h = self.front(x)
        return self.back(h * mask.view(1, *h.shape[1:]).to(h.dtype))


def split_model(model: nn.Module, at: str = PENULTIMATE) -> SplitModel:
    head_of(model)
    names = [name for name, _ in model_stages(model)]
    points = split_points(model)
    if at not in points:
        raise OptionError("split", f"{at!r} is not a stage of {type(model).__name__} before its head; expected one of "
                                   f"{', '.join(points)}")
    index = len(names) - 2 if at == PENULTIMATE else names.index(at)
    return SplitModel(model, at, index)
