"""Golden regression: a short seeded run of every stage compared with text files in ``tests/golden/``.

A fixed seed, the tiny generated dataset and a width-4 ResNet-18: stage 1 (2 epochs), ANP stage 2
(60 iterations with the defaults, and 10 with ``--bn-mode eval --project-noise --anp-steps 2``), the
stage-3 sweep, and RNP's three phases. Numbers must match within 1e-4; names and counts exactly.
Speed work and refactors must leave these files alone. A deliberate change of the numbers rewrites
them with

    python -m pytest tests/test_golden.py --update-golden

in the same commit, with the reason in its message.

One set per CPU vendor (``tests/golden/<vendor_id>/``): the same code gives other numbers on an AMD EPYC and
an Intel Xeon (stage 1's first-epoch poison loss 5.90 and 3.00), most likely through MKL's vendor-specific
code paths (forcing its other branches with ``MKL_CBWR`` moves the numbers again; capping oneDNN's ISA does
not), and a few SGD steps on a width-4 network amplify the different rounding into other models. A vendor
without a set is skipped with a message; ``--update-golden`` on such a machine creates its set.
"""
from __future__ import annotations

import json
import os
import platform

import pytest
import torch

import optimize_mask_cifar
import prune_neuron_cifar
import rnp_main
import train_backdoor_cifar


def cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo (GenuineIntel, AuthenticAMD), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", cpu_vendor())
TOLERANCE = 1e-4
COMMON = ["--width", "4", "--device", "cpu", "--seed", "0", "--no-progress"]


@pytest.fixture(scope="module")
def golden_run(tiny_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    data = COMMON + ["--data-dir", tiny_cifar]
    train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        data + ["--epoch", "2", "--schedule", "1", "--batch-size", "64", "--lr", "0.02", "--save-every", "10",
                "--poison-type", "blend", "--trigger-alpha", "0.5", "--poison-rate", "0.1",
                "--output-dir", str(out / "stage1")]))
    model = ["--checkpoint", str(out / "stage1" / "last_model.th"),
             "--trigger-info", str(out / "stage1" / "trigger_info.th")]
    defense = ["--val-frac", "0.05", "--batch-size", "32"]
    optimize_mask_cifar.main(optimize_mask_cifar.parse_args(
        data + model + defense + ["--nb-iter", "60", "--print-every", "30", "--output-dir", str(out / "anp")]))
    optimize_mask_cifar.main(optimize_mask_cifar.parse_args(
        data + model + defense + ["--nb-iter", "10", "--print-every", "10", "--bn-mode", "eval", "--project-noise",
                                  "--anp-steps", "2", "--output-dir", str(out / "anp_variant")]))
    prune_neuron_cifar.main(prune_neuron_cifar.parse_args(
        data + model + ["--mask-file", str(out / "anp" / "mask_values.txt"), "--pruning-max", "0.6",
                        "--output-dir", str(out / "anp")]))
    rnp_main.main(rnp_main.parse_args(
        data + ["--backdoor_model_path", model[1], "--trigger-info", model[3], "--ratio", "0.05", "--batch_size", "32",
                "--unlearning_epochs", "6", "--recovering_epochs", "3", "--eval_every", "0", "--pruning-max", "0.8",
                "--stop_check", "batch",  # the golden files were made with the per-batch rule (then the default)
                "--log_root", str(out / "rnp"), "--output_weight", str(out / "rnp")]))
    return out


def _metrics(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _numbers(row: dict, keys) -> str:
    return " ".join(f"{row[k]:.6f}" if isinstance(row[k], float) else str(row[k]) for k in keys)


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def stage1_text(out) -> str:
    m = _metrics(out / "stage1" / "metrics.json")
    keys = ("epoch", "train_loss", "train_acc", "clean_loss", "clean_acc", "poison_loss", "asr", "ra")
    return "\n".join([" ".join(keys)] + [_numbers(row, keys) for row in m["epochs"]]) + "\n"


def rnp_unlearning_text(out) -> str:
    m = _metrics(out / "rnp" / "metrics.json")
    keys = ("epoch", "lr", "train_loss", "train_acc")
    summary = m["unlearning"]
    lines = [" ".join(keys)] + [_numbers(row, keys) for row in m["unlearning_epochs"]]
    lines.append(f"stopped {summary['stopped']} at epoch {summary['stop_epoch']} "
                 f"with accuracy {summary['stop_train_acc']:.6f}")
    tar = torch.load(out / "rnp" / "unlearned_model_last.tar", weights_only=True)
    lines.append(f"tar epoch {tar['epoch']} clean_acc {tar['clean_acc']:.6f} bad_acc {tar['bad_acc']:.6f}")
    return "\n".join(lines) + "\n"


ARTIFACTS = {
    "stage1_epochs.txt": stage1_text,
    "anp_mask_values.txt": lambda out: _read(out / "anp" / "mask_values.txt"),
    "anp_eval_project_steps2_mask_values.txt": lambda out: _read(out / "anp_variant" / "mask_values.txt"),
    "anp_pruning_by_threshold.txt": lambda out: _read(out / "anp" / "pruning_by_threshold.txt"),
    "rnp_unlearning.txt": rnp_unlearning_text,
    "rnp_mask_values.txt": lambda out: _read(out / "rnp" / "mask_values.txt"),
    "rnp_pruning_by_threshold.txt": lambda out: _read(out / "rnp" / "pruning_by_threshold.txt"),
}


def _differs(expected: str, actual: str) -> bool:
    try:
        return abs(float(expected) - float(actual)) > TOLERANCE + 1e-9
    except ValueError:
        return expected != actual


def compare(expected: str, actual: str, name: str) -> None:
    """Token by token: numbers within ``TOLERANCE``, everything else exactly. Fails on the first difference."""
    want, got = expected.splitlines(), actual.splitlines()
    if len(want) != len(got):
        pytest.fail(f"{name}: {len(got)} lines, the golden file has {len(want)}; "
                    f"if the change is deliberate, rerun with --update-golden and say why in the commit")
    for number, (a, b) in enumerate(zip(want, got), start=1):
        ta, tb = a.split(), b.split()
        if len(ta) != len(tb) or any(_differs(x, y) for x, y in zip(ta, tb)):
            pytest.fail(f"{name} line {number} differs from the golden file (tolerance {TOLERANCE}):\n"
                        f"  golden: {a.strip()}\n  now:    {b.strip()}\n"
                        f"if the change is deliberate, rerun with --update-golden and say why in the commit")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_matches_golden(golden_run, update_golden, name):
    actual = ARTIFACTS[name](golden_run)
    path = os.path.join(GOLDEN, name)
    if not update_golden and not os.path.isdir(GOLDEN):
        pytest.skip(f"no golden numbers for {cpu_vendor()} CPUs ({GOLDEN}); create them with --update-golden")
    if update_golden:
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(actual)
        return
    assert os.path.isfile(path), f"{path} is missing; create it with --update-golden"
    compare(_read(path), actual, name)


def test_compare_catches_small_and_structural_changes():
    compare("a 0.12345 3\n", "a 0.12349 3\n", "same within tolerance")
    for changed in ("a 0.12400 3\n", "b 0.12345 3\n", "a 0.12345 4\n", "a 0.12345 3\nextra\n"):
        with pytest.raises(pytest.fail.Exception):
            compare("a 0.12345 3\n", changed, "changed")
