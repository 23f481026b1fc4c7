"""The seam every defense stands on: one run folder, the defender's data, the model, evaluation.

A :class:`DefenseRun` checks its inputs (trigger info, dataset, the checkpoint's fit) before it writes
anything, then opens the run folder and its log. A defense's ``run`` then only calls its algorithm:

    run = DefenseRun.start(inputs, config)
    model = run.load(inputs.checkpoint, masked=True)
    before = run.evaluate(model)            # ACC / ASR / RA on the whole test sets (reported only)
    ...
    run.finish({...})                       # metrics.json beside output.log
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from models.factory import load_model
from utils.device import Runtime, make_runtime
from utils.evaluation import backdoor_metrics, loss_and_accuracy, metrics_from_logits
from utils.incremental import IncrementalPredictor, NotTraceable
from utils.options import as_dict
from utils.run_log import RunLog, run_metadata, start_run, write_metrics

from .defense_data import DefenseData, defense_accuracy, prepare_defense_data
from .pruning import prune_and_report
from .registry import DefenseInputs


def run_record(inputs: DefenseInputs, config) -> dict:
    """Every option of a run, flat (metrics.json's ``args``; the grid compares it with the planned one)."""
    return {**as_dict(inputs.settings), "checkpoint": inputs.checkpoint, "trigger_info": inputs.trigger_info,
            "output_dir": inputs.output_dir, "mask_file": inputs.mask_file,
            "steps": list(inputs.steps) if inputs.steps else None, **inputs.attack, **as_dict(config)}


@dataclass
class DefenseRun:
    inputs: DefenseInputs
    config: object
    output_dir: str
    runtime: Runtime
    log: RunLog
    data: DefenseData
    record: dict

    @classmethod
    def start(cls, inputs: DefenseInputs, config, *, check: Callable[[DefenseData], None] | None = None,
              **attack) -> "DefenseRun":
        """Check everything (data, attack, the checkpoint fits the arch and width, the defense's own ``check``
        of the defender's data), then open the run folder. ``attack`` overrides ``inputs.attack``."""
        settings = inputs.settings
        runtime = make_runtime(settings.device, settings.amp)
        messages: list[str] = []
        data = prepare_defense_data(dataset=settings.dataset, data_dir=settings.data_dir,
                                    trigger_info_path=inputs.trigger_info, defense_frac=config.defense_frac,
                                    seed=settings.seed, runtime=runtime, augment=config.augment,
                                    log=messages.append, **{**inputs.attack, **attack})
        load_model(inputs.checkpoint, settings.arch, data.spec, settings.width, runtime, argument="checkpoint")
        if check is not None:
            check(data)
        record = run_record(inputs, config)
        runtime, log = start_run(record, inputs.output_dir, runtime)
        for message in messages:
            log(message)
        return cls(inputs, config, inputs.output_dir, runtime, log, data, record)

    def load(self, path: str | None = None, masked: bool = False, argument: str = "checkpoint") -> torch.nn.Module:
        """The model at ``path`` (default: the run's checkpoint) on the run's device."""
        settings = self.inputs.settings
        return load_model(path or self.inputs.checkpoint, settings.arch, self.data.spec, settings.width,
                          self.runtime, masked, argument)

    def evaluate(self, model: torch.nn.Module) -> dict:
        """ACC, ASR, RA and losses on the whole clean and poisoned test sets: for reporting only."""
        return backdoor_metrics(model, self.data.eval_sets, self.data.transform.normalize,
                                autocast=self.runtime.autocast)

    def defense_accuracy(self, model: torch.nn.Module) -> float:
        """Accuracy on the defender's clean data: what a defender may choose by."""
        return defense_accuracy(model, self.data, self.runtime.autocast)

    def sweep_measure(self, model: torch.nn.Module) -> Callable[[torch.nn.Module], dict] | None:
        """:meth:`evaluate` and :meth:`defense_accuracy` of ``model`` along a pruning sweep, computed by an
        :class:`utils.incremental.IncrementalPredictor`; None (evaluate plainly) with ``--sweep-eval plain``
        or a model that ``torch.fx`` cannot trace."""
        if self.config.sweep_eval == "plain":
            return None
        sets = self.data.eval_sets
        try:
            predictor = IncrementalPredictor(
                model, {"clean": sets.clean_images, "poison": sets.poison_images, "defense": self.data.defense_images},
                self.data.transform.normalize, autocast=self.runtime.autocast)
        except NotTraceable as err:
            self.log(f"--sweep-eval incremental: cannot trace the model ({err}); evaluating every row plainly")
            return None

        def measure(_: torch.nn.Module) -> dict:
            logits = predictor.logits()
            return {**metrics_from_logits(logits["clean"], logits["poison"], sets),
                    "defense_acc": loss_and_accuracy(logits["defense"], self.data.defense_labels)[1]}
        return measure

    def prune(self, load_original: Callable[[], torch.nn.Module], values, title: str) -> dict:
        """The pruning stage with the config's :class:`defenses.options.PruningOptions`."""
        a = self.config
        return prune_and_report(load_original, values, mode=a.pruning_by, pruning_max=a.pruning_max,
                                pruning_step=a.pruning_step, save_threshold=a.save_threshold, evaluate=self.evaluate,
                                output_dir=self.output_dir, log=self.log, title=f"{title}, {self.data.spec.name}",
                                defense_accuracy=self.defense_accuracy, operating_point=a.operating_point,
                                max_acc_drop=a.max_acc_drop, sweep_measure=self.sweep_measure)

    def finish(self, metrics: dict) -> dict:
        """Write ``metrics.json`` (with the command line, versions, seed, device) and close the log."""
        metrics = {**run_metadata(self.record, self.runtime), **metrics}
        write_metrics(os.path.join(self.output_dir, "metrics.json"), metrics)
        self.log.close()
        return metrics
