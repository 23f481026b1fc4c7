"""SODA's figures: the detection's target scores against the fixed threshold, and reconstructed samples beside
the clean source-class images they came from."""
from __future__ import annotations

import torch

from utils.plots import pyplot, save_figure


def plot_scores(detection: dict, path: str, title: str) -> None:
    test = detection["target_test"]
    values = test["normalized"]
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    colors = ["C3" if i in test["flagged"] else "C0" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(test["threshold"], color="grey", ls="--", lw=1,
               label=f"median + {test['confidence']:g} MAD = {test['threshold']:.3f}")
    ax.axhline(test["median"], color="grey", ls=":", lw=1, label="median")
    ax.set_xticks(range(len(values)))
    ax.set_xlabel("class (red: flagged target)")
    ax.set_ylabel("1 − PCC, divided by its maximum")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_reconstruction(originals: torch.Tensor, reconstructed: torch.Tensor, mean, std, path: str) -> None:
    def pixels(x):
        x = x.float().cpu() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    count = min(12, len(reconstructed))
    fig, axes = pyplot().subplots(2, max(count, 1), figsize=(max(count, 1) * 1.1, 2.6), squeeze=False)
    for row, images in enumerate((pixels(originals[:count]), pixels(reconstructed[:count]))):
        for c in range(count):
            axes[row, c].imshow(images[c].squeeze(), cmap="gray" if images.shape[-1] == 1 else None, vmin=0, vmax=1)
        for c in range(max(count, 1)):
            axes[row, c].set_xticks([])
            axes[row, c].set_yticks([])
        axes[row, 0].set_ylabel(("clean source", "reconstructed")[row], fontsize=8)
    save_figure(fig, path)
