"""Stage 1: train a backdoored classifier (ANP's train_backdoor_cifar.py).

Writes model_init.th, model_<epoch>.th every --save-every epochs, last_model.th, trigger_info.th, output.log
and metrics.json to --output-dir. The flags come from training/backdoor.py's TrainConfig and the attack
registry (data/attacks/): ``python3 train_backdoor_cifar.py --help``.
"""
from data.attacks.cli import add_attack_args, attack_kwargs
from training.backdoor import AttackChoice, TrainConfig, train_backdoor
from utils.cli import RunSettings
from utils.errors import ArgumentParser, run_cli
from utils.options import add_flags, from_args


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train a backdoored model (stage 1 of ANP).")
    add_flags(p, RunSettings, defaults={"dataset": "cifar10"})
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default="logs/models/",
                   help="folder for the models, trigger_info.th, output.log and metrics.json")
    add_flags(p, TrainConfig, title="training")
    add_attack_args(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args) -> dict:
    attack = attack_kwargs(args)
    choice = AttackChoice(attack["poison_type"], attack["poison_target"], attack["target_type"],
                          attack["attack_options"])
    return train_backdoor(from_args(RunSettings, args), from_args(TrainConfig, args), choice, args.output_dir)


if __name__ == "__main__":
    run_cli(main, parse_args(), build_parser())
