import os

import numpy as np
import pytest
import torch

from data import (AUGMENTATIONS, BatchTransform, attacker_indices, defense_indices, held_out_indices, load_dataset,
                  split_permutation)
from data.cifar_format import read_cifar10, write_cifar10
from data.datasets import DEBIAN_FASHION_MNIST, get_spec
from data.idx_format import read_idx_dataset, write_idx
from utils.errors import UserError


def test_split_is_deterministic_and_disjoint():
    a, b = split_permutation(1000, 3), split_permutation(1000, 3)
    assert torch.equal(a, b) and not torch.equal(a, split_permutation(1000, 4))
    held, train = held_out_indices(a), attacker_indices(a)
    assert len(held) == 100 and len(train) == 900
    assert not set(held.tolist()) & set(train.tolist())
    defense = defense_indices(a, 0.01)
    assert len(defense) == 10 and set(defense.tolist()) <= set(held.tolist())
    with pytest.raises(ValueError):
        defense_indices(a, 0.2)


def test_cifar_format_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 20)
    write_cifar10(str(tmp_path), images, labels, images[:5], labels[:5])
    x, y = read_cifar10(str(tmp_path), train=True)
    assert x.dtype == torch.uint8 and x.shape == (20, 32, 32, 3)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    dataset = load_dataset("cifar10", str(tmp_path))
    assert dataset.test_images.shape == (5, 32, 32, 3)


def test_idx_round_trip(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.array([1, 2, 3]))
    x, y = read_idx_dataset(str(tmp_path), train=True)
    assert x.shape == (3, 28, 28, 1) and np.array_equal(x[..., 0].numpy(), images) and y.tolist() == [1, 2, 3]


def test_missing_cifar_without_internet_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def refuse(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", refuse)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))


def test_unknown_dataset_and_aliases():
    with pytest.raises(UserError, match="--dataset"):
        get_spec("imagenet")
    assert get_spec("CIFAR10").name == "cifar10"


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_loads_offline(tmp_path):
    dataset = load_dataset("fashion-mnist", str(tmp_path))
    assert dataset.train_images.shape == (60000, 28, 28, 1) and dataset.test_images.shape == (10000, 28, 28, 1)
    assert dataset.train_labels.max() == 9


def test_batch_transform_normalises_and_augments():
    t = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=True, device="cpu")
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    x = t.normalize(images)
    assert x.shape == (16, 3, 32, 32)
    assert torch.allclose(x, (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25)
    torch.manual_seed(0)
    y = t.augment(images)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # Each augmented image is a shifted (and maybe flipped) copy: every row of a crop, away from
    # the padding, appears in the original.
    no_aug = BatchTransform((0.5,) * 3, (0.25,) * 3, hflip=False, device="cpu", pad=0)
    assert torch.equal(no_aug.augment(images), x)
    const = torch.full((4, 32, 32, 3), 200, dtype=torch.uint8)
    out = t.augment(const)
    pad_value = (0 - 0.5) / 0.25
    assert ((out == pad_value) | torch.isclose(out, torch.tensor((200 / 255 - 0.5) / 0.25))).all()


def test_named_augmentations():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    mean, std = (0.5,) * 3, (0.25,) * 3
    assert set(AUGMENTATIONS) == {"crop-flip", "crop", "none"}
    none = BatchTransform.named("none", mean, std, "cpu")
    assert torch.equal(none.augment(images), none.normalize(images))
    crop = BatchTransform.named("crop", mean, std, "cpu")
    assert (crop.pad, crop.hflip) == (4, False)
    flip = BatchTransform.named("crop-flip", mean, std, "cpu")
    assert (flip.pad, flip.hflip) == (4, True)
    # A crop keeps each image's left-right orientation: a bright left half stays on the left.
    half = torch.zeros(64, 32, 32, 3, dtype=torch.uint8)
    half[:, :, :16] = 255
    torch.manual_seed(0)
    x = crop.augment(half)
    assert (x[:, :, :, :8].mean(dim=(1, 2, 3)) > x[:, :, :, -8:].mean(dim=(1, 2, 3))).all()
    y = flip.augment(half)
    mirrored = y[:, :, :, :8].mean(dim=(1, 2, 3)) < y[:, :, :, -8:].mean(dim=(1, 2, 3))
    assert 0 < int(mirrored.sum()) < 64  # about half the batch is flipped
