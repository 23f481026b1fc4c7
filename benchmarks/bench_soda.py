"""Speed of SODA's causality analysis against the original's per-neuron loop, measured in the same run.

Prints one line per split point, ``causality-SPLIT: original-style A s, ours B s, ratio A/B``:

- Original-style, as the released ``analyze_hidden``: for every hidden neuron in turn, copy the
  activations, add 1 to that neuron, run the rest of the network and move the logits to the host as a
  numpy array; then average |Δ logit| over the samples.
- Ours: :func:`defenses.soda.intervention_matrix` (neurons batched on the device), and at ``penultimate``
  the closed form |W| that ``soda_main.py`` uses there by default (its line says ``closed form``).

Both sides get the same random images and model (eval mode) and give the same matrix (checked).

    python benchmarks/bench_soda.py --dataset fashion-mnist --width 16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import get_spec  # noqa: E402
from defenses import soda  # noqa: E402
from models import create_model  # noqa: E402
from models.split import split_model  # noqa: E402
from utils.device import make_runtime  # noqa: E402


@torch.no_grad()
def original_style(split, x: torch.Tensor) -> np.ndarray:
    h = split.front(x)
    base = split.back(h).cpu().numpy()
    flat = h.reshape(len(h), -1)
    rows = []
    for i in range(flat.shape[1]):
        bumped = flat.clone()
        bumped[:, i] += 1
        out = split.back(bumped.reshape(h.shape)).cpu().numpy()
        rows.append(np.abs(base - out).mean(0))
    return np.array(rows)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--samples", type=int, default=64, help="samples of one class")
    p.add_argument("--splits", nargs="+", default=["penultimate", "layer4"])
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    runtime = make_runtime(args.device, amp=False)
    spec = get_spec(args.dataset)
    torch.manual_seed(0)
    model = runtime.prepare(create_model("resnet18", spec.num_classes, spec.image_shape[2], args.width)).eval()
    h, w, c = spec.image_shape
    x = torch.randn(args.samples, c, h, w, device=runtime.device)
    for at in args.splits:
        split = split_model(model, at)
        split.back(split.front(x[:2]))  # warm-up
        reference, before = timed(lambda: original_style(split, x))
        ours, after = timed(lambda: soda.intervention_matrix(split, x))
        assert np.allclose(reference, ours.cpu().numpy(), atol=1e-4), f"{at}: the matrices differ"
        print(f"causality-{at}: original-style {before:.3f} s, ours {after:.3f} s, ratio {before / after:.2f}")
        if split.is_head:
            closed, seconds = timed(lambda: soda.closed_form_matrix(split))
            assert np.allclose(reference, closed.cpu().numpy(), atol=1e-4)
            print(f"causality-{at}-closed-form: original-style {before:.3f} s, ours {seconds:.6f} s, "
                  f"ratio {before / max(seconds, 1e-9):.0f}")


if __name__ == "__main__":
    main()
