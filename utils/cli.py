"""What every stage shares: the run settings (model, data, device, seed) as a typed config, and small checks
that raise :class:`utils.errors.OptionError` naming the option."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import OptionError
from .options import option


def _option(name: str) -> str:
    """``--max-acc-drop`` or ``max_acc_drop`` -> ``max_acc_drop``."""
    return name.lstrip("-").replace("-", "_")


def check_range(value: float, low: float, high: float, name: str) -> None:
    if not low <= value <= high:
        raise OptionError(_option(name), f"{value} is outside [{low}, {high}]")


def check_positive(value, name: str) -> None:
    if value <= 0:
        raise OptionError(_option(name), f"expected a positive number, got {value}")


@dataclass
class RunSettings:
    """Settings of every stage: the model, the data, where it runs, the seed. Stage 1's dataset defaults to
    cifar10; a defense's to the trigger info's."""
    arch: str = option("resnet18", "resnet18 | resnet34 | resnet50 | vgg19_bn | mobilenetv2 (default resnet18)")
    width: int = option(64, "base channel count (64 as in the papers; 16 or 8 for CPU runs)")
    dataset: str | None = option(None, "cifar10 | fashion-mnist (default: the trigger info's, else cifar10)",
                                 type=str)
    data_dir: str = option("../data", "dataset root (torchvision layout)")
    device: str = option("auto", "auto | cpu | cuda")
    seed: int = option(0, "seeds every random choice")
    amp: bool = option(True, "disable bf16 autocast on CUDA (CPU always runs fp32)", flag="--no-amp")
    progress: bool = option(True, "hide progress bars", flag="--no-progress")

    def __post_init__(self):
        check_positive(self.width, "width")
