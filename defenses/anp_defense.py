"""ANP (Wu & Wang, NeurIPS 2021) as a registered defense: optimise neuron masks under adversarial neuron
perturbation on the defender's clean data (``masks``: ``mask_values.txt``), then prune by them (``prune``).

``optimize_mask_cifar.py`` runs the masks step, ``prune_neuron_cifar.py`` the prune step (given the mask
file), the grid both in one cell.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from utils.cli import check_positive, check_range
from utils.errors import OptionError
from utils.options import option
from utils.run_log import Timer

from .anp import BN_MODES, ANPConfig, mask_values, optimize_masks
from .options import DefenseDataOptions, PruningOptions
from .pruning import read_mask_values, write_mask_values
from .registry import DefenseInputs, register
from .session import DefenseRun


@dataclass
class ANPDefenseConfig(DefenseDataOptions, PruningOptions):
    batch_size: int = option(128, "batch size of the mask optimisation", aliases=("--batch_size",))
    lr: float = option(0.2, "mask learning rate (SGD, momentum 0.9)")
    nb_iter: int = option(2000, "number of mask-update iterations", aliases=("--nb_iter",))
    print_every: int = option(500, "evaluate and log every this many iterations", aliases=("--print_every",))
    anp_eps: float = option(0.4, "bound of the neuron perturbation", aliases=("--anp_eps",))
    anp_steps: int = option(1, "perturbation steps per iteration", aliases=("--anp_steps",))
    anp_alpha: float = option(0.2, "weight of the clean loss against the perturbed one", aliases=("--anp_alpha",))
    bn_mode: str = option("train", "BatchNorm during optimisation: train (original, batch statistics) or eval",
                          choices=BN_MODES, aliases=("--bn_mode",))
    project_noise: bool = option(False, "clip the perturbation back into [-eps, eps] after its step (the original "
                                 "does not)", aliases=("--project_noise",))

    def __post_init__(self):
        self.check_defense_data()
        self.check_pruning()
        check_range(self.anp_alpha, 0.0, 1.0, "anp_alpha")
        check_positive(self.nb_iter, "nb_iter")
        check_positive(self.print_every, "print_every")
        check_positive(self.batch_size, "batch_size")
        if self.anp_eps < 0:
            raise OptionError("anp_eps", f"expected a non-negative number, got {self.anp_eps}")

    def algorithm(self) -> ANPConfig:
        return ANPConfig(nb_iter=self.nb_iter, batch_size=self.batch_size, lr=self.lr, anp_eps=self.anp_eps,
                         anp_steps=self.anp_steps, anp_alpha=self.anp_alpha, print_every=self.print_every,
                         bn_mode=self.bn_mode, project_noise=self.project_noise)


def steps_of(inputs: DefenseInputs) -> tuple[str, ...]:
    steps = inputs.steps or (("prune",) if inputs.mask_file else ("masks", "prune"))
    if "prune" in steps and "masks" not in steps and not inputs.mask_file:
        raise OptionError("mask_file", "pruning alone needs the mask_values.txt of the masks step")
    return steps


def optimize(run: DefenseRun, config: ANPDefenseConfig) -> tuple[str, dict]:
    """The masks step: ``mask_values.txt`` in the run folder, and its metrics."""
    data, log, evaluate = run.data, run.log, run.evaluate
    model = run.load(masked=True)
    before = evaluate(model)
    log(f"{data.spec.name}, {len(data.defense_labels)} clean defense images ({data.augmentation}); "
        f"before: ACC {before['clean_acc']:.4f} ASR {before['asr']:.4f} RA {before['ra']:.4f}")
    log("Iter \t lr \t Time \t TrainLoss \t TrainACC \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC")
    timer, reports = Timer(), []

    def report(iteration: int, stats: dict) -> None:
        m = evaluate(model)
        reports.append({"iteration": iteration, "seconds": timer(), **stats, **m})
        log(f"{iteration} \t {config.lr:.3f} \t {timer():.1f} \t {stats['train_loss']:.4f} \t "
            f"{stats['train_acc']:.4f} \t {m['poison_loss']:.4f} \t {m['asr']:.4f} \t {m['clean_loss']:.4f} \t "
            f"{m['clean_acc']:.4f}")

    settings = run.inputs.settings
    optimize_masks(model, data.defense_images, data.defense_labels, data.transform.augment, config.algorithm(),
                   run.runtime.autocast, report, torch.Generator().manual_seed(settings.seed), settings.progress)
    mask_file = os.path.join(run.output_dir, "mask_values.txt")
    values = mask_values(model)
    write_mask_values(values, mask_file)
    low = sum(v <= 0.2 for _, _, v in values)
    log(f"wrote {mask_file}: {len(values)} neurons, {low} with mask <= 0.2 ({timer():.0f} s)")
    return mask_file, {"augmentation": data.augmentation, "before": before, "reports": reports,
                       "neurons": len(values), "neurons_mask_le_0.2": low, "optimize_seconds": timer()}


@register("anp", ANPDefenseConfig, steps=("masks", "prune"), prunes=True,
          summary="Adversarial Neuron Pruning: masks under neuron perturbation, then pruning",
          timings={"masks": ("optimize_seconds",), "prune": ("prune_seconds",)}, attack_flags=True)
def run(config: ANPDefenseConfig, inputs: DefenseInputs) -> dict:
    steps = steps_of(inputs)
    values = read_mask_values(inputs.mask_file, "mask_file") if "masks" not in steps else None
    run = DefenseRun.start(inputs, config)
    metrics, timings = {}, {}
    mask_file = inputs.mask_file
    if "masks" in steps:
        mask_file, found = optimize(run, config)
        timings["optimize_seconds"] = found.pop("optimize_seconds")
        metrics.update(found)
    if "prune" in steps:
        timer = Timer()
        values = values if values is not None else read_mask_values(mask_file, "mask_file")
        metrics.update(run.prune(lambda: run.load(), values, title="ANP pruning"))
        timings["prune_seconds"] = timer()
    return run.finish({**metrics, "timings": timings})
