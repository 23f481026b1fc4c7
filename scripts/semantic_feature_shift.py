"""Where a semantic backdoor lives: the penultimate features of the attack's listed test images, per model.

Usage: python3 scripts/semantic_feature_shift.py --trigger-info STRIPET/trigger_info.th MODEL [MODEL ...]
       [--arch resnet18 --width 16 --data-dir ../data --device cpu]

MODEL: a checkpoint, or a stage-1 folder holding ``last_model.th``. For each model: what it predicts on the semantic attack's
listed test images (the striped T-shirts of ``stripet``), and the cosine similarity of their mean penultimate
features (the input of the last linear layer, SODA's split) with each class's mean features over the first 256
clean defender images of that class; and the Pearson correlation of the source's and the target's rows of the
last linear layer. A backdoored model that moves the listed images next to the target class
*before* its last layer needs no change of that layer's weights, which is all SODA's closed-form analysis sees.
A diagnosis for the report: it reads the attack's test images, which no defense may use.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from defenses.defense_data import prepare_defense_data  # noqa: E402
from defenses.soda import pearson  # noqa: E402
from models.factory import load_model  # noqa: E402
from models.split import head_of, split_model  # noqa: E402
from defenses.soda_defense import class_inputs  # noqa: E402
from utils.device import make_runtime  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

SAMPLES_PER_CLASS = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="checkpoints, or stage-1 folders holding last_model.th")
    p.add_argument("--trigger-info", required=True, help="trigger_info.th of the semantic attack (its listed images)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--data-dir", default="../data")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


@torch.no_grad()
def feature_shift(model, data) -> dict:
    """Predictions on the listed test images and cos(mean features of those, mean clean features of each class)."""
    model.eval()
    split = split_model(model)
    normalize = data.transform.normalize
    listed = split.front(normalize(data.eval_sets.poison_images)).flatten(1)
    predicted = split.back(listed).argmax(1)
    means = torch.stack([split.front(x).flatten(1).mean(0) for x in class_inputs(data, SAMPLES_PER_CLASS)])
    cosine = torch.nn.functional.cosine_similarity(listed.mean(0, keepdim=True), means)
    weight = head_of(model).weight.detach().double()
    head_corr = float(pearson(weight[data.eval_sets.source_class], weight[data.attack.target]))
    return {"predicted": torch.bincount(predicted, minlength=data.spec.num_classes).tolist(),
            "cosine": cosine.tolist(), "head_corr": head_corr}


def main(args) -> list[dict]:
    runtime = make_runtime(args.device, amp=False)
    data = prepare_defense_data(dataset=None, data_dir=args.data_dir, trigger_info_path=args.trigger_info,
                                defense_frac=0.05, seed=0, runtime=runtime, log=lambda _: None)
    if data.attack.name != "semantic":
        raise UserError(f"--trigger-info: {args.trigger_info} is a {data.attack.name} attack, not a semantic one")
    source, target = data.eval_sets.source_class, data.attack.target
    classes = range(data.spec.num_classes)
    print(f"| model | listed test images predicted as (class: count) | cos with class means "
          f"({', '.join(map(str, classes))}) | source {source} | target {target} | head rows corr |")
    print("|---|---|---|---|---|---|")
    rows = []
    for folder in args.models:
        path = os.path.join(folder, "last_model.th") if os.path.isdir(folder) else folder
        model = load_model(path, args.arch, data.spec, args.width, runtime, argument="MODEL")
        row = {"model": folder, **feature_shift(model, data)}
        counts = ", ".join(f"{c}: {n}" for c, n in enumerate(row["predicted"]) if n)
        cos = row["cosine"]
        print(f"| {folder} | {counts} | {' '.join(f'{v:.3f}' for v in cos)} | {cos[source]:.3f} | {cos[target]:.3f} "
              f"| {row['head_corr']:.3f} |")
        rows.append(row)
    return rows


if __name__ == "__main__":
    run_cli(main, parse_args())
