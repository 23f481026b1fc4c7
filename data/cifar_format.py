"""Reader and writer of torchvision's CIFAR-10 on-disk format (``cifar-10-batches-py/``).

torchvision's ``CIFAR10`` class checks the files' MD5 sums against the official release, so
small generated datasets in the same format (the tests write them) need a reader that does
not; this one reads the official files and generated ones alike.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    return data, labels


def read_cifar10(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images as uint8 N×32×32×3 and labels as int64 N from ``root/cifar-10-batches-py``."""
    folder = os.path.join(root, FOLDER)
    parts = [_read_batch(os.path.join(folder, name)) for name in (TRAIN_FILES if train else TEST_FILES)]
    images = np.concatenate([p[0] for p in parts]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def has_cifar10(root: str) -> bool:
    folder = os.path.join(root, FOLDER)
    return all(os.path.isfile(os.path.join(folder, n)) for n in TRAIN_FILES + TEST_FILES)


def write_cifar10(root: str, train_images: np.ndarray, train_labels: np.ndarray,
                  test_images: np.ndarray, test_labels: np.ndarray) -> str:
    """Write uint8 N×32×32×3 images in the on-disk format (training set split over five batches)."""
    folder = os.path.join(root, FOLDER)
    os.makedirs(folder, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        data = np.ascontiguousarray(np.asarray(images, np.uint8).transpose(0, 3, 1, 2)).reshape(len(images), -1)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": [int(v) for v in labels],
                         "filenames": [f"{i}.png" for i in range(len(images))]}, f)

    for i, idx in enumerate(np.array_split(np.arange(len(train_images)), len(TRAIN_FILES))):
        dump(TRAIN_FILES[i], train_images[idx], train_labels[idx])
    dump(TEST_FILES[0], test_images, test_labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": len(train_images) // 5, "num_vis": 3072}, f)
    return folder
