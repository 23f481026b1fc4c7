"""A PNG grid of clean test images and the same images with each attack's trigger, from trigger infos.

Usage: python3 scripts/show_triggers.py OUT.png SOURCE [SOURCE ...]
SOURCE: a run folder holding trigger_info.th, or the name of an attack with a fixed trigger (built with its
defaults for the first run's dataset, else Fashion-MNIST).
Rows: the clean images, then one row per attack (its poisoned test set, rebuilt from the trigger info alone),
then the amplified difference |poisoned − clean| × 4 of the last attack, to see faint triggers.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data import ATTACKS, attack_from_record, create_attack, get_spec, load_dataset  # noqa: E402
from data.trigger_info import load_trigger_info  # noqa: E402
from utils.plots import pyplot, save_figure  # noqa: E402


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out, sources = argv[0], argv[1:]
    records = [load_trigger_info(os.path.join(r, "trigger_info.th")) if r not in ATTACKS else None for r in sources]
    spec = get_spec(next((r["dataset"] for r in records if r), "fashion-mnist"))
    data = load_dataset(spec.name, "../data")
    pick = torch.arange(8) * 37 + 1
    clean = data.test_images[pick]
    rows = [("clean", clean.float())]
    for source, record in zip(sources, records):
        if record is None:
            rows.append((source, create_attack(source, 0, spec.num_classes, spec.image_shape).apply(clean).float()))
            continue
        parts = os.path.normpath(source).split(os.sep)
        name = parts[-2] if parts[-1] == "backdoor" and len(parts) > 1 else parts[-1]
        rows.append((name, attack_from_record(record).apply(clean).float()))
    rows.append((f"|{rows[-1][0]} − clean| × 4", ((rows[-1][1] - clean.float()).abs() * 4).clamp(0, 255)))
    fig, axes = pyplot().subplots(len(rows), len(pick), figsize=(len(pick) * 1.1, len(rows) * 1.2))
    for r, (name, images) in enumerate(rows):
        for c in range(len(pick)):
            image = images[c].numpy() / 255
            axes[r, c].imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    save_figure(fig, out, dpi=60)


if __name__ == "__main__":
    main()
