"""SODA: detect the (source, target) pair of a semantic backdoor and remove it, in one command.

``--option all`` (default) runs analyze → detect → gen_trigger → remove; each step alone reads the
previous steps' artifacts from --output-dir (the original tool's ``--option`` names):

- analyze: ``causality.th`` (the C × D × C causality matrices)
- detect: ``detection.json`` (target, source, every class's score, thresholds), ``detection_scores.png``
- gen_trigger: ``reconstructed.th`` (reconstructed infected samples, normalised), ``reconstructed.png``
- remove: ``repaired_model.th`` (plain state dict)

plus ``output.log`` and ``metrics.json`` (before/after ACC, ASR, source-class accuracy; timings per step).
The defender's data is the front ``--ratio`` of the training split the trigger info records: held-out clean
images, or, for a model trained by the released semantic recipe (no held-out split), clean training images as
in the released code (its removal uses 5 % of the clean training data). The analysis samples come from there
(``--analysis-samples defense``, default) or, as released, from the clean test split (``test``). The trigger
info only decides what is reported (without one the model is reported as of unknown attack: ACC only).
"""
from __future__ import annotations

import json
import os

import torch

from data import get_spec
from data.trigger_info import load_trigger_info
from defenses import soda
from defenses.defense_data import resolve_dataset_name
from defenses.session import DefenseRun
from defenses.stage_args import add_augment_arg, add_flag
from models import create_model
from models.split import PENULTIMATE, split_model
from utils.checkpoint import atomic_save, atomic_write_text, plain_state_dict, safe_load
from utils.cli import add_common_args, check_positive, check_range
from utils.errors import ArgumentParser, UserError, run_cli
from utils.plots import pyplot, save_figure
from utils.run_log import Timer, run_metadata

STEPS = ("analyze", "detect", "gen_trigger", "remove")
ANALYSIS_SAMPLES = ("defense", "test")
OPTIONS = ("all",) + STEPS + ("causality_analysis",)  # the original's name for analyze


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="SODA: semantic backdoor detection and removal.")
    add_common_args(p, dataset_default=None)
    p.add_argument("--checkpoint", "--in_model", dest="checkpoint", required=True,
                   help="the model to analyse (state_dict; RNP .tar and DataParallel wrappers accepted)")
    add_flag(p, "trigger_info", True, default="",
             help="trigger_info.th of train_backdoor_cifar.py: reports ASR on its attack test set")
    add_flag(p, "output_dir", True, default="logs/soda/")
    p.add_argument("--option", default="all", choices=OPTIONS, help="all, or one step (reads earlier artifacts)")
    p.add_argument("--ratio", type=float, default=0.05, help="defender's clean data as a fraction of the training set")
    add_flag(p, "split", default=PENULTIMATE,
             help="where the model is cut: penultimate (the input of the last linear layer) or an earlier stage "
                  "(resnet: layer4, layer3, ...)")
    p.add_argument("--intervention", action="store_true",
                   help="compute the causality matrices by intervention even where the closed form holds")
    add_flag(p, "num_sample", True, type=int, default=256, help="clean samples per class for the analysis")
    add_flag(p, "analysis_samples", default="defense", choices=ANALYSIS_SAMPLES,
             help="where the analysis samples come from: defense (the first --num_sample of each class of the "
                  "defender's data; default: a defender keeps the test set for reporting) or test (random images "
                  "of each class from the clean test split, as the released code draws them)")
    p.add_argument("--confidence", type=float, default=3.0, help="MAD outlier threshold for the target (fixed)")
    p.add_argument("--confidence2", type=float, default=3.0, help="MAD outlier threshold for the source")
    add_flag(p, "potential_source", True, type=int, default=None, help="gen_trigger/remove: this source class "
             "instead of the detected one")
    add_flag(p, "poison_target", True, type=int, default=None, help="gen_trigger/remove: this target class "
             "instead of the detected one")
    add_flag(p, "num_recon", True, type=int, default=100,
             help="reconstructed samples wanted: shuffled source-class defender images are optimised until this "
                  "many reach the target (released gen_trigger's --num_sample 100)")
    add_flag(p, "recon_steps", True, type=int, default=2000, help="largest number of reconstruction steps")
    add_flag(p, "recon_lr", True, type=float, default=0.1, help="reconstruction SGD learning rate")
    add_flag(p, "trigger_reg", True, type=float, default=0.9, help="reconstruction L2 penalty weight")
    add_flag(p, "recon_weight_decay", True, type=float, default=5e-4,
             help="reconstruction SGD weight decay on the pixels (released: 5e-4)")
    p.add_argument("--reg", type=float, default=0.0005, help="removal: weight of − CE(reconstructed, target)")
    p.add_argument("--lr", type=float, default=0.01, help="removal: constant SGD learning rate")
    p.add_argument("--epoch", type=int, default=5,
                   help="removal: passes over the defender's data, as the released loop range(0, epoch) since "
                        "2023-05-31 (its stripet --epoch=5 = 5 passes)")
    p.add_argument("--top", type=float, default=0.5,
                   help="removal: share of neurons kept active (by A_source[:, target])")
    add_flag(p, "batch_size", True, type=int, default=64)
    add_flag(p, "recon_per_batch", True, type=int, default=20, help="reconstructed samples in each removal batch")
    add_augment_arg(p)
    p.add_argument("--remove-augment", action="store_true",
                   help="removal: augment the clean images as the model's training data was (this toolkit's earlier "
                        "behaviour); default, as released: not augmented")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args) -> None:
    check_positive(args.num_sample, "--num_sample")
    check_positive(args.num_recon, "--num_recon")
    check_positive(args.recon_steps, "--recon_steps")
    if args.recon_weight_decay < 0:
        raise UserError(f"--recon_weight_decay: expected at least 0, got {args.recon_weight_decay}")
    check_positive(args.epoch, "--epoch")
    check_positive(args.batch_size, "--batch_size")
    check_range(args.top, 1e-9, 1.0, "--top")
    if not 0 < args.recon_per_batch < args.batch_size:
        raise UserError(f"--recon_per_batch: expected 1..{args.batch_size - 1} (below --batch_size), got "
                        f"{args.recon_per_batch}")


def artifact(args, name: str, step: str):
    """``name`` in --output-dir, read with weights_only; a missing one names the step that writes it."""
    path = os.path.join(args.output_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"--option {args.option}: {path} is missing; run --option {step} (or all) first")
    if name.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    return safe_load(path, f"--option {args.option}")


# What each step reads, and the step that writes it.
NEEDS = {"detect": [("causality.th", "analyze")],
         "gen_trigger": [("detection.json", "detect")],
         "remove": [("causality.th", "analyze"), ("detection.json", "detect"), ("reconstructed.th", "gen_trigger")]}


def check_artifacts(args, steps: tuple) -> None:
    """Every artifact the chosen steps read exists (or an earlier step of this run writes it), before anything
    is written; the source/target flags stand in for detection.json."""
    for step in steps:
        for name, writer in NEEDS.get(step, []):
            if writer in steps or (name == "detection.json" and args.potential_source is not None):
                continue
            artifact(args, name, writer)


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
            raise UserError(f"--ratio: class {c} has no clean samples among the defender's {len(labels)} "
                            f"images; raise --ratio")
        inputs.append(data.transform.normalize(images[chosen]))
    return inputs


def check_source_images(args, data) -> None:
    """Enough defender images of the source class (of every class while the pair is still to be detected) to
    reconstruct ``--num_recon`` samples."""
    classes = [args.potential_source] if args.potential_source is not None else range(data.spec.num_classes)
    for c in classes:
        have = int((data.defense_labels == c).sum())
        if have < args.num_recon:
            raise UserError(f"--num_recon: {args.num_recon} reconstructed samples wanted, but the defender's data has "
                            f"{have} images of class {c}; lower --num_recon or raise --ratio")


def check_pair_flags(args) -> None:
    """``--potential_source``/``--poison_target``: both or neither, inside the dataset's class range."""
    if (args.potential_source is None) != (args.poison_target is None):
        raise UserError("--potential_source/--poison_target: give both (or neither, to use detection.json)")
    if args.potential_source is None:
        return
    info = load_trigger_info(args.trigger_info) if args.trigger_info else None
    num_classes = get_spec(resolve_dataset_name(args.dataset, info)).num_classes
    for value, flag in ((args.potential_source, "--potential_source"), (args.poison_target, "--poison_target")):
        if not 0 <= value < num_classes:
            raise UserError(f"{flag}: {value} is outside the class range 0..{num_classes - 1}")


def check_data(args, data) -> None:
    """Every class has defender images, ``--split`` names a stage of ``--arch``, enough source-class images to
    reconstruct from (before anything is written)."""
    class_inputs(data, 1)
    split_model(create_model(args.arch, data.spec.num_classes, data.spec.image_shape[2], args.width), args.split)
    if "gen_trigger" in steps_of(args):
        check_source_images(args, data)


def pair(args, detection: dict | None) -> tuple[int | None, int | None]:
    """(source, target): the flags where given, else the detection's."""
    if args.potential_source is not None:
        return args.potential_source, args.poison_target
    return (detection or {}).get("source"), (detection or {}).get("target")


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


def steps_of(args) -> tuple:
    return STEPS if args.option == "all" else ("analyze",) if args.option == "causality_analysis" else (args.option,)


def main(args) -> dict:
    check_args(args)
    steps = steps_of(args)
    check_pair_flags(args)
    check_artifacts(args, steps)
    run = DefenseRun.start(args, args.output_dir, checkpoint=args.checkpoint, checkpoint_flag="--checkpoint",
                           val_frac=args.ratio, augment=args.augment, poison_type="benign", poison_target=0,
                           check=lambda data: check_data(args, data))
    data, log, runtime = run.data, run.log, run.runtime
    model = run.load(args.checkpoint)
    split = split_model(model, args.split)
    attack = data.attack
    timer, timings = Timer(), {}
    metrics_path = os.path.join(args.output_dir, "metrics.json")
    previous = {}
    if args.option != "all" and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            previous = json.load(f)

    def evaluate(net) -> dict:
        m = run.evaluate(net)
        return {"clean_acc": m["clean_acc"], "asr": m["asr"] if attack.has_backdoor else None,
                "ra": m["ra"] if attack.has_backdoor else None, "source_acc": m.get("source_acc")}

    def report_source(source: int | None) -> None:
        """The class whose clean accuracy is reported: the attack's, else the detected (or given) source."""
        if data.eval_sets.source_class is None:
            data.eval_sets.source_class = source

    def describe(m: dict) -> str:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        return f"ACC {fmt(m['clean_acc'])} ASR {fmt(m['asr'])} source-class ACC {fmt(m['source_acc'])}"

    detection = previous.get("detection")
    report_source((detection or {}).get("source"))
    inputs = class_inputs(data, args.num_sample, args.analysis_samples, torch.Generator().manual_seed(args.seed))
    log(f"{data.spec.name}, {len(data.defense_labels)} clean defender images, {min(len(x) for x in inputs)}-"
        f"{max(len(x) for x in inputs)} per class for the analysis (from the {args.analysis_samples} images); "
        f"split at {split.at}; attack "
        f"{attack.name if attack.has_backdoor else 'none/unknown'}; steps {', '.join(steps)}")
    result = {**previous}

    if "analyze" in steps:
        start = timer()
        closed_form = split.is_head and not args.intervention
        matrices = soda.causality_matrices(split, inputs, closed_form, runtime.autocast, args.progress)
        atomic_save({"matrices": matrices.cpu(), "split": split.at, "closed_form": closed_form,
                     "samples_per_class": [len(x) for x in inputs]}, os.path.join(args.output_dir, "causality.th"))
        timings["analyze_seconds"] = timer() - start
        log(f"analyze: {matrices.shape[1]} hidden neurons × {matrices.shape[2]} classes per class "
            f"({'closed form |W|' if closed_form else 'intervention'}), {timings['analyze_seconds']:.1f} s")

    if "detect" in steps:
        start = timer()
        saved = artifact(args, "causality.th", "analyze")
        logits = soda.mean_logits(model, inputs, runtime.autocast)
        detection = soda.detect(saved["matrices"], logits, args.confidence, args.confidence2)
        detection["split"] = saved["split"]
        atomic_write_text(json.dumps(detection, indent=2) + "\n", os.path.join(args.output_dir, "detection.json"))
        plot_scores(detection, os.path.join(args.output_dir, "detection_scores.png"),
                    f"SODA target scores, {data.spec.name}, {args.arch} width {args.width}")
        timings["detect_seconds"] = timer() - start
        scores = " ".join(f"{s:.3f}" for s in detection["target_test"]["normalized"])
        if detection["target"] is None:
            log(f"detect: no semantic backdoor (normalised scores {scores}; threshold "
                f"{detection['target_test']['threshold']:.3f})")
        else:
            log(f"detect: source {detection['source']} -> target {detection['target']} (normalised scores {scores}; "
                f"threshold {detection['target_test']['threshold']:.3f})")
        report_source(detection["source"])
        result["detection"] = detection

    source, target = None, None
    if "gen_trigger" in steps or "remove" in steps:
        if detection is None and args.potential_source is None:
            detection = artifact(args, "detection.json", "detect")
        source, target = pair(args, detection)
        report_source(source)

    before = evaluate(model)
    result["before"] = before
    log(f"before: {describe(before)}")
    if source is None and ("gen_trigger" in steps or "remove" in steps):
        log("no (source, target) pair: nothing to reconstruct or remove; the model is unchanged")
        result["after"] = before
        steps = tuple(s for s in steps if s not in ("gen_trigger", "remove"))
        result["removed"] = False

    if "gen_trigger" in steps:
        start = timer()
        chosen = (data.defense_labels == source).nonzero().flatten()
        chosen = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(args.seed)).to(chosen.device)]
        originals = data.transform.normalize(data.defense_images[chosen])
        recon = soda.reconstruct_until(model, originals, target, source, args.num_recon, steps=args.recon_steps,
                                       lr=args.recon_lr, reg=args.trigger_reg, weight_decay=args.recon_weight_decay,
                                       progress=args.progress, autocast=runtime.autocast)
        if len(recon.images) < 2:
            raise UserError(f"--recon_steps: only {len(recon.images)} of {recon.tried} source-class images reached "
                            f"target {target}; raise --recon_steps or --recon_lr")
        if len(recon.images) < args.num_recon:
            log(f"gen_trigger: only {len(recon.images)} of the {recon.tried} source-class images reached target "
                f"{target}, fewer than --num_recon {args.num_recon}")
        half = len(recon.images) // 2
        atomic_save({"images": recon.images.cpu(), "labels": torch.full((len(recon.images),), source),
                     "train_count": half, "source": source, "target": target, "indices": chosen[recon.indices].cpu(),
                     "steps": recon.steps.cpu()}, os.path.join(args.output_dir, "reconstructed.th"))
        plot_reconstruction(originals[recon.indices], recon.images, data.transform.mean.flatten().tolist(),
                            data.transform.std.flatten().tolist(),
                            os.path.join(args.output_dir, "reconstructed.png"))
        timings["gen_trigger_seconds"] = timer() - start
        log(f"gen_trigger: {len(recon.images)} of {recon.tried} source-{source} images reached target {target} "
            f"(median {recon.steps.float().median().item():.0f} steps), {half} for removal, the rest held out; "
            f"{timings['gen_trigger_seconds']:.1f} s")

    if "remove" in steps:
        start = timer()
        matrices = artifact(args, "causality.th", "analyze")["matrices"]
        saved = artifact(args, "reconstructed.th", "gen_trigger")
        if (saved["source"], saved["target"]) != (source, target):
            raise UserError(f"--option remove: reconstructed.th is for {saved['source']} -> {saved['target']}, not "
                            f"{source} -> {target}; rerun --option gen_trigger")
        images = saved["images"].to(runtime.device)
        recon_train, recon_test = images[:saved["train_count"]], images[saved["train_count"]:]

        def recon_asr(net) -> float:
            with torch.no_grad():
                net.eval()
                return (net(recon_test).argmax(1) == target).float().mean().item() if len(recon_test) else 0.0

        mask = soda.neuron_mask(matrices, source, target, args.top)
        result["recon_asr_before"] = recon_asr(model)
        log(f"remove: {int(mask.sum())} of {len(mask)} neurons active during fine-tuning (top {args.top}); "
            f"reconstructed held-out ASR before {result['recon_asr_before']:.4f}")
        log("Epoch \t lr \t Loss \t ACC \t ASR \t RA \t SourceACC")
        generator = torch.Generator().manual_seed(args.seed)
        clean_input = data.transform.augment if args.remove_augment else data.transform.normalize
        history = soda.remove(split, mask, data.defense_images, data.defense_labels, clean_input,
                              recon_train, source, target, epochs=args.epoch, lr=args.lr, reg=args.reg,
                              batch_size=args.batch_size, recon_per_batch=args.recon_per_batch, generator=generator,
                              autocast=runtime.autocast, progress=args.progress, log=log, evaluate=evaluate)
        atomic_save(plain_state_dict(model), os.path.join(args.output_dir, "repaired_model.th"))
        after = evaluate(model)
        result.update(after=after, removed=True, remove_epochs=history, recon_asr_after=recon_asr(model),
                      neurons_active=int(mask.sum()))
        timings["remove_seconds"] = timer() - start
        log(f"after (mask dropped): {describe(after)}; reconstructed held-out ASR {result['recon_asr_after']:.4f}; "
            f"{timings['remove_seconds']:.1f} s; model in {os.path.join(args.output_dir, 'repaired_model.th')}")

    result["timings"] = {**previous.get("timings", {}), **timings}
    result["steps"] = list(steps)
    result["source_class_reported"] = data.eval_sets.source_class
    fresh = run_metadata(args, runtime)  # this invocation's command, versions, device, memory: not the previous
    return run.finish({k: v for k, v in result.items() if k not in fresh})


if __name__ == "__main__":
    run_cli(main, parse_args())
