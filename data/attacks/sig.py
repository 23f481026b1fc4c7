"""SIG (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without label
poisoning", ICIP 2019): a clean-label sinusoidal signal.

x' = clip(x + Δ · sin(2π · j · f / W)) over column j, the same in every row and channel. Only
target-class training images are poisoned and keep their labels; at test the signal is added to the
non-target images. Defaults: Δ = 20 grey levels and f = 6 (the paper's sinusoidal signal), 80% of the
target class poisoned (our choice, the rate ANP's recipe uses for the other clean-label attack).
"""
from __future__ import annotations

import math

import torch

from .base import Attack, Option, register, to_uint8


@register
class SIG(Attack):
    name = "sig"
    paper = "Barni et al., ICIP 2019"
    clean_label = True
    options = {"poison_rate": Option(0.8, float, "share of the target-class images poisoned"),
               "sig_delta": Option(20.0, float, "signal amplitude in grey levels"),
               "sig_freq": Option(6.0, float, "signal frequency (periods over the image width)")}

    def build(self) -> None:
        h, w, c = self.image_shape
        columns = torch.arange(w, dtype=torch.float32)
        wave = self.opts["sig_delta"] * torch.sin(2 * math.pi * columns * self.opts["sig_freq"] / w)
        self.signal = wave.view(1, w, 1).expand(h, w, c).contiguous()

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return to_uint8(images.float() + self.signal.to(images.device))

    def state(self) -> dict:
        return {"signal": self.signal.clone()}

    def load_state(self, state: dict) -> None:
        self.signal = torch.as_tensor(state["signal"]).float()
