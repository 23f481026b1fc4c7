"""Reader of the IDX format of MNIST-like datasets (``*-idx3-ubyte[.gz]``)."""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch

FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def has_idx(folder: str) -> bool:
    return all(_find(folder, stem) for pair in FILES.values() for stem in pair)


def read_idx_dataset(folder: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images as uint8 N×H×W×1 and labels as int64 N."""
    image_stem, label_stem = FILES[train]
    images = _read_idx(_find(folder, image_stem))
    labels = _read_idx(_find(folder, label_stem))
    return torch.from_numpy(images.copy()).unsqueeze(-1), torch.from_numpy(labels.astype(np.int64))


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an (uncompressed unless ``path`` ends in .gz) IDX file."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
