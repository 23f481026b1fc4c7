"""Building a registry model for a dataset on a runtime, and loading a checkpoint into it.

``spec`` is anything with ``num_classes`` and ``image_shape`` (H, W, C) — a dataset description — and
``runtime`` anything with ``prepare(model)`` (device, memory format): networks know no dataset.
"""
from __future__ import annotations

from torch import nn

from utils.checkpoint import load_model_checkpoint
from utils.errors import OptionError

from . import ARCHITECTURES, create_model


def check_model_args(arch: str, width: int) -> None:
    """``--arch`` and ``--width`` as one-line errors, before a run writes anything."""
    if arch not in ARCHITECTURES:
        raise OptionError("arch", f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if width <= 0:
        raise OptionError("width", f"expected a positive channel count, got {width}")


def make_model(arch: str, spec, width: int, masked: bool, runtime) -> nn.Module:
    """The registry's ``arch`` for ``spec``'s classes and channels, on the runtime's device."""
    check_model_args(arch, width)
    return runtime.prepare(create_model(arch, spec.num_classes, spec.image_shape[2], width, masked=masked))


def model_description(arch: str, width: int, spec) -> str:
    return f"--arch {arch} --width {width} with {spec.num_classes} classes and {spec.image_shape[2]} input channels"


def load_model(path: str, arch: str, spec, width: int, runtime, masked: bool = False,
               argument: str = "checkpoint") -> nn.Module:
    """``make_model`` then the checkpoint at ``path``; a mismatch is a one-line error naming ``argument``."""
    model = make_model(arch, spec, width, masked, runtime)
    load_model_checkpoint(model, path, model_description(arch, width, spec), argument)
    return model
