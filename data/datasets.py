"""Datasets as in-memory uint8 tensors (N×H×W×C) with int64 labels.

Every dataset is one row of :data:`DATASETS`: adding GTSRB or CIFAR-100 later is one loader
function and one row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from utils.errors import OptionError

from .cifar_format import has_cifar10, read_cifar10
from .idx_format import has_idx, read_idx_dataset

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # H, W, C
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # horizontal flip in the training augmentation
    loader: Callable[[str], "Dataset"]


@dataclass
class Dataset:
    train_images: torch.Tensor  # uint8 N×H×W×C
    train_labels: torch.Tensor  # int64 N
    test_images: torch.Tensor
    test_labels: torch.Tensor
    spec: DatasetSpec | None = None


def _load_cifar10(data_dir: str) -> Dataset:
    if not has_cifar10(data_dir):
        try:
            from torchvision.datasets import CIFAR10
            CIFAR10(root=data_dir, train=True, download=True)
        except Exception as err:  # no internet, unwritable directory, ...
            raise OptionError(
                "data_dir", f"CIFAR-10 not found in {os.path.join(data_dir, 'cifar-10-batches-py')} and the download "
                f"failed ({type(err).__name__}); put torchvision's cifar-10-batches-py folder there "
                f"(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)") from None
    train = read_cifar10(data_dir, train=True)
    test = read_cifar10(data_dir, train=False)
    return Dataset(*train, *test)


def _load_fashion_mnist(data_dir: str) -> Dataset:
    candidates = [os.path.join(data_dir, "FashionMNIST", "raw"), os.path.join(data_dir, "fashion-mnist"), data_dir,
                  DEBIAN_FASHION_MNIST]
    folder = next((c for c in candidates if has_idx(c)), None)
    if folder is None:
        try:
            from torchvision.datasets import FashionMNIST
            FashionMNIST(root=data_dir, train=True, download=True)
            FashionMNIST(root=data_dir, train=False, download=True)
            folder = os.path.join(data_dir, "FashionMNIST", "raw")
        except Exception as err:
            raise OptionError(
                "data_dir", f"Fashion-MNIST not found in {data_dir} or {DEBIAN_FASHION_MNIST} and the download failed "
                f"({type(err).__name__}); install it with 'apt-get install dataset-fashion-mnist'") from None
    return Dataset(*read_idx_dataset(folder, train=True), *read_idx_dataset(folder, train=False))


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           True, _load_cifar10),
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), True, _load_fashion_mnist),
}


ALIASES = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}


def get_spec(name: str) -> DatasetSpec:
    """Look up a dataset; case-insensitive, so the RNP tool's ``CIFAR10`` works too."""
    name = ALIASES.get(name.lower(), name.lower())
    if name not in DATASETS:
        raise OptionError("dataset", f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, data_dir: str) -> Dataset:
    """Load ``name`` once into memory; raises :class:`utils.errors.OptionError` (``data_dir``) when it cannot be
    found."""
    spec = get_spec(name)
    dataset = spec.loader(data_dir)
    dataset.spec = spec
    shape = tuple(dataset.train_images.shape[1:])
    if shape != spec.image_shape:
        raise OptionError("data_dir", f"{name} images have shape {shape}, expected {spec.image_shape}")
    return dataset
