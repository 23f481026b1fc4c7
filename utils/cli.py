"""Flags shared by every script (kebab-case, with help), and small argument checks."""
from __future__ import annotations

from .errors import UserError


def add_common_args(parser, dataset_default: str | None = "cifar10") -> None:
    parser.add_argument("--arch", default="resnet18",
                        help="resnet18 | resnet34 | resnet50 | vgg19_bn | mobilenetv2 (default resnet18)")
    parser.add_argument("--width", type=int, default=64,
                        help="base channel count (64 as in the papers; 16 or 8 for CPU runs)")
    parser.add_argument("--dataset", default=dataset_default,
                        help="cifar10 | fashion-mnist" + ("" if dataset_default else
                                                          " (default: the trigger info's, else cifar10)"))
    parser.add_argument("--data-dir", default="../data", help="dataset root (torchvision layout)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0, help="seeds every random choice")
    parser.add_argument("--no-amp", dest="amp", action="store_false",
                        help="disable bf16 autocast on CUDA (CPU always runs fp32)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def check_range(value: float, low: float, high: float, name: str) -> None:
    if not low <= value <= high:
        raise UserError(f"{name}: {value} is outside [{low}, {high}]")


def check_positive(value, name: str) -> None:
    if value <= 0:
        raise UserError(f"{name}: expected a positive number, got {value}")
