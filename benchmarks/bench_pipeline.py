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
  crop/flip transforms. Ours: :func:`utils.training.train_epoch` with batched augmentation on the device;
  with ``--compile`` through ``torch.compile`` (compiled on one batch first, its time printed apart).

Images are random uint8 tensors of the dataset's shape: both sides get the same ones, and speed does not
depend on content. Each side runs in a fresh Python process of its own (the same seeded model and
images), after one forward and backward pass to warm up, the original-style side first, ``--repeat``
times (default 2); the fastest run counts. Ours runs with
what ``make_runtime`` sets up for every script (on the CPU, glibc's allocator keeps freed memory:
:func:`utils.device.keep_freed_host_memory`); the original-style side with the C library's defaults and a
plain fp32, NCHW model, as the original tools run.

    python benchmarks/bench_pipeline.py --dataset fashion-mnist --width 16

The defaults finish on a GPU too (the original-style training side reads about 2,000 images per second
through its per-image loader, whatever the device: 2,000 training images, not a whole training set);
``benchmarks/gpu_check.sh`` runs it at width 64.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import BatchTransform, get_spec  # noqa: E402
from defenses.anp import ANPConfig, optimize_masks  # noqa: E402
from defenses.pruning import check_mask_values_fit, prune_sweep, read_mask_values, threshold_grid  # noqa: E402
from defenses.rnp import RNPConfig, recover_masks, unlearn  # noqa: E402
from models import clip_masks, create_model, mask_parameters, noise_parameters  # noqa: E402
from models import reset_perturbation, set_perturbation  # noqa: E402
from utils.device import Runtime, make_runtime, pick_device  # noqa: E402
from utils.evaluation import EvalSets, metrics_from_logits  # noqa: E402
from utils.incremental import IncrementalPredictor  # noqa: E402
from utils.training import sgd_with_schedule, train_epoch  # noqa: E402

BATCH = 128
PATHS = ("sweep", "anp", "rnp", "train")
SHIPPED_MASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "anp_mask_values_width16.txt")


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


@dataclass
class Side:
    """What one side of one path works on: the same in both processes (seeded)."""
    runtime: Runtime
    spec: object
    plain: torch.nn.Module
    masked: torch.nn.Module
    args: argparse.Namespace

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def images(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randint(0, 256, (n, *self.spec.image_shape), dtype=torch.uint8, generator=generator),
                torch.randint(0, self.spec.num_classes, (n,), generator=generator))

    def time(self, fn) -> float:
        """Seconds of ``fn``: the fastest of ``--repeat`` runs (the first run of a fresh process pays for
        memory the later ones reuse)."""
        return min(seconds(fn, self.device) for _ in range(self.args.repeat))

    def batched(self, images, labels):
        """Ours: the images resident on the device, augmented in batches there."""
        transform = BatchTransform.named("crop-flip" if self.spec.hflip else "crop", self.spec.mean, self.spec.std,
                                         self.device, channels_last=self.runtime.channels_last)
        return transform, (images.to(self.device), labels.to(self.device))


def seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# -- sweep ----------------------------------------------------------------------------------------------------------
def sweep_mask_values(model, mask_file: str | None):
    """(layer, neuron, value) for every BatchNorm channel: from ``mask_file`` (by default the shipped ANP masks
    of a width-16 model, when the model has width 16), else (or with ``uniform``) uniform random values: every
    row then prunes in the first layer, so nothing before it can be kept (our worst case)."""
    channels = {name: module.num_features for name, module in model.named_modules()
                if isinstance(module, torch.nn.BatchNorm2d)}
    if mask_file is None and channels.get("bn1") == 16:
        mask_file = SHIPPED_MASKS
    if mask_file not in (None, "uniform"):
        values = read_mask_values(mask_file)
        check_mask_values_fit(model, values)
        return values, os.path.relpath(mask_file)
    generator = torch.Generator().manual_seed(0)
    return [(name, i, float(torch.rand((), generator=generator))) for name, n in channels.items()
            for i in range(n)], "uniform random mask values"


def sweep_sets(side: Side):
    images, labels = side.images(side.args.test_images, 1)
    poison = images.clone()
    poison[:, -3:, -3:, :] = 255
    return images, labels, poison, torch.zeros_like(labels)


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


def original_sweep(side: Side) -> list:
    images, labels, poison, targets = sweep_sets(side)
    ordered = sorted(sweep_mask_values(side.plain, side.args.mask_file)[0], key=lambda v: v[2])
    rows = []

    def run():
        rows.clear()
        net = copy.deepcopy(side.plain)
        clean_loader = torch.utils.data.DataLoader(PerImageDataset(images, labels, side.spec, False), batch_size=BATCH)
        poison_loader = torch.utils.data.DataLoader(PerImageDataset(poison, targets, side.spec, False),
                                                    batch_size=BATCH)
        start = 0
        for threshold in threshold_grid(0.9, 0.05):
            while start < len(ordered) and ordered[start][2] <= threshold:
                original_prune(net, ordered[start][0], ordered[start][1])
                start += 1
            rows.append(original_test(net, clean_loader, side.device) + original_test(net, poison_loader, side.device))
    return [side.time(run), rows]


def our_sweep(side: Side) -> list:
    images, labels, poison, targets = sweep_sets(side)
    values, source = sweep_mask_values(side.plain, side.args.mask_file)
    device = side.device
    transform = BatchTransform.named("none", side.spec.mean, side.spec.std, device,
                                     channels_last=side.runtime.channels_last)
    sets = EvalSets(images.to(device), labels.to(device), poison.to(device), targets.to(device), labels.to(device))
    rows = []

    def run():
        rows.clear()
        net = copy.deepcopy(side.plain)
        predictor = IncrementalPredictor(net, {"clean": sets.clean_images, "poison": sets.poison_images},
                                         transform.normalize, autocast=side.runtime.autocast)

        def measure(_):
            logits = predictor.logits()
            return metrics_from_logits(logits["clean"], logits["poison"], sets)
        for r in prune_sweep(net, values, "threshold", 0.9, 0.05, measure):
            rows.append((r.metrics["clean_loss"], r.metrics["clean_acc"], r.metrics["poison_loss"], r.metrics["asr"]))
    return [side.time(run), rows, source]


# -- ANP ------------------------------------------------------------------------------------------------------------
def anp_config(side: Side) -> ANPConfig:
    return ANPConfig(nb_iter=side.args.iters, batch_size=BATCH, print_every=10 ** 9)


def original_anp(side: Side) -> list:
    images, labels = side.images(side.args.defense_images, 2)
    config, n = anp_config(side), side.args.defense_images

    def run():
        net = copy.deepcopy(side.masked)
        net.train()
        sampler = torch.utils.data.RandomSampler(range(n), replacement=True, num_samples=config.nb_iter * BATCH)
        loader = per_image_loader(images, labels, side.spec, sampler=sampler)
        mask_opt = torch.optim.SGD(mask_parameters(net), lr=config.lr, momentum=0.9)
        noise_params = noise_parameters(net)
        noise_opt = torch.optim.SGD(noise_params, lr=config.anp_eps / config.anp_steps)
        for x, y in loader:  # every weight still requires gradients, as in the original
            x, y = x.to(side.device), y.to(side.device)
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
    return [side.time(run)]


def our_anp(side: Side) -> list:
    transform, on_device = side.batched(*side.images(side.args.defense_images, 2))
    return [side.time(lambda: optimize_masks(copy.deepcopy(side.masked), *on_device, transform.augment,
                                             anp_config(side), side.runtime.autocast,
                                             generator=torch.Generator().manual_seed(0), progress=False))]


# -- RNP ------------------------------------------------------------------------------------------------------------
RNP_CONFIG = RNPConfig(batch_size=BATCH, unlearning_epochs=1, recovering_epochs=1, clean_threshold=-1.0)


def original_rnp(side: Side) -> list:
    images, labels = side.images(side.args.defense_images, 2)
    config, device = RNP_CONFIG, side.device

    def run():
        loader = per_image_loader(images, labels, side.spec)
        net = copy.deepcopy(side.plain).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=config.unlearning_lr, momentum=0.9, weight_decay=5e-4)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = -F.cross_entropy(net(x), y)
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=20)  # before backward, as the original
            loss.backward()
            optimizer.step()
        recovering = copy.deepcopy(side.masked).train()
        mask_opt = torch.optim.SGD(mask_parameters(recovering), lr=config.recovering_lr, momentum=0.9)
        for x, y in loader:  # every weight still requires gradients, as in the original
            x, y = x.to(device), y.to(device)
            mask_opt.zero_grad()
            (config.alpha * F.cross_entropy(recovering(x), y)).backward()
            mask_opt.step()
            clip_masks(recovering)
    return [side.time(run)]


def our_rnp(side: Side) -> list:
    transform, on_device = side.batched(*side.images(side.args.defense_images, 2))
    autocast = side.runtime.autocast

    def run():
        generator = torch.Generator().manual_seed(0)
        unlearn(copy.deepcopy(side.plain), *on_device, transform.augment, RNP_CONFIG, autocast, None, generator,
                progress=False)
        recover_masks(copy.deepcopy(side.masked), *on_device, transform.augment, RNP_CONFIG, autocast, None,
                      generator, progress=False)
    return [side.time(run)]


# -- training -------------------------------------------------------------------------------------------------------
def original_train(side: Side) -> list:
    images, labels = side.images(side.args.train_images, 3)

    def run():
        net = copy.deepcopy(side.plain).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for x, y in per_image_loader(images, labels, side.spec):
            x, y = x.to(side.device), y.to(side.device)
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    return [side.time(run)]


def our_train(side: Side) -> list:
    transform, (images, labels) = side.batched(*side.images(side.args.train_images, 3))
    net = copy.deepcopy(side.plain)
    optimizer, _ = sgd_with_schedule(net, 0.1, [])  # fused on CUDA; the same plain SGD on the CPU

    def epoch(x, y):
        train_epoch(net, x, y, transform.augment, optimizer, BATCH, side.runtime.autocast,
                    torch.Generator().manual_seed(0), progress=False)
    compiling = []
    if side.args.compile:  # compiled on the first batch, timed apart
        net.compile()
        compiling = [seconds(lambda: epoch(images[:BATCH], labels[:BATCH]), side.device)]
    return [side.time(lambda: epoch(images, labels)), *compiling]


SIDES = {"sweep": (original_sweep, our_sweep), "anp": (original_anp, our_anp), "rnp": (original_rnp, our_rnp),
         "train": (original_train, our_train)}


def run_side(args) -> None:
    """One side of one path, in this process; prints its result as one JSON line."""
    if args.side == "ours":
        runtime = make_runtime(args.device)
    else:  # the original tools: fp32, NCHW, the C library's allocator defaults
        runtime = Runtime(pick_device(args.device), amp=False, channels_last=False)
    spec = get_spec(args.dataset)
    torch.manual_seed(0)
    np.random.seed(0)
    channels = spec.image_shape[2]
    plain = runtime.prepare(create_model("resnet18", spec.num_classes, channels, args.width))
    masked = runtime.prepare(create_model("resnet18", spec.num_classes, channels, args.width, masked=True))
    masked.load_state_dict(plain.state_dict(), strict=False)
    warm = torch.randn(BATCH, channels, *spec.image_shape[:2], device=runtime.device)
    if runtime.channels_last:
        warm = warm.contiguous(memory_format=torch.channels_last)
    with runtime.autocast():  # warm up what the timed runs use (bf16 autocast on CUDA for ours)
        F.cross_entropy(plain(warm), torch.zeros(BATCH, dtype=torch.long, device=runtime.device)).backward()
    plain.zero_grad(set_to_none=True)
    original, ours = SIDES[args.path]
    result = (original if args.side == "original" else ours)(Side(runtime, spec, plain, masked, args))
    print(json.dumps(result))


def run_path(args, argv: list[str], path: str, side: str) -> list:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--path", path, "--side", side]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{path} ({side}) failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dataset", default="fashion-mnist", help="image shape and normalisation: cifar10 | fashion-mnist")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--test-images", type=int, default=500, help="images in each test set of the sweep")
    p.add_argument("--defense-images", type=int, default=500, help="the defender's clean images (ANP, RNP)")
    p.add_argument("--train-images", type=int, default=2000, help="images in the training epoch")
    p.add_argument("--iters", type=int, default=10, help="ANP iterations")
    p.add_argument("--mask-file", default=None,
                   help="mask values for the sweep (default: the shipped width-16 ANP masks at width 16, else "
                        "uniform random values; 'uniform': those at any width)")
    p.add_argument("--repeat", type=int, default=2, help="runs per side; the fastest counts")
    p.add_argument("--compile", action="store_true", help="our training epoch through torch.compile")
    p.add_argument("--only", nargs="+", choices=PATHS, default=None)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # internal: one side of one path
    p.add_argument("--side", choices=("original", "ours"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        run_side(args)
        return
    device = pick_device(args.device)
    spec = get_spec(args.dataset)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{spec.name} ResNet-18 width {args.width}, batch {BATCH}; each side in a process of its own", flush=True)
    for path in args.only or PATHS:
        original, ours = run_path(args, argv, path, "original"), run_path(args, argv, path, "ours")
        print(f"{path}: original-style {original[0]:.1f} s, ours {ours[0]:.1f} s, ratio {original[0] / ours[0]:.2f}",
              flush=True)
        if path == "train" and args.compile:
            print(f"  (torch.compile: compiling on the first batch took {ours[1]:.1f} s)", flush=True)
        if path == "sweep":
            worst = max(abs(a - b) for o, u in zip(original[1], ours[1]) for a, b in zip(o, u))
            print(f"  ({ours[2]}; {len(ours[1])} rows, largest difference from the original-style rows {worst:.1e})",
                  flush=True)


if __name__ == "__main__":
    main()
