"""Pruning by mask values (ANP's stage 3; RNP's phase 3 uses the same code).

Pruning a neuron sets its BatchNorm weight (gamma) to 0 in the original backdoored model; the
bias stays. ``mask_values.txt`` and ``pruning_by_<mode>.txt`` follow the original tools' layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from utils.checkpoint import argument_error, atomic_write_text
from utils.errors import OptionError
from utils.plots import pyplot, save_figure

from .operating_point import OPERATING_POINTS, defense_accuracy_stop

MASK_HEADER = "No \t Layer Name \t Neuron Idx \t Mask Score \n"
PRUNING_HEADER = "No \t Layer Name \t Neuron Idx \t Mask \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC"
PRUNING_MODES = ("threshold", "number")
SWEEP_EVALS = ("incremental", "plain")


def format_mask_values(values: list[tuple[str, int, float]]) -> str:
    lines = [MASK_HEADER] + [f"{i} \t {layer} \t {idx} \t {value:.4f} \n" for i, (layer, idx, value) in enumerate(values)]
    return "".join(lines)


def write_mask_values(values: list[tuple[str, int, float]], path: str) -> None:
    atomic_write_text(format_mask_values(values), path)


def read_mask_values(path: str, argument: str = "mask_file") -> list[tuple[str, int, float]]:
    """Parse a mask file (split on any whitespace, header skipped) into ``(layer, idx, value)``. ``argument``:
    the option that gave ``path`` (or a label: :func:`utils.checkpoint.argument_error`)."""
    if not os.path.isfile(path):
        raise argument_error(argument, f"mask file {path} does not exist")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise argument_error(argument, f"cannot read {path} ({err})") from None
    values = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 4:
                raise ValueError
            values.append((fields[1], int(fields[2]), float(fields[3])))
        except ValueError:
            raise argument_error(argument, f"{path} line {number} is not 'No Layer Idx Mask': "
                                           f"{line.strip()[:80]!r}") from None
    if not values:
        raise argument_error(argument, f"{path} holds no mask values")
    return values


def check_mask_values_fit(model: torch.nn.Module, values, argument: str = "mask_file") -> None:
    """Every named layer must be a BatchNorm of the model with that channel."""
    modules = dict(model.named_modules())
    for layer, idx, _ in values:
        module = modules.get(layer)
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or weight is None or idx >= weight.numel():
            raise argument_error(argument, f"neuron {layer}[{idx}] is not a BatchNorm channel of this model "
                                           f"(check --arch and --width)")


def prune_neuron(model: torch.nn.Module, layer: str, idx: int) -> None:
    with torch.no_grad():
        model.get_submodule(layer).weight[int(idx)] = 0.0


def sort_by_mask(values):
    """Ascending by mask value; ties keep file order (Python's stable sort, as the original)."""
    return sorted(values, key=lambda v: float(v[2]))


@dataclass
class PruningRow:
    pruned: int
    layer: str
    idx: int
    value: float  # the threshold (by threshold) or the last pruned neuron's mask value (by number)
    metrics: dict  # clean_loss, clean_acc, poison_loss, asr, ra

    def line(self, mode: str) -> str:
        m = self.metrics
        first = f"{self.pruned:.2f}" if mode == "threshold" else f"{self.pruned}"
        return (f"{first} \t {self.layer} \t {self.idx} \t {self.value} \t {m['poison_loss']:.4f} \t "
                f"{m['asr']:.4f} \t {m['clean_loss']:.4f} \t {m['clean_acc']:.4f}")


def threshold_grid(pruning_max: float, pruning_step: float) -> list[float]:
    """The original's ``np.arange(0, max + step, step)``, printed as Python prints the float."""
    return [float(t) for t in np.arange(0, pruning_max + pruning_step, pruning_step)]


def prune_sweep(model: torch.nn.Module, values, mode: str, pruning_max: float, pruning_step: float,
                evaluate: Callable[[torch.nn.Module], dict],
                on_row: Callable[[PruningRow], None] | None = None) -> list[PruningRow]:
    """Prune ``model`` cumulatively and evaluate after each step; returns the rows.

    By threshold: for t in 0, step, …, max prune every neuron with mask ≤ t. The layer/index
    columns name the neuron at the pruning boundary, as the original writes them. A threshold that
    prunes nothing new leaves the model as it was, so the previous row's metrics are reused.
    By number: prune ``ceil(step)`` more neurons at a time, up to ``ceil(max)``.
    """
    if mode not in PRUNING_MODES:
        raise OptionError("pruning_by", f"expected one of {PRUNING_MODES}, got {mode!r}")
    values = sort_by_mask(values)
    rows = []
    if mode == "threshold":
        start = 0
        for threshold in threshold_grid(pruning_max, pruning_step):
            while start < len(values) and values[start][2] <= threshold:
                prune_neuron(model, values[start][0], values[start][1])
                start += 1
            layer, idx, _ = values[min(start, len(values) - 1)]
            unchanged = rows and rows[-1].pruned == start
            row = PruningRow(start, layer, idx, threshold, dict(rows[-1].metrics) if unchanged else evaluate(model))
            rows.append(row)
            if on_row:
                on_row(row)
    else:
        nb_max, nb_step = int(np.ceil(pruning_max)), max(int(np.ceil(pruning_step)), 1)
        pruned = 0
        while pruned < min(nb_max, len(values)):
            for layer, idx, _ in values[pruned:min(pruned + nb_step, len(values))]:
                prune_neuron(model, layer, idx)
            pruned = min(pruned + nb_step, len(values))
            layer, idx, value = values[pruned - 1]
            row = PruningRow(pruned, layer, idx, value, evaluate(model))
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def prune_to_threshold(model: torch.nn.Module, values, threshold: float) -> int:
    """Prune every neuron whose mask ≤ ``threshold``; returns how many."""
    chosen = [v for v in values if v[2] <= threshold]
    for layer, idx, _ in chosen:
        prune_neuron(model, layer, idx)
    return len(chosen)


def write_pruning_file(rows: list[PruningRow], mode: str, path: str) -> None:
    atomic_write_text("\n".join([PRUNING_HEADER] + [r.line(mode) for r in rows]) + "\n", path)


def read_pruning_file(path: str) -> list[list[str]]:
    with open(path) as f:
        lines = f.read().splitlines()
    return [line.split() for line in lines[1:] if line.strip()]


def plot_pruning_curve(rows: list[PruningRow], mode: str, path: str, before: dict | None = None,
                       operating_point: float | None = None, title: str = "") -> None:
    xs = [r.value if mode == "threshold" else r.pruned for r in rows]
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.plot(xs, [r.metrics["clean_acc"] for r in rows], "o-", label="ACC (clean test)")
    ax.plot(xs, [r.metrics["asr"] for r in rows], "s-", label="ASR (poisoned test)")
    ax.plot(xs, [r.metrics["ra"] for r in rows], "^-", label="RA (poisoned test)", alpha=0.7)
    if rows and "defense_acc" in rows[0].metrics:
        ax.plot(xs, [r.metrics["defense_acc"] for r in rows], "--", color="C0", alpha=0.6,
                label="ACC (clean defense data)")
    if before is not None:
        ax.axhline(before["clean_acc"], color="C0", ls=":", lw=1, label="ACC before")
        ax.axhline(before["asr"], color="C1", ls=":", lw=1, label="ASR before")
    if operating_point is not None and mode == "threshold":  # None: nothing pruned
        ax.axvline(operating_point, color="grey", ls="--", lw=1, label=f"operating point {operating_point}")
    ax.set_xlabel("pruning threshold (mask value)" if mode == "threshold" else "neurons pruned")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _choose_operating_point(rows: list[PruningRow], values, before: dict, operating_point: str,
                            save_threshold: float, max_acc_drop: float, log) -> tuple[float | None, int, str]:
    """``(threshold, neurons to prune, description)`` of the operating point; threshold None: prune nothing."""
    if operating_point == "fixed":
        return save_threshold, sum(v <= save_threshold for _, _, v in values), f"fixed threshold {save_threshold}"
    index = defense_accuracy_stop(rows, before["defense_acc"], max_acc_drop)
    if index is None:
        log(f"warning: already the first row of the sweep loses more than {max_acc_drop} of defense-data "
            f"accuracy; the operating point is the unpruned model")
        return None, 0, (f"no sweep row keeps the defense-data accuracy within {max_acc_drop} of "
                         f"{before['defense_acc']:.4f}")
    row = rows[index]
    return row.value, row.pruned, (f"defense-data accuracy within {max_acc_drop} of the unpruned model's "
                                   f"({row.metrics['defense_acc']:.4f} vs {before['defense_acc']:.4f})")


def prune_and_report(load_original: Callable[[], torch.nn.Module], values, *, mode: str, pruning_max: float,
                     pruning_step: float, save_threshold: float, evaluate: Callable[[torch.nn.Module], dict],
                     output_dir: str, log: Callable[[str], None], title: str = "",
                     defense_accuracy: Callable[[torch.nn.Module], float] | None = None,
                     operating_point: str = "fixed", max_acc_drop: float = 0.05,
                     sweep_measure: Callable[[torch.nn.Module], Callable[[torch.nn.Module], dict] | None] | None = None
                     ) -> dict:
    """The whole pruning stage: sweep, ``pruning_by_<mode>.txt``, the operating point's
    ``pruned_model.th``, the curve as PNG. Returns the ``before``/``operating_point``/``rows`` metrics.

    ``load_original()`` returns a fresh copy of the backdoored model each call. ``evaluate`` gives the
    test-set metrics (reported only); ``defense_accuracy``, when given, the accuracy on the defender's
    clean data, recorded for every row as ``defense_acc``. The operating point is either the fixed
    ``save_threshold`` (``"fixed"``, 0.2 as in the papers' tables) or the rule of
    :func:`defenses.operating_point.defense_accuracy_stop` (``"defense-acc"``, which needs
    ``defense_accuracy``). Neither looks at the poisoned test set. ``sweep_measure(model)``, when given,
    returns the function that measures the sweep's ``model`` after each row (the same metrics as
    ``evaluate`` and ``defense_accuracy``, computed incrementally), or None to measure plainly.
    """
    from utils.checkpoint import atomic_save, plain_state_dict

    if operating_point not in OPERATING_POINTS:
        raise OptionError("operating_point", f"expected one of {', '.join(OPERATING_POINTS)}, got {operating_point!r}")
    if operating_point == "defense-acc" and defense_accuracy is None:
        raise ValueError("operating_point 'defense-acc' needs defense_accuracy")
    measure = evaluate
    if defense_accuracy is not None:
        measure = lambda m: {**evaluate(m), "defense_acc": defense_accuracy(m)}  # noqa: E731
    model = load_original()
    check_mask_values_fit(model, values)
    measure_row = (sweep_measure(model) if sweep_measure is not None else None) or measure
    before = measure_row(model)
    log(PRUNING_HEADER)
    log(f"0 \t None \t None \t {before['poison_loss']:.4f} \t {before['asr']:.4f} \t "
        f"{before['clean_loss']:.4f} \t {before['clean_acc']:.4f}")
    rows = prune_sweep(model, values, mode, pruning_max, pruning_step, measure_row,
                       on_row=lambda row: log(row.line(mode)))
    write_pruning_file(rows, mode, os.path.join(output_dir, f"pruning_by_{mode}.txt"))
    if defense_accuracy is not None:
        log("clean defense-data accuracy along the sweep: " + ", ".join(
            f"{r.value:g}: {r.metrics['defense_acc']:.4f}" for r in rows) + f" (unpruned {before['defense_acc']:.4f})")

    threshold, pruned, rule = _choose_operating_point(rows, values, before, operating_point, save_threshold,
                                                      max_acc_drop, log)
    purified = load_original()
    for layer, idx, _ in sort_by_mask(values)[:pruned]:  # mask <= threshold: the first ``pruned`` in mask order
        prune_neuron(purified, layer, idx)
    after = measure(purified)
    atomic_save(plain_state_dict(purified), os.path.join(output_dir, "pruned_model.th"))
    shown = "none" if threshold is None else f"{threshold:g}"
    log(f"operating point ({rule}): threshold {shown}, {pruned} neurons pruned: ACC {after['clean_acc']:.4f} "
        f"ASR {after['asr']:.4f} RA {after['ra']:.4f} (before: ACC {before['clean_acc']:.4f} "
        f"ASR {before['asr']:.4f} RA {before['ra']:.4f})")
    plot_pruning_curve(rows, mode, os.path.join(output_dir, f"pruning_by_{mode}.png"), before,
                       threshold, title)
    keys = ("clean_acc", "asr", "ra", "source_acc", "clean_loss", "poison_loss", "defense_acc")
    summary = lambda m: {k: m[k] for k in keys if k in m}  # noqa: E731
    point = {**summary(after), "threshold": threshold, "neurons_pruned": pruned, "neurons_total": len(values),
             "rule": operating_point}
    if operating_point == "defense-acc":
        point["max_acc_drop"] = max_acc_drop
    return {
        "before": summary(before),
        "operating_point": point,
        "rows": [{"pruned": r.pruned, "layer": r.layer, "neuron": r.idx, "value": r.value, **summary(r.metrics)}
                 for r in rows],
    }
