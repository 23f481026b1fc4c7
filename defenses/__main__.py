"""Any registered defense from the shell, all its steps: ``python3 -m defenses NAME [flags]``
(``python3 -m defenses`` lists them; ``python3 -m defenses NAME --help`` its flags). The grid's dry run shows
its cells in this form."""
import sys

from .cli import DefenseScript
from .registry import get_defense, list_defenses


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in list_defenses():
        print("usage: python3 -m defenses NAME [flags]; NAME one of:")
        for name in list_defenses():
            print(f"  {name:6} {get_defense(name).summary}")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    name = argv[0]
    DefenseScript(name, get_defense(name).summary,
                  inputs=("checkpoint", "trigger_info", "output_dir", "mask_file", "steps"),
                  attack_flags=get_defense(name).attack_flags).cli(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
