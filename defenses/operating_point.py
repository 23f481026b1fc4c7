"""Choosing the pruning operating point without the poisoned test set.

The papers prune at a fixed threshold (0.2). How many neurons carry a backdoor varies with the
model (on narrow networks it can be far more than the neurons under 0.2), so this offers one rule a
defender can apply with the clean defense data alone: prune as far along the sweep as the clean
defense accuracy allows, stopping before it first falls more than ``max_acc_drop`` below the
unpruned model's. Nothing here reads the poisoned test set.
"""
from __future__ import annotations

OPERATING_POINTS = ("fixed", "defense-acc")


def defense_accuracy_stop(rows, before_acc: float, max_acc_drop: float) -> int | None:
    """Index of the last sweep row before the defense accuracy first drops more than ``max_acc_drop``
    below ``before_acc`` (rows in sweep order, each ``row.metrics["defense_acc"]``); None if the first
    row already does."""
    chosen = None
    for i, row in enumerate(rows):
        if row.metrics["defense_acc"] < before_acc - max_acc_drop:
            break
        chosen = i
    return chosen
