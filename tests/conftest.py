"""Shared fixtures: a tiny, easy CIFAR-format dataset written to a temporary directory.

Each class is a distinct colour plus noise, so a narrow network learns it in a few epochs and
the 3×3 corner trigger is easy to learn too; the project's own reader loads it (torchvision's
CIFAR10 class would reject it for its MD5 sums).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread, whatever OMP_NUM_THREADS says: the thread count changes the floating-point
# summation order, and a few SGD steps on a narrow network amplify that into visibly different models
# (golden files at 1e-4, outcome checks). With one thread every numeric verdict is the same on a
# 1-core and a 2-core machine.
torch.set_num_threads(1)

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]], dtype=np.float32)


def make_images(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    # Like Fashion-MNIST: a class-coloured object in the middle of a dark background, so the
    # corner trigger stands out and is learnt within a few hundred steps.
    n = len(labels)
    images = rng.normal(10, 5, size=(n, size, size, 3))
    lo, hi = size // 4, size - size // 4
    images[:, lo:hi, lo:hi, :] = PALETTE[labels][:, None, None, :] + rng.normal(0, 10, size=(n, hi - lo, hi - lo, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


def write_tiny_cifar(root: str, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> str:
    from data.cifar_format import write_cifar10

    rng = np.random.default_rng(seed)
    train_labels = rng.integers(0, 10, n_train)
    test_labels = rng.integers(0, 10, n_test)
    write_cifar10(root, make_images(train_labels, rng), train_labels, make_images(test_labels, rng), test_labels)
    return root


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.txt from this run instead of comparing against them")


@pytest.fixture(scope="session")
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> str:
    return write_tiny_cifar(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def tiny_semantic(tiny_cifar, tmp_path_factory) -> str:
    """A semantic-attack file for the tiny data: 30 training and 8 test images of class 1 "have the
    feature", target 6 (the generated data has no real feature: the lists exercise the plumbing)."""
    import json

    from data import load_dataset

    data = load_dataset("cifar10", tiny_cifar)
    train = (data.train_labels == 1).nonzero().flatten()[:30].tolist()
    test = (data.test_labels == 1).nonzero().flatten()[:8].tolist()
    path = tmp_path_factory.mktemp("semantic") / "toy.json"
    path.write_text(json.dumps({"cifar10": {"toy": {"feature": "listed", "source": 1, "target": 6,
                                                    "train": train, "test": test}}}))
    return str(path)
