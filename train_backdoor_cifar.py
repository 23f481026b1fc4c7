"""Stage 1: train a backdoored classifier (ANP's train_backdoor_cifar.py).

Writes model_init.th, model_<epoch>.th every --save-every epochs, last_model.th,
trigger_info.th, output.log and metrics.json to --output-dir.
"""
from __future__ import annotations

import os

import torch

from data import ATTACKS, build_attack, choose_poison_indices, get_spec, load_dataset, poison_training_set
from data import attacker_indices, split_permutation
from data.attacks.badnets import TRIGGER_TYPES
from data.augment import AUGMENTATIONS, BatchTransform, default_augmentation
from data.poison import CANDIDATE_RULES
from data.trigger_info import make_trigger_info
from defenses.setup import make_eval_sets, make_model
from utils.checkpoint import atomic_save, plain_state_dict
from utils.cli import add_common_args, check_positive, check_range
from utils.errors import ArgumentParser, UserError, run_cli
from utils.evaluation import backdoor_metrics
from utils.run_log import Timer, run_metadata, start_run, write_metrics
from utils.training import train_epoch


def parse_args(argv=None):
    p = ArgumentParser(description="Train a backdoored model (stage 1 of ANP).")
    add_common_args(p)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epoch", type=int, default=200, help="number of training epochs (exactly this many)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9, weight decay 5e-4)")
    p.add_argument("--schedule", type=int, nargs="+", default=[100, 150], help="epochs at which lr drops by 10x")
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--output-dir", default="logs/models/")
    p.add_argument("--poison-type", default="badnets", help=f"one of {', '.join(ATTACKS)}")
    p.add_argument("--poison-rate", type=float, default=0.05)
    p.add_argument("--poison-target", type=int, default=0)
    p.add_argument("--trigger-alpha", type=float, default=1.0,
                   help="trigger opacity (the original's default 1.0; ANP's README uses 0.2 for blend)")
    p.add_argument("--trigger-type", default=None, help=f"badnets patch: {' | '.join(TRIGGER_TYPES)}")
    p.add_argument("--trigger-file", default=None, help="blend: image file to blend instead of the Gaussian pattern")
    p.add_argument("--target-type", default="all2one", choices=["all2one", "all2all"])
    p.add_argument("--augment", default=None, choices=list(AUGMENTATIONS),
                   help="training augmentation (default: the dataset's, crop-flip for CIFAR-10 and Fashion-MNIST); "
                        "recorded in trigger_info.th so the defenses augment their clean data alike")
    p.add_argument("--poison-candidates", default="non-target", choices=CANDIDATE_RULES,
                   help="non-target: rate × non-target images (ANP, default); all: rate × all images (RNP)")
    return p.parse_args(argv)


def main(args) -> dict:
    if args.poison_type not in ATTACKS:
        raise UserError(f"--poison-type: unknown attack {args.poison_type!r}; expected one of {', '.join(ATTACKS)}")
    check_range(args.poison_rate, 0.0, 1.0, "--poison-rate")
    check_positive(args.epoch, "--epoch")
    check_positive(args.batch_size, "--batch-size")
    if args.trigger_type is not None and args.trigger_type not in TRIGGER_TYPES:
        raise UserError(f"--trigger-type: expected one of {', '.join(TRIGGER_TYPES)}, got {args.trigger_type!r}")
    spec = get_spec(args.dataset)
    if not 0 <= args.poison_target < spec.num_classes:
        raise UserError(f"--poison-target: {args.poison_target} is outside the class range 0..{spec.num_classes - 1}")
    runtime, log = start_run(args, args.output_dir)

    data = load_dataset(spec.name, args.data_dir)
    permutation = split_permutation(len(data.train_labels), args.seed)
    train_idx = attacker_indices(permutation)  # the held-out 10% is never poisoned or trained on
    attack = build_attack(args.poison_type, args.poison_target, spec.num_classes, spec.image_shape,
                          alpha=args.trigger_alpha, trigger_type=args.trigger_type, trigger_file=args.trigger_file,
                          target_type=args.target_type)
    rate = 0.0 if args.poison_type == "benign" else args.poison_rate
    generator = torch.Generator().manual_seed(args.seed + 1)
    local = choose_poison_indices(data.train_labels[train_idx], rate, attack, generator, args.poison_candidates)
    images, labels = poison_training_set(data.train_images[train_idx], data.train_labels[train_idx], attack, local)
    poison_indices = train_idx[local]
    augmentation = args.augment or default_augmentation(spec.hflip)
    trigger_info = make_trigger_info(attack, spec.name, args.seed, permutation, poison_indices, rate,
                                     args.poison_candidates, augmentation)
    atomic_save(trigger_info, os.path.join(args.output_dir, "trigger_info.th"))
    log(f"{spec.name}: {len(labels)} training images ({len(local)} poisoned by {attack.name}, target "
        f"{attack.target}), {int(len(permutation) * 0.1)} held out clean, {len(data.test_labels)} test images; "
        f"augmentation {augmentation}")

    images, labels = images.to(runtime.device), labels.to(runtime.device)
    eval_sets = make_eval_sets(data.test_images, data.test_labels, attack, runtime.device)
    transform = BatchTransform.named(augmentation, spec.mean, spec.std, runtime.device,
                                     channels_last=runtime.channels_last)
    model = make_model(args.arch, spec, args.width, masked=False, runtime=runtime)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.schedule, gamma=0.1)
    atomic_save(plain_state_dict(model), os.path.join(args.output_dir, "model_init.th"))

    log("Epoch \t lr \t Time \t TrainLoss \t TrainACC \t PoisonLoss \t PoisonACC \t PoisonRA \t CleanLoss \t CleanACC")
    timer, history = Timer(), []
    for epoch in range(1, args.epoch + 1):
        lr = optimizer.param_groups[0]["lr"]
        start = timer()
        train_loss, train_acc = train_epoch(model, images, labels, transform.augment, optimizer, args.batch_size,
                                            runtime.autocast, generator, args.progress, desc=f"epoch {epoch}")
        scheduler.step()
        m = backdoor_metrics(model, eval_sets, transform.normalize, autocast=runtime.autocast)
        seconds = timer() - start
        log(f"{epoch} \t {lr:.3f} \t {seconds:.1f} \t {train_loss:.4f} \t {train_acc:.4f} \t {m['poison_loss']:.4f} \t "
            f"{m['asr']:.4f} \t {m['ra']:.4f} \t {m['clean_loss']:.4f} \t {m['clean_acc']:.4f}")
        history.append({"epoch": epoch, "lr": lr, "seconds": seconds, "train_loss": train_loss,
                        "train_acc": train_acc, **m})
        if epoch % args.save_every == 0:
            atomic_save(plain_state_dict(model), os.path.join(args.output_dir, f"model_{epoch}.th"))
    atomic_save(plain_state_dict(model), os.path.join(args.output_dir, "last_model.th"))

    final = history[-1]
    metrics = {**run_metadata(args, runtime), "attack": attack.name, "poison_target": attack.target,
               "poisoned_images": len(local), "augmentation": augmentation, "clean_acc": final["clean_acc"],
               "asr": final["asr"], "ra": final["ra"], "timings": {"train_seconds": timer()}, "epochs": history}
    write_metrics(os.path.join(args.output_dir, "metrics.json"), metrics)
    log(f"final: ACC {final['clean_acc']:.4f} ASR {final['asr']:.4f} RA {final['ra']:.4f} "
        f"({timer():.0f} s); model in {os.path.join(args.output_dir, 'last_model.th')}")
    log.close()
    return metrics


if __name__ == "__main__":
    run_cli(main, parse_args())
