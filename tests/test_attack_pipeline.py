"""Every registered attack end to end on tiny generated data: stage 1 -> ANP stages 2-3, rnp_main.py and
soda_main.py.

The defenses get only the checkpoint and the trigger info (no attack-specific flag), and must rebuild
the same poisoned test set: their "before" numbers equal stage 1's final ones.
"""
from __future__ import annotations

import json

import pytest

import optimize_mask_cifar
import prune_neuron_cifar
import rnp_main
import soda_main
import train_backdoor_cifar
from data import ATTACKS

COMMON = ["--width", "8", "--device", "cpu", "--seed", "0", "--no-progress"]
# Short crafting steps for the attacks that make their trigger with a surrogate model.
FAST = {"trojan": ["--surrogate-epochs", "1", "--trojan-steps", "3"],
        "clean-label": ["--surrogate-epochs", "1", "--pgd-steps", "1"],
        "a-blend": ["--poison-rate", "0.05", "--cover-rate", "0.05"]}
FAST["dfst"] = ["--style-steps", "20", "--detox-epochs", "1"]  # a short style fit and injector training
FAST["fc"] = ["--surrogate-epochs", "1", "--fc-poisons", "20", "--fc-steps", "2"]  # ~180 target-class images here
FAST["awp"] = ["--awp-steps", "3", "--awp-samples", "128"]
SWEEP = ["--pruning-max", "0.2", "--pruning-step", "0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_through_every_defense(name, tiny_cifar, tiny_semantic, tmp_path):
    data = ["--data-dir", tiny_cifar]
    fast = FAST.get(name, []) + (["--semantic-file", tiny_semantic, "--semantic-attack", "toy"]
                                 if name == "semantic" else [])
    stage1 = train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        COMMON + data + ["--epoch", "1", "--batch-size", "64", "--poison-type", name, "--output-dir",
                         str(tmp_path / "backdoor")] + fast))
    assert stage1["attack"] == name and (tmp_path / "backdoor" / "last_model.th").is_file()
    ckpt, info = str(tmp_path / "backdoor" / "last_model.th"), str(tmp_path / "backdoor" / "trigger_info.th")
    anp = ["--checkpoint", ckpt, "--trigger-info", info, "--output-dir", str(tmp_path / "anp"), "--val-frac", "0.05"]
    stage2 = optimize_mask_cifar.main(optimize_mask_cifar.parse_args(
        COMMON + data + anp + ["--nb-iter", "3", "--print-every", "3", "--batch-size", "32"]))
    stage3 = prune_neuron_cifar.main(prune_neuron_cifar.parse_args(
        COMMON + data + anp + SWEEP + ["--mask-file", str(tmp_path / "anp" / "mask_values.txt")]))
    rnp = rnp_main.main(rnp_main.parse_args(
        COMMON + data + SWEEP + ["--backdoor_model_path", ckpt, "--trigger_info", info, "--ratio", "0.05",
                                 "--log_root", str(tmp_path / "rnp"), "--output_weight", str(tmp_path / "rnp"),
                                 "--unlearning_epochs", "1", "--recovering_epochs", "1"]))
    soda = soda_main.main(soda_main.parse_args(
        COMMON + data + ["--checkpoint", ckpt, "--trigger-info", info, "--output-dir", str(tmp_path / "soda"),
                         "--recon_steps", "5", "--epoch", "1", "--num_recon", "4"]))
    for before in (stage2["before"], stage3["before"], rnp["before"], soda["before"]):
        for key in ("clean_acc", "asr", "ra"):
            expected = None if name == "benign" and before is soda["before"] and key != "clean_acc" else stage1[key]
            assert before[key] == pytest.approx(expected, abs=1e-6), (key, before, stage1)
    if name == "semantic":  # the source class's accuracy is reported by every stage
        for before in (stage2["before"], stage3["before"], rnp["before"], soda["before"]):
            assert before["source_acc"] == pytest.approx(stage1["source_acc"], abs=1e-6)
    for metrics in (stage3, rnp):
        point = metrics["operating_point"]
        assert point["threshold"] == 0.2 and 0 <= point["asr"] <= 1 and 0 <= point["clean_acc"] <= 1
    saved = json.loads((tmp_path / "backdoor" / "metrics.json").read_text())
    assert saved["attack_options"] == stage1["attack_options"] and saved["timings"]["train_seconds"] > 0
    for metrics in (saved, stage2, stage3, rnp):  # one process per stage: its peak memory
        assert metrics["peak_memory_mib"]["host"] > 0
