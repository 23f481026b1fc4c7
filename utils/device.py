"""The one place that decides device, seeding, autocast, channels_last and cudnn.benchmark."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError


@dataclass
class Runtime:
    device: torch.device
    amp: bool  # bf16 autocast (CUDA only; CPU runs plain fp32)
    channels_last: bool

    def autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def make_runtime(name: str = "auto", amp: bool = True) -> Runtime:
    """``auto`` takes CUDA when available. Mixed precision and channels_last only on CUDA."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device: expected auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    device = torch.device(name)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    return Runtime(device=device, amp=on_cuda and amp, channels_last=on_cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
