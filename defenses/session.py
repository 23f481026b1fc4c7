"""The seam every defense script stands on: one run folder, the defender's data, the model, evaluation.

A :class:`DefenseRun` checks its inputs (trigger info, dataset, the checkpoint's fit) before it writes
anything, then opens the run folder and its log. Scripts then only call their algorithm:

    run = DefenseRun.start(args, args.output_dir, checkpoint=args.checkpoint, val_frac=args.val_frac,
                           **attack_kwargs(args))
    model = run.load(args.checkpoint, masked=True)
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
from utils.run_log import RunLog, run_metadata, start_run, write_metrics

from .defense_data import DefenseData, defense_accuracy, prepare_defense_data
from .pruning import prune_and_report


@dataclass
class DefenseRun:
    args: object
    output_dir: str
    runtime: Runtime
    log: RunLog
    data: DefenseData

    @classmethod
    def start(cls, args, output_dir: str, *, checkpoint: str | None, checkpoint_flag: str = "--checkpoint",
              val_frac: float, augment: str | None = None, check: Callable[[DefenseData], None] | None = None,
              **attack) -> "DefenseRun":
        """Check everything (data, attack, ``checkpoint`` fits ``--arch/--width``, the script's own ``check`` of
        the defender's data), then open the run folder."""
        runtime = make_runtime(args.device, args.amp)
        messages: list[str] = []
        data = prepare_defense_data(dataset=args.dataset, data_dir=args.data_dir, trigger_info_path=args.trigger_info,
                                    val_frac=val_frac, seed=args.seed, runtime=runtime, augment=augment,
                                    log=messages.append, **attack)
        if checkpoint is not None:
            load_model(checkpoint, args.arch, data.spec, args.width, runtime, argument=checkpoint_flag)
        if check is not None:
            check(data)
        runtime, log = start_run(args, output_dir, runtime)
        for message in messages:
            log(message)
        return cls(args, output_dir, runtime, log, data)

    def load(self, path: str, masked: bool = False, argument: str = "--checkpoint") -> torch.nn.Module:
        return load_model(path, self.args.arch, self.data.spec, self.args.width, self.runtime, masked, argument)

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
        if self.args.sweep_eval == "plain":
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
        """The pruning stage with the script's pruning flags (:func:`defenses.stage_args.add_pruning_args`)."""
        a = self.args
        return prune_and_report(load_original, values, mode=a.pruning_by, pruning_max=a.pruning_max,
                                pruning_step=a.pruning_step, save_threshold=a.save_threshold, evaluate=self.evaluate,
                                output_dir=self.output_dir, log=self.log, title=f"{title}, {self.data.spec.name}",
                                defense_accuracy=self.defense_accuracy, operating_point=a.operating_point,
                                max_acc_drop=a.max_acc_drop, sweep_measure=self.sweep_measure)

    def finish(self, metrics: dict) -> dict:
        """Write ``metrics.json`` (with the command line, versions, seed, device) and close the log."""
        metrics = {**run_metadata(self.args, self.runtime), **metrics}
        write_metrics(os.path.join(self.output_dir, "metrics.json"), metrics)
        self.log.close()
        return metrics
