"""Speed of the hot paths against original-style loops, measured in the same run at equal work.

Prints one line per path, ``NAME: original-style A s, ours B s, ratio A/B``:

- ``sweep``: the stage-3 threshold sweep (0, 0.05, ..., 0.9) over the clean and the poisoned test set.
  Original-style, as ANP's ``prune_neuron_cifar.py``: every pruned neuron goes through a ``state_dict``
  round trip, and at every threshold both test sets pass through a DataLoader (batch 128, per-image
  PIL ``ToTensor`` + ``Normalize``). Ours: :func:`defenses.pruning.prune_sweep` with
  :func:`utils.evaluation.backdoor_metrics` on resident uint8 tensors. Same model, masks, images, rows.
- ``anp``: ``--iters`` ANP iterations on the defense images (batch 128, eps 0.4, one step). Original-style:
  a DataLoader drawing with replacement and per-image crop/flip transforms, every weight requiring
  gradients. Ours: :func:`defenses.anp.optimize_masks` (batched augmentation, masks-only gradients).
- ``rnp``: one unlearning epoch and one mask-recovery epoch on the defense images (batch 128).
  Original-style: a shuffling DataLoader with per-image transforms. Ours: :func:`defenses.rnp.unlearn`
  and :func:`defenses.rnp.recover_masks`.
- ``train``: one training epoch (batch 128, SGD). Original-style: a shuffling DataLoader with per-image
  crop/flip transforms. Ours: :func:`utils.training.train_epoch` with batched augmentation on the device.

Images are random uint8 tensors of the dataset's shape: both sides get the same ones, and speed does not
depend on content. One forward and backward pass warms up first; then each side runs once, the
original-style side first.

    python benchmarks/bench_pipeline.py --dataset fashion-mnist --width 16
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import BatchTransform, get_spec  # noqa: E402
from defenses.anp import ANPConfig, optimize_masks  # noqa: E402
from defenses.pruning import prune_sweep, threshold_grid  # noqa: E402
from defenses.rnp import RNPConfig, recover_masks, unlearn  # noqa: E402
from models import clip_masks, create_model, mask_parameters, noise_parameters  # noqa: E402
from models import reset_perturbation, set_perturbation  # noqa: E402
from utils.device import make_runtime  # noqa: E402
from utils.evaluation import EvalSets, backdoor_metrics  # noqa: E402
from utils.training import train_epoch  # noqa: E402

BATCH = 128


class PerImageDataset(torch.utils.data.Dataset):
    """uint8 H×W×C images through torchvision's per-image transforms, as the original tools load data."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec, train: bool):
        from torchvision import transforms

        self.images, self.labels = images.numpy(), labels.numpy()
        steps = [transforms.RandomCrop(spec.image_shape[0], padding=4)] + (
            [transforms.RandomHorizontalFlip()] if spec.hflip else []) if train else []
        self.transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        image = self.images[i]
        return self.transform(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)), int(self.labels[i])


def per_image_loader(images, labels, spec, **kwargs) -> torch.utils.data.DataLoader:
    """The original tools' training loader: per-image crop/flip transforms, batch 128, shuffled by default."""
    kwargs.setdefault("shuffle", "sampler" not in kwargs)
    return torch.utils.data.DataLoader(PerImageDataset(images, labels, spec, True), batch_size=BATCH, **kwargs)


def batched(runtime, spec, images, labels):
    """Ours: the same images resident on the device, augmented in batches there."""
    transform = BatchTransform.named("crop-flip" if spec.hflip else "crop", spec.mean, spec.std, runtime.device,
                                     channels_last=runtime.channels_last)
    return transform, (images.to(runtime.device), labels.to(runtime.device))


def seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def report(name: str, original: float, ours: float) -> None:
    print(f"{name}: original-style {original:.1f} s, ours {ours:.1f} s, ratio {original / ours:.2f}", flush=True)


def original_test(model, loader, device) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            total_loss += F.cross_entropy(out, y).item()
            correct += int((out.argmax(1) == y).sum())
    return total_loss / len(loader), correct / len(loader.dataset)


def original_prune(model, layer: str, idx: int) -> None:
    state = model.state_dict()
    state[f"{layer}.weight"][idx] = 0.0
    model.load_state_dict(state)


def bench_sweep(runtime, spec, model, n_test: int) -> None:
    device = runtime.device
    images = torch.randint(0, 256, (n_test, *spec.image_shape), dtype=torch.uint8)
    labels = torch.randint(0, spec.num_classes, (n_test,))
    poison = images.clone()
    poison[:, -3:, -3:, :] = 255
    targets = torch.zeros_like(labels)
    generator = torch.Generator().manual_seed(0)
    values = [(name, i, float(torch.rand((), generator=generator)))
              for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)
              for i in range(module.num_features)]
    ordered = sorted(values, key=lambda v: v[2])

    def original():
        net = copy.deepcopy(model)
        clean_loader = torch.utils.data.DataLoader(PerImageDataset(images, labels, spec, False), batch_size=BATCH)
        poison_loader = torch.utils.data.DataLoader(PerImageDataset(poison, targets, spec, False), batch_size=BATCH)
        start = 0
        for threshold in threshold_grid(0.9, 0.05):
            while start < len(ordered) and ordered[start][2] <= threshold:
                original_prune(net, ordered[start][0], ordered[start][1])
                start += 1
            original_test(net, clean_loader, device)
            original_test(net, poison_loader, device)

    transform = BatchTransform.named("none", spec.mean, spec.std, device, channels_last=runtime.channels_last)
    sets = EvalSets(images.to(device), labels.to(device), poison.to(device), targets.to(device), labels.to(device))

    def ours():
        prune_sweep(copy.deepcopy(model), values, "threshold", 0.9, 0.05,
                    lambda m: backdoor_metrics(m, sets, transform.normalize, autocast=runtime.autocast))

    report("sweep", seconds(original, device), seconds(ours, device))


def defense_data(spec, n: int):
    return (torch.randint(0, 256, (n, *spec.image_shape), dtype=torch.uint8),
            torch.randint(0, spec.num_classes, (n,)))


def bench_anp(runtime, spec, model, n_defense: int, iters: int) -> None:
    device = runtime.device
    images, labels = defense_data(spec, n_defense)
    config = ANPConfig(nb_iter=iters, batch_size=BATCH, print_every=10 ** 9)

    def original():
        net = copy.deepcopy(model)
        net.train()
        sampler = torch.utils.data.RandomSampler(range(n_defense), replacement=True, num_samples=iters * BATCH)
        loader = per_image_loader(images, labels, spec, sampler=sampler)
        mask_opt = torch.optim.SGD(mask_parameters(net), lr=config.lr, momentum=0.9)
        noise_params = noise_parameters(net)
        noise_opt = torch.optim.SGD(noise_params, lr=config.anp_eps / config.anp_steps)
        for x, y in loader:  # every weight still requires gradients, as in the original
            x, y = x.to(device), y.to(device)
            reset_perturbation(net, rand_init=True, eps=config.anp_eps)
            set_perturbation(net, True)
            noise_opt.zero_grad()
            (-F.cross_entropy(net(x), y)).backward()
            for p in noise_params:
                p.grad = torch.sign(p.grad)
            noise_opt.step()
            mask_opt.zero_grad()
            robust = F.cross_entropy(net(x), y)
            set_perturbation(net, False)
            loss = config.anp_alpha * F.cross_entropy(net(x), y) + (1 - config.anp_alpha) * robust
            loss.backward()
            mask_opt.step()
            clip_masks(net)

    transform, on_device = batched(runtime, spec, images, labels)

    def ours():
        optimize_masks(copy.deepcopy(model), *on_device, transform.augment, config, runtime.autocast,
                       generator=torch.Generator().manual_seed(0), progress=False)

    report("anp", seconds(original, device), seconds(ours, device))


def bench_rnp(runtime, spec, plain, masked, n_defense: int) -> None:
    device = runtime.device
    images, labels = defense_data(spec, n_defense)
    config = RNPConfig(batch_size=BATCH, unlearning_epochs=1, recovering_epochs=1, clean_threshold=-1.0)

    def original():
        loader = per_image_loader(images, labels, spec)
        net = copy.deepcopy(plain).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=config.unlearning_lr, momentum=0.9, weight_decay=5e-4)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = -F.cross_entropy(net(x), y)
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=20)  # before backward, as the original
            loss.backward()
            optimizer.step()
        recovering = copy.deepcopy(masked).train()
        mask_opt = torch.optim.SGD(mask_parameters(recovering), lr=config.recovering_lr, momentum=0.9)
        for x, y in loader:  # every weight still requires gradients, as in the original
            x, y = x.to(device), y.to(device)
            mask_opt.zero_grad()
            (config.alpha * F.cross_entropy(recovering(x), y)).backward()
            mask_opt.step()
            clip_masks(recovering)

    transform, on_device = batched(runtime, spec, images, labels)

    def ours():
        generator = torch.Generator().manual_seed(0)
        unlearn(copy.deepcopy(plain), *on_device, transform.augment, config, runtime.autocast, None, generator,
                progress=False)
        recover_masks(copy.deepcopy(masked), *on_device, transform.augment, config, runtime.autocast, None, generator,
                      progress=False)

    report("rnp", seconds(original, device), seconds(ours, device))


def bench_train(runtime, spec, model, n_train: int) -> None:
    device = runtime.device
    images, labels = defense_data(spec, n_train)

    def original():
        net = copy.deepcopy(model).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        loader = per_image_loader(images, labels, spec)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()

    transform, on_device = batched(runtime, spec, images, labels)

    def ours():
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        train_epoch(net, *on_device, transform.augment, optimizer, BATCH, runtime.autocast,
                    torch.Generator().manual_seed(0), progress=False)

    report("train", seconds(original, device), seconds(ours, device))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dataset", default="fashion-mnist", help="image shape and normalisation: cifar10 | fashion-mnist")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--test-images", type=int, default=500, help="images in each test set of the sweep")
    p.add_argument("--defense-images", type=int, default=500, help="the defender's clean images (ANP, RNP)")
    p.add_argument("--train-images", type=int, default=2000, help="images in the training epoch")
    p.add_argument("--iters", type=int, default=10, help="ANP iterations")
    p.add_argument("--only", nargs="+", choices=["sweep", "anp", "rnp", "train"], default=None)
    args = p.parse_args(argv)
    runtime = make_runtime(args.device)
    spec = get_spec(args.dataset)
    torch.manual_seed(0)
    np.random.seed(0)
    channels = spec.image_shape[2]
    plain = runtime.prepare(create_model("resnet18", spec.num_classes, channels, args.width))
    masked = runtime.prepare(create_model("resnet18", spec.num_classes, channels, args.width, masked=True))
    masked.load_state_dict(plain.state_dict(), strict=False)
    warm = torch.randn(BATCH, channels, *spec.image_shape[:2], device=runtime.device)
    F.cross_entropy(plain(warm), torch.zeros(BATCH, dtype=torch.long, device=runtime.device)).backward()
    plain.zero_grad(set_to_none=True)
    print(f"device {runtime.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{spec.name} ResNet-18 width {args.width}, batch {BATCH}")
    chosen = args.only or ["sweep", "anp", "rnp", "train"]
    if "sweep" in chosen:
        bench_sweep(runtime, spec, plain, args.test_images)
    if "anp" in chosen:
        bench_anp(runtime, spec, masked, args.defense_images, args.iters)
    if "rnp" in chosen:
        bench_rnp(runtime, spec, plain, masked, args.defense_images)
    if "train" in chosen:
        bench_train(runtime, spec, plain, args.train_images)


if __name__ == "__main__":
    main()
