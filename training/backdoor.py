"""Stage 1 as a function: train a backdoored classifier under one attack of the registry (ANP's
train_backdoor_cifar.py), with the attack's released recipe where it has one.

:class:`TrainConfig` is the one source of stage 1's options (the script's flags, the grid's ``train:`` keys);
:class:`AttackChoice` names the attack and its options (their flags come from the attack registry).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from data import attacker_indices, create_attack, get_spec, load_dataset, split_permutation
from data.attacks.base import CANDIDATE_RULES
from data.augment import AUGMENTATIONS, NORMALIZATIONS, BatchTransform, default_augmentation, normalization_stats
from data.splits import HELD_OUT_FRAC
from data.trigger_info import make_trigger_info
from models.factory import check_model_args, load_model, make_model
from utils.checkpoint import atomic_save, plain_state_dict
from utils.cli import RunSettings, check_positive
from utils.device import make_runtime
from utils.errors import OptionError
from utils.evaluation import backdoor_metrics, eval_sets_for
from utils.options import as_dict, option
from utils.run_log import Timer, run_metadata, start_run, write_metrics
from utils.training import COMPILE_MODES, LAST_BATCHES, compile_model, sgd_with_schedule, train_epoch


@dataclass
class TrainConfig:
    batch_size: int = option(128, "training batch size")
    epoch: int = option(200, "number of training epochs (exactly this many)")
    lr: float = option(0.1, "SGD learning rate (momentum 0.9, weight decay 5e-4)")
    schedule: list = option([100, 150], "epochs at which lr drops by 10x", type=int)
    save_every: int = option(20, "save model_<epoch>.th every this many epochs")
    augment: str | None = option(None, "training augmentation (default: the attack's released recipe's, else the "
                                 "dataset's, crop-flip for CIFAR-10 and Fashion-MNIST); recorded in trigger_info.th "
                                 "so the defenses augment their clean data alike", type=str, choices=AUGMENTATIONS)
    normalization: str | None = option(None, "input normalisation: dataset (mean/std) or none (pixels in [0, 1]); "
                                       "default: the attack's released recipe's (semantic on Fashion-MNIST: none), "
                                       "else dataset; recorded in trigger_info.th", type=str, choices=NORMALIZATIONS)
    held_out_frac: float | None = option(None, f"share of the training set held out clean, never trained on "
                                         f"(default: {HELD_OUT_FRAC}; 0 for the released semantic recipe, which "
                                         "trains on everything); the defenders' data is taken from the front of the "
                                         "same split", type=float)
    poison_candidates: str = option("non-target", "non-target: rate × non-target images (ANP, default); all: rate × "
                                    "all images (RNP)", choices=CANDIDATE_RULES)
    compile: bool = option(False, "train through torch.compile (off by default: on this project's CPU it gains "
                           "nothing and costs about 45 s of compilation; see docs/results)")
    compile_mode: str = option("default", "torch.compile mode with --compile (reduce-overhead: CUDA graphs, wants "
                               "--last-batch drop or pad)", choices=[m for m in COMPILE_MODES if m != "off"])
    last_batch: str = option("keep", "the epoch's last, smaller batch: keep (the original tools'), drop, or pad it "
                             "to a full batch (static shapes for a compiled model on a GPU)", choices=LAST_BATCHES)
    init_model: str | None = option(None, "start from these weights instead of a fresh initialisation (e.g. the "
                                    "released semantic trainer's tuning run)", type=str, grid=False)

    def __post_init__(self):
        check_positive(self.epoch, "epoch")
        check_positive(self.batch_size, "batch_size")
        check_positive(self.save_every, "save_every")


@dataclass
class AttackChoice:
    """The attack of stage 1: its registry name, target, target type and options (None: the attack's default)."""
    poison_type: str = "badnets"
    poison_target: int = 0
    target_type: str = "all2one"
    options: dict = field(default_factory=dict)


def train_record(settings: RunSettings, config: TrainConfig, attack_choice: AttackChoice, output_dir: str) -> dict:
    """Every option of a stage-1 run, flat (metrics.json's ``args``; the grid compares it with the planned one)."""
    return {**as_dict(settings), **as_dict(config), "poison_type": attack_choice.poison_type,
            "poison_target": attack_choice.poison_target, "target_type": attack_choice.target_type,
            **attack_choice.options, "output_dir": output_dir}


def given_clean_model(settings: RunSettings, attack, spec, runtime):
    """``--clean-model`` loaded (a one-line error if it does not fit), or None."""
    if not attack.opts.get("clean_model"):
        return None
    return load_model(attack.opts["clean_model"], settings.arch, spec, settings.width, runtime, argument="clean_model")


def train_surrogate(settings: RunSettings, config: TrainConfig, attack, spec, runtime, images, labels, transform,
                    log, output_dir: str):
    """A clean model of the same architecture, for attacks that craft their trigger with one."""
    model = make_model(settings.arch, spec, settings.width, masked=False, runtime=runtime)
    epochs = attack.opts["surrogate_epochs"]
    optimizer, scheduler = sgd_with_schedule(model, config.lr, [epochs // 2, 3 * epochs // 4])
    generator = torch.Generator().manual_seed(settings.seed + 2)
    for epoch in range(1, epochs + 1):
        loss, acc = train_epoch(model, images, labels, transform.augment, optimizer, config.batch_size,
                                runtime.autocast, generator, settings.progress, desc=f"surrogate {epoch}")
        scheduler.step()
        log(f"clean surrogate model, epoch {epoch}/{epochs}: train loss {loss:.4f} acc {acc:.4f}")
    atomic_save(plain_state_dict(model), os.path.join(output_dir, "clean_model.th"))
    return model


def training_recipe(config: TrainConfig, attack, spec) -> tuple[str, str, float]:
    """(augmentation, normalization, held-out share): the flags where given, else the attack's released recipe,
    else the toolkit's defaults."""
    recipe = attack.recipe(spec.name)
    augmentation = config.augment or recipe.get("augment") or default_augmentation(spec.hflip)
    normalization = config.normalization or recipe.get("normalization", "dataset")
    held_out = config.held_out_frac if config.held_out_frac is not None else recipe.get("held_out_frac", HELD_OUT_FRAC)
    if not 0.0 <= held_out < 1.0:
        raise OptionError("held_out_frac", f"expected a share in [0, 1), got {held_out}")
    return augmentation, normalization, held_out


def train_backdoor(settings: RunSettings, config: TrainConfig, attack_choice: AttackChoice, output_dir: str) -> dict:
    """Stage 1: train ``settings.arch`` on ``settings.dataset`` poisoned by the chosen attack; writes
    model_init.th, model_<epoch>.th, last_model.th, trigger_info.th, output.log and metrics.json to
    ``output_dir`` and returns the metrics."""
    spec = get_spec(settings.dataset or "cifar10")
    check_model_args(settings.arch, settings.width)
    # Every attack option is checked here, before anything is written.
    attack = create_attack(attack_choice.poison_type, attack_choice.poison_target, spec.num_classes,
                           spec.image_shape, attack_choice.target_type, **attack_choice.options)
    attack.check_training(config.batch_size)
    augmentation, normalization, held_out = training_recipe(config, attack, spec)
    runtime = make_runtime(settings.device, settings.amp)
    surrogate = given_clean_model(settings, attack, spec, runtime)
    if config.init_model:  # checked before anything is written
        load_model(config.init_model, settings.arch, spec, settings.width, runtime, argument="init_model")
    data = load_dataset(spec.name, settings.data_dir)
    attack.check_data(spec.name, data.train_labels, data.test_labels)
    permutation = attack.arrange_split(split_permutation(len(data.train_labels), settings.seed))
    train_idx = attacker_indices(permutation, held_out)  # the held-out part is never poisoned or trained on
    images, labels = data.train_images[train_idx], data.train_labels[train_idx]
    attack.check_poison_count(labels, config.poison_candidates)
    record = train_record(settings, config, attack_choice, output_dir)
    runtime, log = start_run(record, output_dir, runtime)
    mean, std = normalization_stats(normalization, spec)
    transform = BatchTransform.named(augmentation, mean, std, runtime.device, channels_last=runtime.channels_last)
    timer = Timer()
    generator = torch.Generator().manual_seed(settings.seed + 1)
    if attack.needs_surrogate and surrogate is None:
        surrogate = train_surrogate(settings, config, attack, spec, runtime, images.to(runtime.device),
                                    labels.to(runtime.device), transform, log, output_dir)
    attack.prepare(images, labels, surrogate, transform.normalize, generator, indices=train_idx)
    poisoned = attack.poison(images, labels, generator, config.poison_candidates)
    prepare_seconds = timer()

    def save_trigger_info():
        info = make_trigger_info(attack, spec.name, settings.seed, permutation, train_idx[poisoned.poison_indices],
                                 config.poison_candidates, augmentation, train_idx[poisoned.cover_indices],
                                 normalization, mean, std, held_out)
        atomic_save(info, os.path.join(output_dir, "trigger_info.th"))

    save_trigger_info()
    log(f"{spec.name}: {len(labels)} training images ({len(poisoned.poison_indices)} poisoned"
        f"{', %d covers' % len(poisoned.cover_indices) if len(poisoned.cover_indices) else ''}"
        f"{', every batch poisoned during training' if attack.learns_trigger else ''} by {attack.name}, target "
        f"{attack.target}), {len(permutation) - len(train_idx)} held out clean, {len(data.test_labels)} test images; "
        f"augmentation {augmentation}, normalization {normalization}"
        f"{'; the poisoned images only through the batch mix' if poisoned.drawn_by_hook else ''}; "
        f"options {attack.opts}")

    images, labels = poisoned.images.to(runtime.device), poisoned.labels.to(runtime.device)
    hook = attack.training_hook(poisoned, runtime.device, transform.normalize)
    eval_sets = eval_sets_for(attack, data.test_images, data.test_labels, runtime.device)
    model = (load_model(config.init_model, settings.arch, spec, settings.width, runtime, argument="init_model")
             if config.init_model else make_model(settings.arch, spec, settings.width, masked=False, runtime=runtime))
    optimizer, scheduler = sgd_with_schedule(model, config.lr, config.schedule)
    atomic_save(plain_state_dict(model), os.path.join(output_dir, "model_init.th"))
    if config.compile:
        compile_model(model, config.compile_mode)  # in place: the same module, parameters and state_dict keys

    pass_images, pass_labels = images, labels
    if poisoned.drawn_by_hook:  # the poisoned images reach batches only through the hook's mix
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[poisoned.poison_indices] = False
        keep = keep.to(runtime.device)
        pass_images, pass_labels = images[keep], labels[keep]

    log("Epoch \t lr \t Time \t TrainLoss \t TrainACC \t PoisonLoss \t PoisonACC \t PoisonRA \t CleanLoss \t CleanACC")
    history = []

    def run_epochs(first: int, count: int, optimizer, scheduler, phase: str) -> None:
        nonlocal eval_sets
        for epoch in range(first, first + count):
            lr = optimizer.param_groups[0]["lr"]
            start = timer()
            train_loss, train_acc = train_epoch(model, pass_images, pass_labels, transform.augment, optimizer,
                                                config.batch_size, runtime.autocast, generator, settings.progress,
                                                desc=f"{phase} {epoch}", batch_hook=hook, last_batch=config.last_batch)
            scheduler.step()
            if attack.learns_trigger:  # the trigger generator changed with the model
                eval_sets = eval_sets_for(attack, data.test_images, data.test_labels, runtime.device)
            m = backdoor_metrics(model, eval_sets, transform.normalize, autocast=runtime.autocast)
            seconds = timer() - start
            log(f"{epoch} \t {lr:.3f} \t {seconds:.1f} \t {train_loss:.4f} \t {train_acc:.4f} \t "
                f"{m['poison_loss']:.4f} \t {m['asr']:.4f} \t {m['ra']:.4f} \t {m['clean_loss']:.4f} \t "
                f"{m['clean_acc']:.4f}")
            history.append({"epoch": epoch, "phase": phase, "lr": lr, "seconds": seconds, "train_loss": train_loss,
                            "train_acc": train_acc, **m})
            attack.epoch_hook(model, epoch, poisoned, runtime.device, transform.normalize, log)
            if epoch % config.save_every == 0:
                atomic_save(plain_state_dict(model), os.path.join(output_dir, f"model_{epoch}.th"))

    run_epochs(1, config.epoch, optimizer, scheduler, "epoch")
    tune = attack.tune_phase()
    if tune is not None:  # the released stripet trainer's second run; its model is the one analysed
        tune_epochs, tune_lr = tune
        attack.begin_tune()
        optimizer, scheduler = sgd_with_schedule(model, tune_lr, [])
        log(f"tune: {tune_epochs} epochs at constant lr {tune_lr} ({attack.name}'s tune phase, fresh optimizer)")
        run_epochs(config.epoch + 1, tune_epochs, optimizer, scheduler, "tune")
    changed = attack.finalize(model, images, labels, transform.normalize, generator, log)
    if changed is not model:  # the attack changed the trained model (AWP): measure what is saved
        model = changed
        start = timer()
        m = backdoor_metrics(model, eval_sets, transform.normalize, autocast=runtime.autocast)
        history.append({**history[-1], **m, "seconds": timer() - start, "finalized": True})
        log(f"after {attack.name}'s change of the trained model: ASR {m['asr']:.4f} RA {m['ra']:.4f} "
            f"ACC {m['clean_acc']:.4f}")
    atomic_save(plain_state_dict(model), os.path.join(output_dir, "last_model.th"))
    if attack.learns_trigger:
        save_trigger_info()  # with the trained generator's weights

    final = history[-1]
    metrics = {**run_metadata(record, runtime), "attack": attack.name, "attack_options": attack.opts,
               "poison_target": attack.target, "poisoned_images": len(poisoned.poison_indices),
               "cover_images": len(poisoned.cover_indices), "augmentation": augmentation,
               "normalization": normalization, "held_out_frac": held_out,
               "clean_acc": final["clean_acc"], "asr": final["asr"], "ra": final["ra"],
               **({"source_class": attack.source_class, "source_acc": final["source_acc"]}
                  if attack.source_class is not None else {}),
               "timings": {"prepare_seconds": prepare_seconds, "train_seconds": timer() - prepare_seconds,
                           "total_seconds": timer()}, "epochs": history}
    write_metrics(os.path.join(output_dir, "metrics.json"), metrics)
    source = f" source-class ACC {final['source_acc']:.4f}" if "source_acc" in final else ""
    log(f"final: ACC {final['clean_acc']:.4f} ASR {final['asr']:.4f} RA {final['ra']:.4f}{source} "
        f"({timer():.0f} s); model in {os.path.join(output_dir, 'last_model.th')}")
    log.close()
    return metrics
