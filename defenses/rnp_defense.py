"""RNP (Li et al., ICML 2023) as a registered defense: unlearn the model on the defender's clean data, recover
neuron masks on the unlearned model, prune the backdoored model by them.

Resume points: ``unlearned_model_path`` skips unlearning; a mask file (``inputs.mask_file``) skips unlearning
and recovery. Without a trigger info the attack is named as RNP names it (``trigger_type``, ``target_label``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from utils.checkpoint import atomic_save
from utils.cli import check_positive, check_range
from utils.errors import OptionError
from utils.options import option
from utils.run_log import Timer

from .anp import mask_values
from .options import DefenseDataOptions, PruningOptions
from .pruning import read_mask_values, write_mask_values
from .registry import DefenseInputs, register
from .rnp import STOP_CHECKS, RNPConfig, recover_masks, unlearn
from .session import DefenseRun

# RNP's --trigger_type values that this toolkit implements: (our attack, its options). The trojan trigger
# needs RNP's pattern file and the others RNP offers are made in training: give a trigger info for those.
RNP_TRIGGERS = {"gridTrigger": ("badnets", {"trigger_type": "gridTrigger"}),
                "fourCornerTrigger": ("badnets", {"trigger_type": "checkerboard_4corner"}),
                "blendTrigger": ("blend", {}), "signalTrigger": ("sig", {}), "wanetTrigger": ("wanet", {})}
HEADER = "Epoch \t lr \t Time \t TrainLoss \t TrainACC \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC"


@dataclass
class RNPDefenseConfig(DefenseDataOptions, PruningOptions):
    batch_size: int = option(128, "batch size of unlearning and recovery", aliases=("--batch_size",))
    alpha: float = option(0.2, "weight of the recovery loss")
    clean_threshold: float = option(0.20, "unlearning stops at this training accuracy", aliases=("--clean_threshold",))
    unlearning_lr: float = option(0.01, "unlearning learning rate", aliases=("--unlearning_lr",))
    recovering_lr: float = option(0.2, "mask recovery learning rate", aliases=("--recovering_lr",))
    unlearning_epochs: int = option(20, "largest number of unlearning epochs", aliases=("--unlearning_epochs",))
    recovering_epochs: int = option(20, "mask recovery epochs", aliases=("--recovering_epochs",))
    schedule: list = option([10, 20], "unlearning lr drops 10x at these epochs", type=int)
    stop_check: str = option("epoch", "when the unlearning stop rule is checked: after each epoch on the epoch's "
                             "training accuracy (default, the paper's code) or before each batch's ascent step (a "
                             "variant; the model that meets the rule is kept)", choices=STOP_CHECKS,
                             aliases=("--stop_check",))
    eval_every: int = option(1, "evaluate on the test sets every N epochs of phases 1-2 (0: only at the end of each "
                             "phase)", aliases=("--eval_every",))
    unlearned_model_path: str | None = option(None, "resume: skip phase 1 with this unlearned model", type=str,
                                              aliases=("--unlearned_model_path",), grid=False)
    output_weight: str | None = option(None, "folder for unlearned_model_last.tar (default: the output folder)",
                                       type=str, aliases=("--output_weight",), grid=False)
    trigger_type: str = option("gridTrigger", f"without --trigger-info: {' | '.join(RNP_TRIGGERS)}",
                               aliases=("--trigger_type",), grid=False)
    target_label: int = option(0, "without --trigger-info: the target class", aliases=("--target_label",), grid=False)
    target_type: str = option("all2one", "without --trigger-info: all2one or all2all", choices=("all2one", "all2all"),
                              aliases=("--target_type",), grid=False)

    def __post_init__(self):
        self.check_defense_data()
        self.check_pruning()
        check_range(self.clean_threshold, 0.0, 1.0, "clean_threshold")
        check_range(self.alpha, 0.0, 1.0, "alpha")
        check_positive(self.unlearning_epochs, "unlearning_epochs")
        check_positive(self.recovering_epochs, "recovering_epochs")
        check_positive(self.batch_size, "batch_size")
        if self.trigger_type not in RNP_TRIGGERS:
            raise OptionError("trigger_type", f"{self.trigger_type!r} is not supported; expected one of "
                              f"{', '.join(RNP_TRIGGERS)} (or give --trigger-info)")

    def algorithm(self) -> RNPConfig:
        return RNPConfig(batch_size=self.batch_size, unlearning_lr=self.unlearning_lr,
                         unlearning_epochs=self.unlearning_epochs, schedule=list(self.schedule),
                         clean_threshold=self.clean_threshold, stop_check=self.stop_check,
                         recovering_lr=self.recovering_lr, recovering_epochs=self.recovering_epochs, alpha=self.alpha)

    def attack(self) -> dict:
        """The attack without a trigger info, as keywords of the defender's data."""
        poison_type, options = RNP_TRIGGERS[self.trigger_type]
        return {"poison_type": poison_type, "poison_target": self.target_label, "attack_options": dict(options),
                "target_type": self.target_type}


class _Phases:
    """Phases 1 and 2 with the original's log lines: an epoch row each, test metrics every ``eval_every``."""

    def __init__(self, run: DefenseRun, config: RNPDefenseConfig):
        self.run, self.config, self.timer = run, config, Timer()
        self.data = run.data

    def logger(self, model, rows: list):
        def on_epoch(epoch: int, lr: float, stats: dict) -> None:
            rows.append({"epoch": epoch, "lr": lr, **stats})
            line = (f"{epoch} \t {lr:.4f} \t {self.timer():.1f} \t {stats['train_loss']:.4f} \t "
                    f"{stats['train_acc']:.4f}")
            if self.config.eval_every > 0 and epoch % self.config.eval_every == 0:
                m = self.run.evaluate(model)
                rows[-1].update(m)
                line += (f" \t {m['poison_loss']:.4f} \t {m['asr']:.4f} \t {m['clean_loss']:.4f} \t "
                         f"{m['clean_acc']:.4f}")
            self.run.log(line)
        return on_epoch

    def final_eval(self, model, rows: list) -> dict:
        """The test metrics of the phase's last epoch (evaluated now if that epoch was not)."""
        if "asr" not in rows[-1]:
            rows[-1].update(self.run.evaluate(model))
        return rows[-1]

    def unlearn(self, generator, rows: list) -> tuple[str, dict]:
        run, config, data = self.run, self.config, self.data
        run.log(f"--- phase 1: unlearning on {len(data.defense_labels)} clean images ({data.augmentation}) "
                f"(stop at training accuracy <= {config.clean_threshold}, checked per {config.stop_check})")
        run.log(HEADER)
        model = run.load()
        self.timer = Timer()
        result = unlearn(model, data.defense_images, data.defense_labels, data.transform.augment, config.algorithm(),
                         run.runtime.autocast, self.logger(model, rows), generator, run.inputs.settings.progress)
        if not result.stopped:
            run.log(f"unlearning did not reach training accuracy {config.clean_threshold} in {result.epochs_run} "
                    f"epochs (last {result.train_acc:.4f}); going on with the last unlearned model")
        else:
            run.log(f"unlearning stopped at epoch {result.epochs_run} with training accuracy {result.train_acc:.4f}")
        summary = {"stopped": result.stopped, "stop_epoch": result.epochs_run, "stop_train_acc": result.train_acc,
                   "epoch_train_acc": result.epoch_train_acc, "stop_check": config.stop_check}
        last = self.final_eval(model, rows)
        path = os.path.join(config.output_weight or run.output_dir, "unlearned_model_last.tar")
        atomic_save({"epoch": result.epochs_run, "state_dict": model.state_dict(), "clean_acc": last["clean_acc"],
                     "bad_acc": last["asr"]}, path)
        return path, summary

    def recover(self, unlearned_path: str, generator, rows: list) -> str:
        run, data = self.run, self.data
        run.log("--- phase 2: recovering neuron masks on the unlearned model")
        run.log(HEADER)
        model = run.load(unlearned_path, masked=True, argument="unlearned_model_path")
        self.timer = Timer()
        recover_masks(model, data.defense_images, data.defense_labels, data.transform.augment,
                      self.config.algorithm(), run.runtime.autocast, self.logger(model, rows), generator,
                      run.inputs.settings.progress)
        self.final_eval(model, rows)
        mask_file = os.path.join(run.output_dir, "mask_values.txt")
        write_mask_values(mask_values(model), mask_file)
        run.log(f"wrote {mask_file}")
        return mask_file


@register("rnp", RNPDefenseConfig, steps=("unlearn", "recover", "prune"), prunes=True,
          summary="Reconstructive Neuron Pruning: unlearn, recover masks, prune",
          timings={"unlearn": ("unlearn_seconds",), "recover": ("recover_seconds",), "prune": ("prune_seconds",)})
def run(config: RNPDefenseConfig, inputs: DefenseInputs) -> dict:
    steps = inputs.steps or (("prune",) if inputs.mask_file else ("unlearn", "recover", "prune"))
    if "recover" in steps and "unlearn" not in steps and config.unlearned_model_path is None:
        raise OptionError("unlearned_model_path", "recovering without the unlearn step needs the unlearned model")
    if "unlearn" in steps and "recover" not in steps:
        raise OptionError("steps", "unlearn alone writes no masks: give it with recover")
    if steps == ("prune",) and not inputs.mask_file:
        raise OptionError("mask_file", "pruning alone needs the mask_values.txt of the recover step")
    if "prune" in steps and "recover" not in steps and inputs.mask_file is None:
        raise OptionError("mask_file", "pruning without the recover step needs a mask file")
    attack = {} if inputs.trigger_info else config.attack()
    run = DefenseRun.start(inputs, config, **attack)
    phases = _Phases(run, config)
    generator = torch.Generator().manual_seed(inputs.settings.seed)
    timings, unlearning, recovering, unlearn_summary = {}, [], [], None
    mask_file = inputs.mask_file if "recover" not in steps else None
    if mask_file is None:
        unlearned_path = config.unlearned_model_path
        if unlearned_path is None:
            timer = Timer()
            unlearned_path, unlearn_summary = phases.unlearn(generator, unlearning)
            timings["unlearn_seconds"] = timer()
        else:
            run.log(f"phase 1 skipped: unlearned model {unlearned_path}")
        timer = Timer()
        mask_file = phases.recover(unlearned_path, generator, recovering)
        timings["recover_seconds"] = timer()
    else:
        run.log(f"phases 1 and 2 skipped: mask file {mask_file}")
    results = {}
    if "prune" in steps:
        values = read_mask_values(mask_file, "mask_file")
        run.log("--- phase 3: pruning the backdoored model")
        timer = Timer()
        results = run.prune(lambda: run.load(), values, title="RNP pruning")
        timings["prune_seconds"] = timer()
    return run.finish({**results, "augmentation": run.data.augmentation, "unlearning": unlearn_summary,
                       "unlearning_epochs": unlearning, "recovering_epochs": recovering, "timings": timings,
                       "steps": list(steps)})
