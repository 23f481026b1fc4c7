"""GPU throughput numbers for ``benchmarks/gpu_check.sh`` (runs on the CPU too, for its ``--tiny`` mode).

    python benchmarks/bench_gpu.py peak  --device cuda             # measured bf16 matmul TFLOP/s (the "peak")
    python benchmarks/bench_gpu.py train --device cuda --batches 128 512
    python benchmarks/bench_gpu.py anp   --device cuda --iters 2000      # eager, then each compile mode
    python benchmarks/bench_gpu.py rnp   --device cuda                   # the per-batch rule: eager vs deferred
    python benchmarks/bench_gpu.py tiny-grid --dir DIR             # tiny data + a small fmnist_gpu-shaped config

``train``: CIFAR-size (32×32×3) ResNet-18 at ``--width``, random uint8 images resident on the device,
:func:`utils.training.train_epoch` under the runtime every script gets (bf16 autocast and channels_last on
CUDA). One line per variant and batch size: images per second over a timed epoch of ``--images`` images
(after an untimed warm-up epoch that also compiles), TFLOP/s from the model's own FLOP count (forward +
backward, counted by ``torch.utils.flop_counter``), that as a share of the measured bf16 matmul peak of
this device (``peak``), and peak memory. Variants:

- ``baseline``: the loop as the H200 baseline ran it (last partial batch kept, SGD's default foreach step);
- ``static``: every batch full (``last_batch="drop"``) and fused SGD on CUDA (``sgd_with_schedule``);
- ``compile:<mode>``: ``static`` with ``torch.compile`` in that mode (:data:`utils.training.COMPILE_MODES`).

``anp``: seconds of :func:`defenses.anp.optimize_masks` for ``--iters`` iterations (Fashion-MNIST shape,
500 defense images, batch 128) after a few warm-up iterations, and the seconds that makes per 2000; then
the same through ``torch.compile`` in each ``--compile-modes`` mode (a quarter of the iterations).
``rnp``: :func:`defenses.rnp.unlearn` on 600 images, the per-epoch rule and the per-batch rule checked
eagerly and deferred, and whether the deferred check stops at the same batch with the same model.
No number here is asserted anywhere; the tests only run the tiny mode.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import BatchTransform, get_spec  # noqa: E402
from defenses.anp import ANPConfig, optimize_masks  # noqa: E402
from models import create_model  # noqa: E402
from utils.device import make_runtime  # noqa: E402
from utils.training import COMPILE_MODES, compile_model, sgd_with_schedule, train_epoch  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def flop_rate(tflops: float) -> str:
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{1000 * tflops:.1f} GFLOP/s"


def matmul_peak(device: torch.device, size: int, repeat: int = 10) -> float:
    """TFLOP/s of a square matmul: bf16 on CUDA (what autocast runs), fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    seconds = timed(lambda: [a @ b for _ in range(repeat)], device)
    return 2 * size ** 3 * repeat / seconds / 1e12


def flops_per_image(model: torch.nn.Module, shape, device) -> float:
    """Forward + backward FLOPs of one image, as torch's FLOP counter sees the model (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, shape[2], shape[0], shape[1], device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def cmd_peak(args) -> None:
    runtime = make_runtime(args.device)
    size = 512 if args.tiny else 8192
    name = torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu"
    kind = "bf16" if runtime.device.type == "cuda" else "fp32"
    print(f"peak: {name}: {kind} matmul {size}x{size}: {flop_rate(matmul_peak(runtime.device, size))} measured")


def cmd_train(args) -> None:
    runtime = make_runtime(args.device)
    device = runtime.device
    spec = get_spec("cifar10")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, *spec.image_shape), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, spec.num_classes, (args.images,), generator=generator).to(device)
    transform = BatchTransform.named("crop-flip", spec.mean, spec.std, device, channels_last=runtime.channels_last)
    probe = create_model("resnet18", spec.num_classes, 3, args.width).to(device)
    per_image = flops_per_image(probe, spec.image_shape, device)
    del probe
    peak = matmul_peak(device, 512 if args.tiny else 8192)
    print(f"train: {device}, ResNet-18 width {args.width}, 32x32x3, {per_image / 1e9:.2f} GFLOP per image "
          f"(forward + backward), {args.images} images per timed epoch; peak = measured matmul {flop_rate(peak)}",
          flush=True)
    # Eager variants at every batch size first, then each compile mode from the largest batch down: a time
    # limit that stops this run early cuts the compilations, not the baseline numbers.
    runs = [(variant, batch) for variant in ("baseline", "static") for batch in args.batches] + \
        [(f"compile:{mode}", batch) for mode in args.compile_modes for batch in sorted(args.batches, reverse=True)]
    model = optimizer = None
    for variant, batch in runs:
        model = optimizer = None  # the previous variant's memory goes before this one's is taken
        torch.manual_seed(0)
        model = runtime.prepare(create_model("resnet18", spec.num_classes, 3, args.width))
        if variant == "baseline":  # as at the H200 baseline: SGD's default step, the last batch kept
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            last_batch = "keep"
        else:
            optimizer, _ = sgd_with_schedule(model, 0.1, [])
            last_batch = "drop"
        if variant.startswith("compile:"):
            compile_model(model, variant.split(":", 1)[1])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def epoch(n):
            train_epoch(model, images[:n], labels[:n], transform.augment, optimizer, batch, runtime.autocast,
                        torch.Generator().manual_seed(1), progress=False, last_batch=last_batch)
        try:
            # Warm-up (compiles here): full batches and, for "baseline", a partial one, as the timed epoch.
            warm = timed(lambda: epoch(min(args.images, 4 * batch + batch // 2)), device)
            seconds = timed(lambda: epoch(args.images), device)
        except Exception as err:  # noqa: BLE001 - one variant failing (e.g. a compile mode) must not stop the rest
            print(f"train batch {batch} {variant}: failed ({type(err).__name__}: "
                  f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})", flush=True)
            continue
        trained = args.images if last_batch == "keep" or args.images < batch else args.images // batch * batch
        rate = trained / seconds  # images actually stepped on ("drop" leaves the last partial batch out)
        tflops = rate * per_image / 1e12
        memory = (f", peak memory {torch.cuda.max_memory_allocated() / (1 << 30):.2f} GiB"
                  if device.type == "cuda" else "")
        print(f"train batch {batch} {variant}: {rate:,.0f} img/s, {flop_rate(tflops)} = "
              f"{100 * tflops / peak:.1f} % of peak (warm-up and compilation {warm:.1f} s){memory}", flush=True)


def defense_data(runtime, n: int = 600):
    """Fashion-MNIST-shaped random uint8 images and labels on the device, with the training augmentation."""
    spec = get_spec("fashion-mnist")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *spec.image_shape), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, spec.num_classes, (n,), generator=generator)
    transform = BatchTransform.named("crop-flip", spec.mean, spec.std, runtime.device,
                                     channels_last=runtime.channels_last)
    return spec, images.to(runtime.device), labels.to(runtime.device), transform


def cmd_anp(args) -> None:
    """ANP's mask loop: ``--iters`` iterations eagerly, then each ``--compile-modes`` mode for a quarter as many."""
    runtime = make_runtime(args.device)
    device = runtime.device
    spec, images, labels, transform = defense_data(runtime, 500)
    for mode in ["off"] + list(args.compile_modes):
        torch.manual_seed(0)
        model = runtime.prepare(create_model("resnet18", spec.num_classes, 1, args.width, masked=True))
        compile_model(model, mode)
        iters = args.iters if mode == "off" else max(1, args.iters // 4)

        def run(n):
            optimize_masks(model, images, labels, transform.augment, ANPConfig(nb_iter=n, print_every=10 ** 9),
                           runtime.autocast, generator=torch.Generator().manual_seed(1), progress=False)
        try:
            warm = timed(lambda: run(5), device)  # warm-up: cudnn's autotuning, the allocator, compilation
            seconds = timed(lambda: run(iters), device)
        except Exception as err:  # noqa: BLE001 - a compile mode failing must not stop the rest
            print(f"anp {mode}: failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})", flush=True)
            continue
        label = "anp:" if mode == "off" else f"anp compile:{mode}:"
        print(f"{label} {iters} iterations in {seconds:.1f} s ({1000 * seconds / iters:.1f} ms per iteration; "
              f"{2000 * seconds / iters:.1f} s per 2000; warm-up {warm:.1f} s), ResNet-18 width {args.width}, "
              f"Fashion-MNIST shape, batch 128, {device}", flush=True)


def cmd_rnp(args) -> None:
    """RNP's unlearning with the per-batch rule, checked eagerly (a sync per batch) and deferred (the GPU
    default): seconds, and whether both stopped at the same batch with the same model. The model first
    learns the random labels for a few epochs, so that unlearning has an accuracy to bring down."""
    import copy

    from defenses.rnp import RNPConfig, unlearn

    runtime = make_runtime(args.device)
    device = runtime.device
    spec, images, labels, transform = defense_data(runtime, 600)
    torch.manual_seed(0)
    model = runtime.prepare(create_model("resnet18", spec.num_classes, 1, args.width))
    optimizer, _ = sgd_with_schedule(model, 0.05, [])
    for _ in range(args.fit_epochs):
        loss, acc = train_epoch(model, images, labels, transform.normalize, optimizer, 128, runtime.autocast,
                                torch.Generator().manual_seed(0), progress=False)
    print(f"rnp: model fitted to 600 random labels (no augmentation here, nor in unlearning), training accuracy "
          f"{acc:.3f}", flush=True)
    runs = {}
    for name, stop_check, defer, threshold in (("per-epoch", "epoch", None, -1.0),
                                               ("per-batch eager", "batch", False, -1.0),
                                               ("per-batch deferred", "batch", True, -1.0),
                                               ("per-batch eager, stopping", "batch", False, args.threshold),
                                               ("per-batch deferred, stopping", "batch", True, args.threshold)):
        net = copy.deepcopy(model)
        config = RNPConfig(unlearning_epochs=args.epochs, clean_threshold=threshold, stop_check=stop_check)

        def run():
            return unlearn(net, images, labels, transform.normalize, config, runtime.autocast,
                           generator=torch.Generator().manual_seed(1), progress=False, defer_check=defer)
        torch.manual_seed(2)  # the augmentation's draws: the same in every run
        result = [None]
        seconds = timed(lambda: result.__setitem__(0, run()), device)
        runs[name] = (net, result[0])
        r = result[0]
        stop = (f"; stopped in epoch {r.epochs_run} at batch accuracy {r.train_acc:.4f}" if r.stopped else
                f"; not stopped (threshold {threshold})") if threshold >= 0 else ""
        print(f"rnp {name}: {r.epochs_run} epoch(s) of 600 images in {seconds:.2f} s{stop}", flush=True)
    (eager, a), (deferred, b) = runs["per-batch eager, stopping"], runs["per-batch deferred, stopping"]
    diff = max((x.float() - y.float()).abs().max().item() for x, y in
               zip(eager.state_dict().values(), deferred.state_dict().values()))
    print(f"rnp per-batch eager vs deferred: same stop {(a.epochs_run, a.train_acc) == (b.epochs_run, b.train_acc)}, "
          f"largest weight difference {diff:.2e} (0 unless cudnn's algorithms are not deterministic)", flush=True)


def cmd_tiny_grid(args) -> None:
    """Tiny CIFAR-format data and a config of fmnist_gpu's shape (2 attacks x ANP, RNP x 2 rules), 1 seed."""
    import yaml

    from data.cifar_format import write_cifar10

    root = os.path.abspath(args.dir)
    rng = np.random.default_rng(0)
    train_labels, test_labels = rng.integers(0, 10, 600), rng.integers(0, 10, 200)

    def images(labels):
        x = rng.normal(20, 8, size=(len(labels), 32, 32, 3))
        x[:, 8:24, 8:24, :] = (labels[:, None, None, None] * 25) + rng.normal(0, 10, size=(len(labels), 16, 16, 3))
        return np.clip(x, 0, 255).astype(np.uint8)
    write_cifar10(os.path.join(root, "data"), images(train_labels), train_labels, images(test_labels), test_labels)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "configs", "fmnist_gpu.yaml")) as f:
        config = yaml.safe_load(f)
    config.update(name="fmnist_gpu_tiny", output_dir=os.path.join(root, "grid"), dataset="cifar10",
                  data_dir=os.path.join(root, "data"), width=4, device="cpu", seeds=[0], executor="local",
                  train={"epoch": 1, "batch_size": 64}, published=None)
    config["defenses"] = {"anp": {"nb_iter": 3, "print_every": 3, "defense_frac": 0.05},
                          "rnp": {"eval_every": 0, "unlearning_epochs": 1, "recovering_epochs": 1, "schedule": [1],
                                  "defense_frac": 0.05}}
    config = {k: v for k, v in config.items() if v is not None}
    path = os.path.join(root, "fmnist_gpu_tiny.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    print(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("peak", "train", "anp", "rnp", "tiny-grid"))
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="CPU-sized: small matmul, few images")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--images", type=int, default=50_000, help="train: images in the timed epoch")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 512], help="train: batch sizes")
    p.add_argument("--compile-modes", nargs="*", default=["default", "reduce-overhead"],
                   choices=[m for m in COMPILE_MODES if m != "off"], help="train, anp: torch.compile modes to measure")
    p.add_argument("--iters", type=int, default=2000, help="anp: iterations")
    p.add_argument("--epochs", type=int, default=5, help="rnp: unlearning epochs")
    p.add_argument("--fit-epochs", type=int, default=15, help="rnp: epochs fitting the random labels first")
    p.add_argument("--threshold", type=float, default=0.3, help="rnp: the stop rule's accuracy in the stopping runs")
    p.add_argument("--dir", default=None, help="tiny-grid: folder for the data and the config")
    args = p.parse_args(argv)
    {"peak": cmd_peak, "train": cmd_train, "anp": cmd_anp, "rnp": cmd_rnp, "tiny-grid": cmd_tiny_grid}[args.what](args)


if __name__ == "__main__":
    main()
