"""Stage 1: train a backdoored classifier (ANP's train_backdoor_cifar.py).

Writes model_init.th, model_<epoch>.th every --save-every epochs, last_model.th,
trigger_info.th, output.log and metrics.json to --output-dir.
"""
from __future__ import annotations

import os

import torch

from data import attacker_indices, create_attack, get_spec, load_dataset, split_permutation
from data.attacks.base import CANDIDATE_RULES
from data.attacks.cli import add_attack_args, attack_kwargs
from data.augment import AUGMENTATIONS, NORMALIZATIONS, BatchTransform, default_augmentation, normalization_stats
from data.splits import HELD_OUT_FRAC
from data.trigger_info import make_trigger_info
from models.factory import check_model_args, load_model, make_model
from utils.checkpoint import atomic_save, plain_state_dict
from utils.cli import add_common_args, check_positive
from utils.device import make_runtime
from utils.errors import ArgumentParser, UserError, run_cli
from utils.evaluation import backdoor_metrics, eval_sets_for
from utils.run_log import Timer, run_metadata, start_run, write_metrics
from utils.training import COMPILE_MODES, LAST_BATCHES, compile_model, sgd_with_schedule, train_epoch


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train a backdoored model (stage 1 of ANP).")
    add_common_args(p)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epoch", type=int, default=200, help="number of training epochs (exactly this many)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9, weight decay 5e-4)")
    p.add_argument("--schedule", type=int, nargs="+", default=[100, 150], help="epochs at which lr drops by 10x")
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--output-dir", default="logs/models/")
    p.add_argument("--augment", default=None, choices=list(AUGMENTATIONS),
                   help="training augmentation (default: the attack's released recipe's, else the dataset's, crop-flip "
                        "for CIFAR-10 and Fashion-MNIST); recorded in trigger_info.th so the defenses augment their "
                        "clean data alike")
    p.add_argument("--normalization", default=None, choices=list(NORMALIZATIONS),
                   help="input normalisation: dataset (mean/std) or none (pixels in [0, 1]); default: the attack's "
                        "released recipe's (semantic on Fashion-MNIST: none), else dataset; recorded in trigger_info.th")
    p.add_argument("--held-out-frac", type=float, default=None,
                   help=f"share of the training set held out clean, never trained on (default: {HELD_OUT_FRAC}; 0 "
                        "for the released semantic recipe, which trains on everything); the defenders' data is "
                        "taken from the front of the same split")
    p.add_argument("--poison-candidates", default="non-target", choices=CANDIDATE_RULES,
                   help="non-target: rate × non-target images (ANP, default); all: rate × all images (RNP)")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (off by default: on this project's CPU it gains nothing and "
                        "costs about 45 s of compilation; see the README's Speed section)")
    p.add_argument("--compile-mode", default="default", choices=[m for m in COMPILE_MODES if m != "off"],
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs, wants --last-batch drop "
                        "or pad)")
    p.add_argument("--last-batch", default="keep", choices=LAST_BATCHES,
                   help="the epoch's last, smaller batch: keep (the original tools'), drop, or pad it to a full batch "
                        "(static shapes for a compiled model on a GPU)")
    p.add_argument("--init-model", default=None,
                   help="start from these weights instead of a fresh initialisation (e.g. the released semantic "
                        "trainer's tuning run: a trained model, a few more epochs at a higher --semantic-ratio)")
    add_attack_args(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def given_clean_model(args, attack, spec, runtime):
    """``--clean-model`` loaded (a one-line error if it does not fit), or None."""
    if not attack.opts.get("clean_model"):
        return None
    return load_model(attack.opts["clean_model"], args.arch, spec, args.width, runtime, argument="--clean-model")


def train_surrogate(args, attack, spec, runtime, images, labels, transform, log):
    """A clean model of the same architecture, for attacks that craft their trigger with one."""
    model = make_model(args.arch, spec, args.width, masked=False, runtime=runtime)
    epochs = attack.opts["surrogate_epochs"]
    optimizer, scheduler = sgd_with_schedule(model, args.lr, [epochs // 2, 3 * epochs // 4])
    generator = torch.Generator().manual_seed(args.seed + 2)
    for epoch in range(1, epochs + 1):
        loss, acc = train_epoch(model, images, labels, transform.augment, optimizer, args.batch_size,
                                runtime.autocast, generator, args.progress, desc=f"surrogate {epoch}")
        scheduler.step()
        log(f"clean surrogate model, epoch {epoch}/{epochs}: train loss {loss:.4f} acc {acc:.4f}")
    atomic_save(plain_state_dict(model), os.path.join(args.output_dir, "clean_model.th"))
    return model


def training_recipe(args, attack, spec) -> tuple[str, str, float]:
    """(augmentation, normalization, held-out share): the flags where given, else the attack's released recipe,
    else the toolkit's defaults."""
    recipe = attack.recipe(spec.name)
    augmentation = args.augment or recipe.get("augment") or default_augmentation(spec.hflip)
    normalization = args.normalization or recipe.get("normalization", "dataset")
    held_out = args.held_out_frac if args.held_out_frac is not None else recipe.get("held_out_frac", HELD_OUT_FRAC)
    if not 0.0 <= held_out < 1.0:
        raise UserError(f"--held-out-frac: expected a share in [0, 1), got {held_out}")
    return augmentation, normalization, held_out


def main(args) -> dict:
    check_positive(args.epoch, "--epoch")
    check_positive(args.batch_size, "--batch-size")
    spec = get_spec(args.dataset)
    check_model_args(args.arch, args.width)
    # Every attack option is checked here, before anything is written.
    attack = create_attack(args.poison_type, args.poison_target, spec.num_classes, spec.image_shape,
                           args.target_type, **attack_kwargs(args)["attack_options"])
    attack.check_training(args.batch_size)
    augmentation, normalization, held_out = training_recipe(args, attack, spec)
    runtime = make_runtime(args.device, args.amp)
    surrogate = given_clean_model(args, attack, spec, runtime)
    if args.init_model:  # checked before anything is written
        load_model(args.init_model, args.arch, spec, args.width, runtime, argument="--init-model")
    data = load_dataset(spec.name, args.data_dir)
    attack.check_data(spec.name, data.train_labels, data.test_labels)
    permutation = attack.arrange_split(split_permutation(len(data.train_labels), args.seed))
    train_idx = attacker_indices(permutation, held_out)  # the held-out part is never poisoned or trained on
    images, labels = data.train_images[train_idx], data.train_labels[train_idx]
    attack.check_poison_count(labels, args.poison_candidates)
    runtime, log = start_run(args, args.output_dir, runtime)
    mean, std = normalization_stats(normalization, spec)
    transform = BatchTransform.named(augmentation, mean, std, runtime.device, channels_last=runtime.channels_last)
    timer = Timer()
    generator = torch.Generator().manual_seed(args.seed + 1)
    if attack.needs_surrogate and surrogate is None:
        surrogate = train_surrogate(args, attack, spec, runtime, images.to(runtime.device), labels.to(runtime.device),
                                    transform, log)
    attack.prepare(images, labels, surrogate, transform.normalize, generator, indices=train_idx)
    poisoned = attack.poison(images, labels, generator, args.poison_candidates)
    prepare_seconds = timer()

    def save_trigger_info():
        info = make_trigger_info(attack, spec.name, args.seed, permutation, train_idx[poisoned.poison_indices],
                                 args.poison_candidates, augmentation, train_idx[poisoned.cover_indices],
                                 normalization, mean, std, held_out)
        atomic_save(info, os.path.join(args.output_dir, "trigger_info.th"))

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
    model = (load_model(args.init_model, args.arch, spec, args.width, runtime, argument="--init-model")
             if args.init_model else make_model(args.arch, spec, args.width, masked=False, runtime=runtime))
    optimizer, scheduler = sgd_with_schedule(model, args.lr, args.schedule)
    atomic_save(plain_state_dict(model), os.path.join(args.output_dir, "model_init.th"))
    if args.compile:
        compile_model(model, args.compile_mode)  # in place: the same module, parameters and state_dict keys

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
                                                args.batch_size, runtime.autocast, generator, args.progress,
                                                desc=f"{phase} {epoch}", batch_hook=hook, last_batch=args.last_batch)
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
            if epoch % args.save_every == 0:
                atomic_save(plain_state_dict(model), os.path.join(args.output_dir, f"model_{epoch}.th"))

    run_epochs(1, args.epoch, optimizer, scheduler, "epoch")
    tune = attack.tune_phase()
    if tune is not None:  # the released stripet trainer's second run; its model is the one analysed
        tune_epochs, tune_lr = tune
        attack.begin_tune()
        optimizer, scheduler = sgd_with_schedule(model, tune_lr, [])
        log(f"tune: {tune_epochs} epochs at constant lr {tune_lr} ({attack.name}'s tune phase, fresh optimizer)")
        run_epochs(args.epoch + 1, tune_epochs, optimizer, scheduler, "tune")
    changed = attack.finalize(model, images, labels, transform.normalize, generator, log)
    if changed is not model:  # the attack changed the trained model (AWP): measure what is saved
        model = changed
        start = timer()
        m = backdoor_metrics(model, eval_sets, transform.normalize, autocast=runtime.autocast)
        history.append({**history[-1], **m, "seconds": timer() - start, "finalized": True})
        log(f"after {attack.name}'s change of the trained model: ASR {m['asr']:.4f} RA {m['ra']:.4f} "
            f"ACC {m['clean_acc']:.4f}")
    atomic_save(plain_state_dict(model), os.path.join(args.output_dir, "last_model.th"))
    if attack.learns_trigger:
        save_trigger_info()  # with the trained generator's weights

    final = history[-1]
    metrics = {**run_metadata(args, runtime), "attack": attack.name, "attack_options": attack.opts,
               "poison_target": attack.target, "poisoned_images": len(poisoned.poison_indices),
               "cover_images": len(poisoned.cover_indices), "augmentation": augmentation,
               "normalization": normalization, "held_out_frac": held_out,
               "clean_acc": final["clean_acc"], "asr": final["asr"], "ra": final["ra"],
               **({"source_class": attack.source_class, "source_acc": final["source_acc"]}
                  if attack.source_class is not None else {}),
               "timings": {"prepare_seconds": prepare_seconds, "train_seconds": timer() - prepare_seconds,
                           "total_seconds": timer()}, "epochs": history}
    write_metrics(os.path.join(args.output_dir, "metrics.json"), metrics)
    source = f" source-class ACC {final['source_acc']:.4f}" if "source_acc" in final else ""
    log(f"final: ACC {final['clean_acc']:.4f} ASR {final['asr']:.4f} RA {final['ra']:.4f}{source} "
        f"({timer():.0f} s); model in {os.path.join(args.output_dir, 'last_model.th')}")
    log.close()
    return metrics


if __name__ == "__main__":
    run_cli(main, parse_args())
