"""Options every defense shares, as typed-config bases: the defender's data, and the pruning stage with its
operating point. A defense's config inherits what it uses; the original tools' spellings are aliases."""
from __future__ import annotations

from dataclasses import dataclass

from data import AUGMENTATIONS
from utils.cli import check_positive, check_range
from utils.errors import OptionError
from utils.options import option

from .operating_point import OPERATING_POINTS
from .pruning import PRUNING_MODES, SWEEP_EVALS

# Set by a grid's operating rules (``rules:``), never per defense.
RULE_OPTIONS = ("operating_point", "save_threshold", "max_acc_drop")


@dataclass
class DefenseDataOptions:
    defense_frac: float = option(0.01, "the defender's clean data as a fraction of the training set (ANP's "
                                 "--val-frac, RNP's and SODA's --ratio)",
                                 aliases=("--val-frac", "--val_frac", "--ratio"))
    augment: str | None = option(None, "augmentation of the defense data (default: the training augmentation "
                                 "recorded in the trigger info, else the dataset's: crop-flip for CIFAR-10 and "
                                 "Fashion-MNIST)", type=str, choices=AUGMENTATIONS)

    def check_defense_data(self) -> None:
        if not 0.0 < self.defense_frac <= 0.1:
            raise OptionError("defense_frac", f"{self.defense_frac} must be in (0, 0.1], the held-out clean part "
                              "of the training set")


@dataclass
class PruningOptions:
    pruning_by: str = option("threshold", "prune by mask threshold or by number of neurons",
                             choices=PRUNING_MODES, aliases=("--pruning_by",))
    pruning_max: float = option(0.90, "largest threshold (or number of neurons)", aliases=("--pruning_max",))
    pruning_step: float = option(0.05, "threshold step (or neurons per step)", aliases=("--pruning_step",))
    save_threshold: float = option(0.2, "fixed operating point: the purified model prunes every neuron with mask "
                                   "<= this (never chosen on the poisoned test set)", aliases=("--save_threshold",))
    operating_point: str = option("fixed", "fixed: prune at --save-threshold (the papers' 0.2, default); "
                                  "defense-acc: prune as far along the sweep as the clean defense data's accuracy "
                                  "stays within --max-acc-drop of the unpruned model's", choices=OPERATING_POINTS,
                                  aliases=("--operating_point",))
    max_acc_drop: float = option(0.05, "accuracy drop allowed by --operating-point defense-acc",
                                 aliases=("--max_acc_drop",))
    sweep_eval: str = option("incremental", "incremental: BatchNorm folded into the convolutions, activations "
                             "before the first changed layer kept between rows (same rows to 1e-4, faster); plain: "
                             "every row evaluated from the images, as the original", choices=SWEEP_EVALS,
                             aliases=("--sweep_eval",))

    def check_pruning(self) -> None:
        check_positive(self.pruning_step, "pruning_step")
        check_range(self.max_acc_drop, 0.0, 1.0, "max_acc_drop")
