"""Speed of the hot paths, as ratios against a baseline measured in the same run.

1. ANP iteration: masks and perturbations only need gradients (ours) vs every parameter requiring
   gradients (the original tool's way).
2. Training augmentation: batched crop/flip on tensors (ours) vs torchvision's per-image transforms.

    python benchmarks/bench_pipeline.py --device cpu --width 16 --iters 10
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import BatchTransform  # noqa: E402
from defenses.anp import ANPConfig, optimize_masks  # noqa: E402
from models import create_model  # noqa: E402
from utils.device import make_runtime  # noqa: E402


def timed(fn, repeats: int, device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bench_anp(runtime, width: int, iters: int) -> None:
    images = torch.randint(0, 256, (500, 32, 32, 3), dtype=torch.uint8, device=runtime.device)
    labels = torch.randint(0, 10, (500,), device=runtime.device)
    t = BatchTransform((0.5,) * 3, (0.25,) * 3, True, runtime.device, channels_last=runtime.channels_last)
    model = runtime.prepare(create_model("resnet18", 10, 3, width, masked=True))
    config = ANPConfig(nb_iter=iters, print_every=10 ** 9)

    def ours():
        optimize_masks(model, images, labels, t.augment, config, runtime.autocast, progress=False)

    def all_grads():
        import defenses.anp as anp
        saved = anp._freeze_all_but_masks_and_noise
        anp._freeze_all_but_masks_and_noise = lambda m: [p.requires_grad_(True) for p in m.parameters()]
        try:
            optimize_masks(model, images, labels, t.augment, config, runtime.autocast, progress=False)
        finally:
            anp._freeze_all_but_masks_and_noise = saved

    base, new = timed(all_grads, 1, runtime.device), timed(ours, 1, runtime.device)
    print(f"ANP, {iters} iterations, width {width}: all-parameter gradients {base / iters * 1000:.1f} ms/it, "
          f"masks only {new / iters * 1000:.1f} ms/it -> speed-up x{base / new:.2f}")


def bench_augment(runtime, batch: int) -> None:
    from PIL import Image
    from torchvision import transforms

    images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8)
    pil = [Image.fromarray(x.numpy()) for x in images]
    per_image = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)])
    t = BatchTransform((0.5,) * 3, (0.25,) * 3, True, runtime.device)
    on_device = images.to(runtime.device)
    base = timed(lambda: torch.stack([per_image(p) for p in pil]).to(runtime.device), 5, runtime.device)
    new = timed(lambda: t.augment(on_device), 5, runtime.device)
    print(f"augmentation of {batch} images: per-image torchvision {base * 1000:.1f} ms, batched {new * 1000:.2f} ms "
          f"-> speed-up x{base / new:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args()
    runtime = make_runtime(args.device)
    torch.manual_seed(0)
    print(f"device {runtime.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_augment(runtime, args.batch)
    bench_anp(runtime, args.width, args.iters)


if __name__ == "__main__":
    main()
