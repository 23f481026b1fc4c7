"""SODA's results over a folder of runs (the layout of scripts/soda_table_cpu.sh), as a Markdown table.

Usage: python3 scripts/soda_table.py runs/soda > table.md

One row per model folder ``NAME-sSEED`` with ``backdoor/metrics.json`` and ``soda/metrics.json``: stage 1's
ACC / ASR / source-class accuracy, what the detection said, the MAD z-score of the highest-scoring class and
of the attack's true target (how far from flagging each was), and ACC / ASR / source-class accuracy after
removal with the seconds per step. An optional ``soda-oracle/`` folder (removal for the attacker's pair) adds
a row. Below the table, what the one fixed rule did per kind of model: benign models flagged (the false-positive
rate over seeds), semantic models flagged as exactly their attacker's pair, other attacks flagged. ANP and RNP
on the same folders: scripts/attack_table.py.
"""
from __future__ import annotations

import json
import os
import sys


def load(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def z_scores(detection: dict) -> list[float]:
    test = detection["target_test"]
    mad = test["mad"] or float("nan")
    return [(x - test["median"]) / mad for x in test["normalized"]]


def detection_cells(detection: dict, true_target: int | None) -> list[str]:
    z = z_scores(detection)
    top = max(range(len(z)), key=z.__getitem__)
    said = "none" if detection["target"] is None else f"{detection['source']} → {detection['target']}"
    return [said, f"{top} ({z[top]:.2f})", "–" if true_target is None else f"{z[true_target]:.2f}"]


def soda_row(name: str, stage1: dict, soda: dict, label: str = "SODA") -> str:
    attack = stage1.get("attack")
    true_target = stage1.get("poison_target") if attack not in (None, "benign") else None
    after, timings = soda.get("after", soda["before"]), soda.get("timings", {})
    seconds = "/".join(f"{timings.get(f'{step}_seconds', 0):.0f}" for step in ("analyze", "detect", "gen_trigger",
                                                                                  "remove"))
    return " | ".join([name, label, fmt(stage1["clean_acc"]), fmt(stage1["asr"] if true_target is not None else None),
                       fmt(stage1.get("source_acc")), *detection_cells(soda["detection"], true_target),
                       fmt(after["clean_acc"]), fmt(after["asr"]), fmt(after.get("source_acc")), seconds])


def outcome(stage1: dict, detection: dict) -> tuple[str, bool]:
    """(kind of model, the count that matters for it): benign -> flagged at all (a false positive); semantic ->
    flagged as exactly its (source, target); any other attack -> flagged at all."""
    attack = stage1.get("attack") or "benign"
    if attack == "benign":
        return "benign models flagged (false positives)", detection["target"] is not None
    if attack == "semantic":
        pair = (stage1.get("source_class"), stage1.get("poison_target"))
        return "semantic models flagged as their attacker's pair", (detection["source"], detection["target"]) == pair
    return "models of other attacks flagged", detection["target"] is not None


def summary(models: list[tuple[str, dict, dict]]) -> list[str]:
    """(name, stage-1 metrics, detection) per model -> one line per kind: 'kind: k of n (the models counted)'."""
    outcomes: dict[str, list] = {}
    for name, stage1, detection in models:
        kind, hit = outcome(stage1, detection)
        outcomes.setdefault(kind, []).append((name, hit))
    return [f"- {kind}: {sum(hit for _, hit in rows)} of {len(rows)} "
            f"({', '.join(name + (' yes' if hit else ' no') for name, hit in rows)})"
            for kind, rows in outcomes.items()]


def main(root: str) -> None:
    detected = []
    print("| model | defense | ACC | ASR | source ACC | detected (source → target) | top class (z) | true target z "
          "| ACC after | ASR after | source ACC after | seconds (analyze/detect/gen/remove) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in sorted(os.listdir(root)):
        stage1 = load(os.path.join(root, name, "backdoor", "metrics.json"))
        if stage1 is None:
            continue
        for folder, label in (("soda", "SODA"), ("soda-oracle", "SODA, attacker's pair (oracle)")):
            soda = load(os.path.join(root, name, folder, "metrics.json"))
            if soda is not None:
                print("| " + soda_row(name, stage1, soda, label) + " |")
                if folder == "soda" and soda.get("detection"):
                    detected.append((name, stage1, soda["detection"]))
    if detected:
        print("\nThe one fixed detection rule over these models:")
        print("\n".join(summary(detected)))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python3 scripts/soda_table.py RUNS_DIR (folders NAME-sSEED/{backdoor,soda,...})")
    main(sys.argv[1])
