"""SODA (Sun et al., USENIX Security 2024) as a registered defense: detect the (source, target) pair of a
semantic backdoor and remove it.

``option`` ``all`` (default) runs analyze → detect → gen_trigger → remove; each step alone reads the previous
steps' artifacts from the output folder (the original tool's ``--option`` names):

- analyze: ``causality.th`` (the C × D × C causality matrices)
- detect: ``detection.json`` (target, source, every class's score, thresholds), ``detection_scores.png``
- gen_trigger: ``reconstructed.th`` (reconstructed infected samples, normalised), ``reconstructed.png``
- remove: ``repaired_model.th`` (plain state dict)

plus ``output.log`` and ``metrics.json`` (before/after ACC, ASR, source-class accuracy; timings per step).
The defender's data is the front ``defense_frac`` of the training split the trigger info records: held-out
clean images, or, for a model trained by the released semantic recipe (no held-out split), clean training
images as in the released code. The analysis samples come from there (``analysis_samples defense``) or, as
released, from the clean test split (``test``). ``pair attacker`` removes the attacker's own pair from the
trigger info instead of the detected one: an oracle row, reported as one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from data import get_spec
from data.trigger_info import load_trigger_info
from models import create_model
from models.split import PENULTIMATE, split_model
from utils.checkpoint import atomic_save, atomic_write_text, plain_state_dict, safe_load
from utils.cli import check_positive, check_range
from utils.errors import OptionError
from utils.options import option as opt  # SODA has an option named ``option``
from utils.run_log import Timer, run_metadata

from . import soda
from .defense_data import resolve_dataset_name
from .options import DefenseDataOptions
from .registry import DefenseInputs, register
from .session import DefenseRun
from .soda_plots import plot_reconstruction, plot_scores

STEPS = ("analyze", "detect", "gen_trigger", "remove")
ANALYSIS_SAMPLES = ("defense", "test")
OPTIONS = ("all",) + STEPS + ("causality_analysis",)  # the original's name for analyze
PAIRS = ("detected", "attacker")
# What each step reads, and the step that writes it.
NEEDS = {"detect": [("causality.th", "analyze")],
         "gen_trigger": [("detection.json", "detect")],
         "remove": [("causality.th", "analyze"), ("detection.json", "detect"), ("reconstructed.th", "gen_trigger")]}


@dataclass
class SODAConfig(DefenseDataOptions):
    defense_frac: float = opt(0.05, "the defender's clean data as a fraction of the training set (SODA's "
                                 "--ratio; the released removal uses 5 %)",
                                 aliases=("--val-frac", "--val_frac", "--ratio"))
    option: str = opt("all", "all, or one step (reads earlier artifacts)", choices=OPTIONS, grid=False)
    split: str = opt(PENULTIMATE, "where the model is cut: penultimate (the input of the last linear layer) or an "
                        "earlier stage (resnet: layer4, layer3, ...)")
    intervention: bool = opt(False, "compute the causality matrices by intervention even where the closed form "
                                "holds")
    num_sample: int = opt(256, "clean samples per class for the analysis", aliases=("--num_sample",))
    analysis_samples: str = opt("defense", "where the analysis samples come from: defense (the first --num-sample "
                                   "of each class of the defender's data; default: a defender keeps the test set for "
                                   "reporting) or test (random images of each class from the clean test split, as "
                                   "the released code draws them)", choices=ANALYSIS_SAMPLES,
                                   aliases=("--analysis_samples",))
    confidence: float = opt(3.0, "MAD outlier threshold for the target (fixed)")
    confidence2: float = opt(3.0, "MAD outlier threshold for the source")
    pair: str = opt("detected", "the (source, target) pair reconstructed and removed: detected, or attacker (the "
                       "trigger info's own pair: an oracle row, reported as one)", choices=PAIRS)
    potential_source: int | None = opt(None, "gen_trigger/remove: this source class instead of the detected one",
                                          type=int, aliases=("--potential_source",))
    poison_target: int | None = opt(None, "gen_trigger/remove: this target class instead of the detected one",
                                       type=int, aliases=("--poison_target",))
    num_recon: int = opt(100, "reconstructed samples wanted: shuffled source-class defender images are optimised "
                            "until this many reach the target (released gen_trigger's --num_sample 100)",
                            aliases=("--num_recon",))
    recon_steps: int = opt(2000, "largest number of reconstruction steps", aliases=("--recon_steps",))
    recon_lr: float = opt(0.1, "reconstruction SGD learning rate", aliases=("--recon_lr",))
    trigger_reg: float = opt(0.9, "reconstruction L2 penalty weight", aliases=("--trigger_reg",))
    recon_weight_decay: float = opt(5e-4, "reconstruction SGD weight decay on the pixels (released: 5e-4)",
                                       aliases=("--recon_weight_decay",))
    reg: float = opt(0.0005, "removal: weight of − CE(reconstructed, target)")
    lr: float = opt(0.01, "removal: constant SGD learning rate")
    epoch: int = opt(5, "removal: passes over the defender's data, as the released loop range(0, epoch) since "
                        "2023-05-31 (its stripet --epoch=5 = 5 passes)")
    top: float = opt(0.5, "removal: share of neurons kept active (by A_source[:, target])")
    batch_size: int = opt(64, "removal batch size", aliases=("--batch_size",))
    recon_per_batch: int = opt(20, "reconstructed samples in each removal batch", aliases=("--recon_per_batch",))
    remove_augment: bool = opt(False, "removal: augment the clean images as the model's training data was (this "
                                  "toolkit's earlier behaviour); default, as released: not augmented")

    def __post_init__(self):
        self.check_defense_data()
        check_positive(self.num_sample, "num_sample")
        check_positive(self.num_recon, "num_recon")
        check_positive(self.recon_steps, "recon_steps")
        if self.recon_weight_decay < 0:
            raise OptionError("recon_weight_decay", f"expected at least 0, got {self.recon_weight_decay}")
        check_positive(self.epoch, "epoch")
        check_positive(self.batch_size, "batch_size")
        check_range(self.top, 1e-9, 1.0, "top")
        if not 0 < self.recon_per_batch < self.batch_size:
            raise OptionError("recon_per_batch", f"expected 1..{self.batch_size - 1} (below --batch-size), got "
                              f"{self.recon_per_batch}")
        if (self.potential_source is None) != (self.poison_target is None):
            raise OptionError("potential_source", "give both it and --poison-target (or neither, to use "
                              "detection.json)")
        if self.pair == "attacker" and self.potential_source is not None:
            raise OptionError("pair", "attacker takes the pair from the trigger info: give no --potential-source")

    def steps(self) -> tuple[str, ...]:
        return STEPS if self.option == "all" else ("analyze",) if self.option == "causality_analysis" else \
            (self.option,)


def class_inputs(data, count: int, source: str = "defense", generator: torch.Generator | None = None
                 ) -> list[torch.Tensor]:
    """Normalised, unaugmented images of every class: the first ``count`` of the defender's (``defense``), or
    ``count`` drawn at random from the clean test split (``test``, the released draw)."""
    if source == "test":
        images, labels = data.eval_sets.clean_images, data.eval_sets.clean_labels
    else:
        images, labels = data.defense_images, data.defense_labels
    inputs = []
    for c in range(data.spec.num_classes):
        chosen = (labels == c).nonzero().flatten()
        if source == "test":
            chosen = chosen[torch.randperm(len(chosen), generator=generator)[:count].to(chosen.device)]
        chosen = chosen[:count]
        if len(chosen) == 0:
            raise OptionError("defense_frac", f"class {c} has no clean samples among the defender's {len(labels)} "
                              "images; raise it")
        inputs.append(data.transform.normalize(images[chosen]))
    return inputs


class _Artifacts:
    """The step artifacts in the output folder, read with weights_only; a missing one names its step."""

    def __init__(self, config: SODAConfig, output_dir: str):
        self.config, self.output_dir = config, output_dir

    def read(self, name: str, step: str):
        path = os.path.join(self.output_dir, name)
        if not os.path.isfile(path):
            raise OptionError("option", f"{self.config.option}: {path} is missing; run --option {step} (or all) "
                              "first")
        if name.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return safe_load(path, f"--option {self.config.option}")

    def check(self, steps: tuple, pair_given: bool) -> None:
        """Every artifact the chosen steps read exists (or an earlier step of this run writes it), before anything
        is written; a given pair stands in for detection.json."""
        for step in steps:
            for name, writer in NEEDS.get(step, []):
                if writer in steps or (name == "detection.json" and pair_given):
                    continue
                self.read(name, writer)


def check_pair(config: SODAConfig, inputs: DefenseInputs) -> None:
    """A given pair lies in the dataset's class range; the attacker's pair needs a trigger info with one."""
    info = load_trigger_info(inputs.trigger_info) if inputs.trigger_info else None
    if config.pair == "attacker" and (info is None or "source" not in (info.get("state") or {})):
        raise OptionError("pair", "attacker needs a trigger info of a semantic attack (one with a source class)"
                          + ("" if info is None else f"; {inputs.trigger_info} has none"))
    if config.potential_source is None:
        return
    num_classes = get_spec(resolve_dataset_name(inputs.settings.dataset, info)).num_classes
    for value, name in ((config.potential_source, "potential_source"), (config.poison_target, "poison_target")):
        if not 0 <= value < num_classes:
            raise OptionError(name, f"{value} is outside the class range 0..{num_classes - 1}")


def check_data(config: SODAConfig, inputs: DefenseInputs, data) -> None:
    """Every class has defender images, ``split`` names a stage of the architecture, enough source-class images
    to reconstruct from (before anything is written)."""
    settings = inputs.settings
    class_inputs(data, 1)
    split_model(create_model(settings.arch, data.spec.num_classes, data.spec.image_shape[2], settings.width),
                config.split)
    if "gen_trigger" not in config.steps():
        return
    classes = [config.potential_source] if config.potential_source is not None else range(data.spec.num_classes)
    for c in classes:
        have = int((data.defense_labels == c).sum())
        if have < config.num_recon:
            raise OptionError("num_recon", f"{config.num_recon} reconstructed samples wanted, but the defender's data "
                              f"has {have} images of class {c}; lower it or raise --defense-frac")


def _describe(m: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return f"ACC {fmt(m['clean_acc'])} ASR {fmt(m['asr'])} source-class ACC {fmt(m['source_acc'])}"


class _Session:
    """One SODA run: the model, its split, the analysis samples and the metrics so far (those of earlier
    single-step runs in the same folder included)."""

    def __init__(self, config: SODAConfig, inputs: DefenseInputs, run: DefenseRun, previous: dict):
        self.config, self.inputs, self.run = config, inputs, run
        self.data, self.log, self.runtime = run.data, run.log, run.runtime
        self.artifacts = _Artifacts(config, run.output_dir)
        self.model = run.load()
        self.split = split_model(self.model, config.split)
        self.result, self.timings, self.timer = {**previous}, {}, Timer()
        self.detection = previous.get("detection")

    def evaluate(self, net) -> dict:
        m = self.run.evaluate(net)
        backdoor = self.data.attack.has_backdoor
        return {"clean_acc": m["clean_acc"], "asr": m["asr"] if backdoor else None,
                "ra": m["ra"] if backdoor else None, "source_acc": m.get("source_acc")}

    def report_source(self, source: int | None) -> None:
        """The class whose clean accuracy is reported: the attack's, else the detected (or given) source."""
        if self.data.eval_sets.source_class is None:
            self.data.eval_sets.source_class = source

    def timed(self, step: str, start: float) -> float:
        self.timings[f"{step}_seconds"] = self.timer() - start
        return self.timings[f"{step}_seconds"]

    def analyze(self, inputs: list[torch.Tensor]) -> None:
        start = self.timer()
        closed_form = self.split.is_head and not self.config.intervention
        matrices = soda.causality_matrices(self.split, inputs, closed_form, self.runtime.autocast,
                                           self.inputs.settings.progress)
        atomic_save({"matrices": matrices.cpu(), "split": self.split.at, "closed_form": closed_form,
                     "samples_per_class": [len(x) for x in inputs]},
                    os.path.join(self.run.output_dir, "causality.th"))
        seconds = self.timed("analyze", start)
        self.log(f"analyze: {matrices.shape[1]} hidden neurons × {matrices.shape[2]} classes per class "
                 f"({'closed form |W|' if closed_form else 'intervention'}), {seconds:.1f} s")

    def detect(self, inputs: list[torch.Tensor]) -> None:
        start, config, settings = self.timer(), self.config, self.inputs.settings
        saved = self.artifacts.read("causality.th", "analyze")
        logits = soda.mean_logits(self.model, inputs, self.runtime.autocast)
        detection = soda.detect(saved["matrices"], logits, config.confidence, config.confidence2)
        detection["split"] = saved["split"]
        atomic_write_text(json.dumps(detection, indent=2) + "\n", os.path.join(self.run.output_dir, "detection.json"))
        plot_scores(detection, os.path.join(self.run.output_dir, "detection_scores.png"),
                    f"SODA target scores, {self.data.spec.name}, {settings.arch} width {settings.width}")
        self.timed("detect", start)
        scores = " ".join(f"{s:.3f}" for s in detection["target_test"]["normalized"])
        threshold = detection["target_test"]["threshold"]
        if detection["target"] is None:
            self.log(f"detect: no semantic backdoor (normalised scores {scores}; threshold {threshold:.3f})")
        else:
            self.log(f"detect: source {detection['source']} -> target {detection['target']} (normalised scores "
                     f"{scores}; threshold {threshold:.3f})")
        self.report_source(detection["source"])
        self.result["detection"] = self.detection = detection

    def pair(self) -> tuple[int | None, int | None]:
        """(source, target): the attacker's (oracle), the given one, else the detection's."""
        config = self.config
        if config.pair == "attacker":
            attack = self.data.attack
            return attack.source_class, attack.target
        if config.potential_source is not None:
            return config.potential_source, config.poison_target
        if self.detection is None:
            self.detection = self.artifacts.read("detection.json", "detect")
        return self.detection.get("source"), self.detection.get("target")

    def gen_trigger(self, source: int, target: int) -> None:
        start, config, data = self.timer(), self.config, self.data
        chosen = (data.defense_labels == source).nonzero().flatten()
        order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(self.inputs.settings.seed))
        chosen = chosen[order.to(chosen.device)]
        originals = data.transform.normalize(data.defense_images[chosen])
        recon = soda.reconstruct_until(self.model, originals, target, source, config.num_recon,
                                       steps=config.recon_steps, lr=config.recon_lr, reg=config.trigger_reg,
                                       weight_decay=config.recon_weight_decay, progress=self.inputs.settings.progress,
                                       autocast=self.runtime.autocast)
        if len(recon.images) < 2:
            raise OptionError("recon_steps", f"only {len(recon.images)} of {recon.tried} source-class images reached "
                              f"target {target}; raise --recon-steps or --recon-lr")
        if len(recon.images) < config.num_recon:
            self.log(f"gen_trigger: only {len(recon.images)} of the {recon.tried} source-class images reached target "
                     f"{target}, fewer than --num-recon {config.num_recon}")
        half = len(recon.images) // 2
        atomic_save({"images": recon.images.cpu(), "labels": torch.full((len(recon.images),), source),
                     "train_count": half, "source": source, "target": target, "indices": chosen[recon.indices].cpu(),
                     "steps": recon.steps.cpu()}, os.path.join(self.run.output_dir, "reconstructed.th"))
        plot_reconstruction(originals[recon.indices], recon.images, data.transform.mean.flatten().tolist(),
                            data.transform.std.flatten().tolist(),
                            os.path.join(self.run.output_dir, "reconstructed.png"))
        seconds = self.timed("gen_trigger", start)
        self.log(f"gen_trigger: {len(recon.images)} of {recon.tried} source-{source} images reached target {target} "
                 f"(median {recon.steps.float().median().item():.0f} steps), {half} for removal, the rest held out; "
                 f"{seconds:.1f} s")

    def remove(self, source: int, target: int) -> None:
        start, config, data, log = self.timer(), self.config, self.data, self.log
        matrices = self.artifacts.read("causality.th", "analyze")["matrices"]
        saved = self.artifacts.read("reconstructed.th", "gen_trigger")
        if (saved["source"], saved["target"]) != (source, target):
            raise OptionError("option", f"remove: reconstructed.th is for {saved['source']} -> {saved['target']}, "
                              f"not {source} -> {target}; rerun --option gen_trigger")
        images = saved["images"].to(self.runtime.device)
        recon_train, recon_test = images[:saved["train_count"]], images[saved["train_count"]:]

        def recon_asr(net) -> float:
            with torch.no_grad():
                net.eval()
                return (net(recon_test).argmax(1) == target).float().mean().item() if len(recon_test) else 0.0

        mask = soda.neuron_mask(matrices, source, target, config.top)
        self.result["recon_asr_before"] = recon_asr(self.model)
        log(f"remove: {int(mask.sum())} of {len(mask)} neurons active during fine-tuning (top {config.top}); "
            f"reconstructed held-out ASR before {self.result['recon_asr_before']:.4f}")
        log("Epoch \t lr \t Loss \t ACC \t ASR \t RA \t SourceACC")
        clean_input = data.transform.augment if config.remove_augment else data.transform.normalize
        history = soda.remove(self.split, mask, data.defense_images, data.defense_labels, clean_input, recon_train,
                              source, target, epochs=config.epoch, lr=config.lr, reg=config.reg,
                              batch_size=config.batch_size, recon_per_batch=config.recon_per_batch,
                              generator=torch.Generator().manual_seed(self.inputs.settings.seed),
                              autocast=self.runtime.autocast, progress=self.inputs.settings.progress, log=log,
                              evaluate=self.evaluate)
        path = os.path.join(self.run.output_dir, "repaired_model.th")
        atomic_save(plain_state_dict(self.model), path)
        after = self.evaluate(self.model)
        self.result.update(after=after, removed=True, remove_epochs=history, recon_asr_after=recon_asr(self.model),
                           neurons_active=int(mask.sum()))
        seconds = self.timed("remove", start)
        log(f"after (mask dropped): {_describe(after)}; reconstructed held-out ASR "
            f"{self.result['recon_asr_after']:.4f}; {seconds:.1f} s; model in {path}")


def _previous_metrics(config: SODAConfig, output_dir: str) -> dict:
    path = os.path.join(output_dir, "metrics.json")
    if config.option == "all" or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


@register("soda", SODAConfig, steps=STEPS, prunes=False,
          summary="SODA: detect a semantic backdoor's (source, target) pair by causality analysis, then remove it",
          timings={"soda": tuple(f"{step}_seconds" for step in STEPS)},
          oracle=lambda config: config.pair == "attacker")
def run(config: SODAConfig, inputs: DefenseInputs) -> dict:
    steps = config.steps()
    check_pair(config, inputs)
    _Artifacts(config, inputs.output_dir).check(steps, config.potential_source is not None or config.pair == "attacker")
    run = DefenseRun.start(inputs, config, poison_type="benign", poison_target=0,
                           check=lambda data: check_data(config, inputs, data))
    session = _Session(config, inputs, run, _previous_metrics(config, inputs.output_dir))
    data = run.data
    session.report_source((session.detection or {}).get("source"))
    samples = class_inputs(data, config.num_sample, config.analysis_samples,
                           torch.Generator().manual_seed(inputs.settings.seed))
    attack = data.attack
    run.log(f"{data.spec.name}, {len(data.defense_labels)} clean defender images, {min(len(x) for x in samples)}-"
            f"{max(len(x) for x in samples)} per class for the analysis (from the {config.analysis_samples} "
            f"images); split at {session.split.at}; attack {attack.name if attack.has_backdoor else 'none/unknown'}; "
            f"steps {', '.join(steps)}")
    if "analyze" in steps:
        session.analyze(samples)
    if "detect" in steps:
        session.detect(samples)
    source = target = None
    if "gen_trigger" in steps or "remove" in steps:
        source, target = session.pair()
        session.report_source(source)
        if config.pair == "attacker":
            run.log(f"oracle: the attacker's pair {source} -> {target} from the trigger info, not the detected one")
    before = session.evaluate(session.model)
    result = session.result
    result["before"] = before
    run.log(f"before: {_describe(before)}")
    if source is None and ("gen_trigger" in steps or "remove" in steps):
        run.log("no (source, target) pair: nothing to reconstruct or remove; the model is unchanged")
        result["after"] = before
        steps = tuple(s for s in steps if s not in ("gen_trigger", "remove"))
        result["removed"] = False
    if "gen_trigger" in steps:
        session.gen_trigger(source, target)
    if "remove" in steps:
        session.remove(source, target)
    result["timings"] = {**result.get("timings", {}), **session.timings}
    result["steps"] = list(steps)
    result["pair"] = config.pair
    result["source_class_reported"] = data.eval_sets.source_class
    fresh = run_metadata(run.record, run.runtime)  # this invocation's command, versions, device: not the previous
    return run.finish({k: v for k, v in result.items() if k not in fresh})
