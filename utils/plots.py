"""Figures written like every other artifact: to a temporary file, then renamed."""
from __future__ import annotations

import os


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    plt = pyplot()
    fig.tight_layout()
    tmp = path + ".part.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
