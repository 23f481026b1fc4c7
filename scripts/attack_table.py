"""The README's attack table from the run folders of scripts/attack_table_cpu.sh.

For each attack folder: stage 1's ACC / ASR / RA and time; for ANP and RNP the fixed operating point
(threshold 0.2, the papers') and the clean-data point (--operating-point defense-acc, max drop 0.05),
both read off the same sweep: the clean-data rule looks only at each row's defense-data accuracy.
Usage: python3 scripts/attack_table.py runs/attacks [--max-acc-drop 0.05]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from defenses.operating_point import defense_accuracy_stop  # noqa: E402


class Row:
    def __init__(self, row: dict):
        self.metrics = row
        self.value, self.pruned = row["value"], row["pruned"]


def triple(m: dict) -> str:
    return f"{m['clean_acc']:.3f} / {m['asr']:.3f} / {m['ra']:.3f}"


def defense_cells(path: str, max_acc_drop: float) -> list[str]:
    if not os.path.isfile(path):
        return ["not run", "not run"]
    metrics = json.load(open(path))
    rows = [Row(r) for r in metrics["rows"]]
    fixed = next((r for r in rows if abs(r.value - 0.2) < 1e-9), None)
    cells = [f"{triple(fixed.metrics)} ({fixed.pruned})" if fixed else "no 0.2 row"]
    index = defense_accuracy_stop(rows, metrics["before"]["defense_acc"], max_acc_drop)
    if index is None:
        cells.append(f"none: {triple(metrics['before'])} (0)")
    else:
        r = rows[index]
        cells.append(f"{r.value:g}: {triple(r.metrics)} ({r.pruned})")
    return cells


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--max-acc-drop", type=float, default=0.05)
    args = p.parse_args(argv)
    print("| attack | backdoored ACC / ASR / RA | stage 1 | ANP at 0.2 (pruned) | ANP clean-data point | "
          "RNP at 0.2 (pruned) | RNP clean-data point |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(os.listdir(args.root)):
        stage1 = os.path.join(args.root, name, "backdoor", "metrics.json")
        if not os.path.isfile(stage1):
            continue
        m = json.load(open(stage1))
        t = m["timings"]
        seconds = f"{t.get('total_seconds', t['train_seconds']):.0f} s"
        if t.get("prepare_seconds", 0) >= 1:
            seconds += f" ({t['prepare_seconds']:.0f} s crafting)"
        cells = [name, triple(m), seconds]
        cells += defense_cells(os.path.join(args.root, name, "anp", "metrics.json"), args.max_acc_drop)
        cells += defense_cells(os.path.join(args.root, name, "rnp", "metrics.json"), args.max_acc_drop)
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
