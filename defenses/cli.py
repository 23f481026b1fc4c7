"""A defense script from the registry: its flags generated from the run settings, the inputs and the defense's
typed config (the original tools' spellings as aliases), one call to the defense's ``run``.

    SCRIPT = DefenseScript("anp", "ANP stage 2: ...", steps=("masks",), attack_flags=True)
    build_parser, parse_args, main = SCRIPT.build_parser, SCRIPT.parse_args, SCRIPT.main
"""
from __future__ import annotations

from dataclasses import dataclass

from data.attacks.cli import add_attack_args, attack_kwargs
from utils.cli import RunSettings
from utils.errors import ArgumentParser, run_cli
from utils.options import add_flags, from_args

from .registry import DefenseInputs, InputFlags, check_steps, get_defense


@dataclass(frozen=True)
class DefenseScript:
    defense: str
    description: str
    steps: tuple[str, ...] | None = None  # the defense's steps this script runs (None: all)
    inputs: tuple[str, ...] = ("checkpoint", "trigger_info", "output_dir")  # InputFlags this script takes
    required: tuple[str, ...] = ()  # of those, the ones it must be given (besides the checkpoint)
    output_dir: str = "logs/"  # default output folder
    attack_flags: bool = False  # --poison-type and the attack options, for runs without a trigger info

    def build_parser(self) -> ArgumentParser:
        defense = get_defense(self.defense)
        p = ArgumentParser(description=self.description)
        add_flags(p, RunSettings)
        add_flags(p, InputFlags, defaults={"output_dir": self.output_dir}, only=self.inputs, required=self.required)
        add_flags(p, defense.config, title=f"{defense.name} options ({defense.summary})")
        if self.attack_flags:
            add_attack_args(p, "without --trigger-info: ")
        return p

    def parse_args(self, argv=None):
        return self.build_parser().parse_args(argv)

    def config_and_inputs(self, args):
        """The defense's config and inputs from parsed arguments (an OptionError names the option)."""
        config = from_args(get_defense(self.defense).config, args)
        inputs = DefenseInputs(settings=from_args(RunSettings, args), checkpoint=args.checkpoint,
                               output_dir=args.output_dir, trigger_info=getattr(args, "trigger_info", ""),
                               mask_file=getattr(args, "mask_file", None),
                               # with a trigger info, it decides the attack
                               attack=attack_kwargs(args) if self.attack_flags and not args.trigger_info else {},
                               steps=self.steps or check_steps(self.defense, getattr(args, "steps", None)))
        return config, inputs

    def main(self, args) -> dict:
        config, inputs = self.config_and_inputs(args)
        return get_defense(self.defense).run(config, inputs)

    def cli(self, argv=None) -> None:
        """Parse, run; a :class:`UserError` is one line naming the flag as typed, exit status 2."""
        parser = self.build_parser()
        run_cli(self.main, parser.parse_args(argv), parser)
