"""soda_main.py end to end on tiny generated data: a semantic attack from stage 1, every step alone and all
at once, the artifacts other tools read, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import soda_main
from defenses import soda_defense
import train_backdoor_cifar
from experiments.detection_report import detection_lines
from conftest import ROOT
from models import create_model
from utils.errors import UserError

COMMON = ["--width", "8", "--device", "cpu", "--seed", "0", "--no-progress"]
FAST = ["--recon_steps", "30", "--epoch", "2", "--num_sample", "32", "--num_recon", "8"]


@pytest.fixture(scope="module")
def semantic_model(tiny_cifar, tiny_semantic, tmp_path_factory):
    out = tmp_path_factory.mktemp("semantic")
    metrics = train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        COMMON + ["--data-dir", tiny_cifar, "--epoch", "2", "--schedule", "1", "--batch-size", "32",
                  "--poison-type", "semantic", "--semantic-file", tiny_semantic, "--semantic-attack", "toy",
                  "--output-dir", str(out / "backdoor")]))
    return {"out": out, "data": ["--data-dir", tiny_cifar], "metrics": metrics,
            "ckpt": str(out / "backdoor" / "last_model.th"), "info": str(out / "backdoor" / "trigger_info.th")}


@pytest.mark.slow
def test_stage1_semantic_metrics(semantic_model):
    m = semantic_model["metrics"]
    assert m["attack"] == "semantic" and m["poisoned_images"] == 30 and m["source_class"] == 1
    assert 0 <= m["source_acc"] <= 1 and all(0 <= e["train_acc"] <= 1 for e in m["epochs"])
    info = torch.load(semantic_model["info"], weights_only=True)
    held_out = set(info["split_permutation"][:200].tolist())
    assert not held_out & set(info["state"]["train_indices"].tolist())  # the defender's data stays clean
    assert sorted(info["poison_indices"].tolist()) == sorted(info["state"]["train_indices"].tolist())


@pytest.mark.slow
def test_a_tuning_run_starts_from_the_given_model(semantic_model, tiny_semantic, tmp_path):
    """The released stripet recipe: a trained model, more epochs at a higher ratio (``--init-model``)."""
    metrics = train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        COMMON + semantic_model["data"] + ["--epoch", "1", "--lr", "0.01", "--batch-size", "32", "--poison-type",
                                           "semantic", "--semantic-file", tiny_semantic, "--semantic-attack", "toy",
                                           "--semantic-ratio", "0.7", "--init-model", semantic_model["ckpt"],
                                           "--output-dir", str(tmp_path / "tune")]))
    start = torch.load(tmp_path / "tune" / "model_init.th", weights_only=True)
    given = torch.load(semantic_model["ckpt"], weights_only=True)
    assert all(torch.equal(start[k], given[k]) for k in given)
    assert metrics["attack_options"]["semantic_ratio"] == 0.7 and len(metrics["epochs"]) == 1


@pytest.mark.slow
def test_the_released_tune_phase_runs_after_the_epochs_and_its_model_is_saved(tiny_cifar, tiny_semantic, tmp_path):
    out = tmp_path / "tuned"
    metrics = train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        COMMON + ["--data-dir", tiny_cifar, "--epoch", "1", "--batch-size", "32", "--save-every", "1",
                  "--poison-type", "semantic", "--semantic-file", tiny_semantic, "--semantic-attack", "toy",
                  "--tune-epochs", "2", "--tune-lr", "0.05", "--output-dir", str(out)]))
    assert [(e["epoch"], e["phase"], e["lr"]) for e in metrics["epochs"]] == [(1, "epoch", 0.1), (2, "tune", 0.05),
                                                                             (3, "tune", 0.05)]
    last = torch.load(out / "last_model.th", weights_only=True)
    after_tune = torch.load(out / "model_3.th", weights_only=True)
    before_tune = torch.load(out / "model_1.th", weights_only=True)
    assert all(torch.equal(last[k], after_tune[k]) for k in last)  # the tuned model is the one saved
    assert not all(torch.equal(last[k], before_tune[k]) for k in last)
    assert metrics["normalization"] == "dataset" and metrics["held_out_frac"] == 0.0  # CIFAR: normalised
    info = torch.load(out / "trigger_info.th", weights_only=True)
    assert info["held_out_frac"] == 0.0 and info["augmentation"] == "none" and info["normalization"] == "dataset"
    assert metrics["asr"] == metrics["epochs"][-1]["asr"]
    log = (out / "output.log").read_text()
    assert "the poisoned images only through the batch mix" in log and "tune: 2 epochs at constant lr 0.05" in log


@pytest.mark.slow
def test_stage1_bad_recipe_input_is_one_line(tiny_cifar, tiny_semantic, tmp_path):
    base = [sys.executable, os.path.join(ROOT, "train_backdoor_cifar.py"), "--device", "cpu", "--width", "8",
            "--data-dir", tiny_cifar, "--epoch", "1"]
    semantic = ["--poison-type", "semantic", "--semantic-file", tiny_semantic, "--semantic-attack", "toy"]
    cases = [(["--tune-epochs", "5"], "--tune-epochs: not an option of badnets"),
             (semantic + ["--semantic-ratio", "1.2"], "--semantic-ratio: expected a share in (0, 1)"),
             (semantic + ["--semantic-ratio", "0.005"], "--semantic-ratio: 0.005 of a batch of 128 gives 0 poisoned"),
             (semantic + ["--tune-ratio", "0"], "--tune-ratio"),
             (semantic + ["--semantic-ratio", "0.5"], "only 30 images are listed"),
             (["--held-out-frac", "1.5"], "--held-out-frac"),
             (["--poison-type", "semantic"], "--semantic-attack: stripet is a fashion-mnist attack")]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = subprocess.run(base + args + ["--output-dir", str(out)], capture_output=True, text=True, cwd=ROOT,
                                timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)
        assert not out.exists(), "checked before anything is written"


@pytest.mark.slow
def test_steps_alone_then_all_write_the_artifacts_other_tools_read(semantic_model, tmp_path):
    base = COMMON + semantic_model["data"] + ["--checkpoint", semantic_model["ckpt"], "--trigger-info",
                                              semantic_model["info"], "--ratio", "0.1"] + FAST
    steps = tmp_path / "steps"
    for option in ("analyze", "detect", "gen_trigger", "remove"):
        extra = ["--potential_source", "1", "--poison_target", "6"] if option in ("gen_trigger", "remove") else []
        metrics = soda_main.main(soda_main.parse_args(base + ["--output-dir", str(steps), "--option", option] + extra))
    assert set(metrics["timings"]) == {"analyze_seconds", "detect_seconds", "gen_trigger_seconds", "remove_seconds"}
    causality = torch.load(steps / "causality.th", weights_only=True)
    assert causality["matrices"].shape == (10, 64, 10) and causality["closed_form"] is True
    detection = json.loads((steps / "detection.json").read_text())
    assert {"target", "source", "scores", "thresholds"} <= set(detection) and len(detection["scores"]) == 10
    assert detection["thresholds"]["confidence"] == 3.0 and metrics["detection"]["scores"] == detection["scores"]
    recon = torch.load(steps / "reconstructed.th", weights_only=True)
    assert recon["images"].shape[1:] == (3, 32, 32) and (recon["labels"] == 1).all()  # the source, not 0
    assert (recon["source"], recon["target"]) == (1, 6) and 0 < recon["train_count"] <= len(recon["images"])
    for name in ("detection_scores.png", "reconstructed.png", "output.log"):
        assert (steps / name).stat().st_size > 0
    model = create_model("resnet18", 10, 3, 8)
    model.load_state_dict(torch.load(steps / "repaired_model.th", weights_only=True))  # plain: no mask kept
    saved = json.loads((steps / "metrics.json").read_text())
    assert saved["args"]["option"] == "remove" and saved["steps"] == ["remove"]  # the last step's own metadata
    for key in ("before", "after"):
        assert {"clean_acc", "asr", "source_acc"} <= set(saved[key])
    stage1 = semantic_model["metrics"]
    assert saved["before"]["asr"] == pytest.approx(stage1["asr"]) and saved["removed"] is True
    assert saved["before"]["source_acc"] == pytest.approx(stage1["source_acc"])
    log = (steps / "output.log").read_text()
    assert log.count("; steps ") == 4 and "remove:" in log  # one log, continued by every step

    together = soda_main.main(soda_main.parse_args(base + ["--output-dir", str(tmp_path / "all"), "--intervention"]))
    assert set(together["timings"]) >= {"analyze_seconds", "detect_seconds"}
    assert torch.load(tmp_path / "all" / "causality.th", weights_only=True)["closed_form"] is False
    again = json.loads((tmp_path / "all" / "detection.json").read_text())
    assert again["scores"] == pytest.approx(detection["scores"], abs=1e-4)  # intervention = closed form here
    if together["detection"]["target"] is None:
        assert together["after"] == together["before"] and together["removed"] is False
        assert not (tmp_path / "all" / "repaired_model.th").exists()


@pytest.mark.slow
def test_the_attackers_pair_is_an_oracle_taken_from_the_trigger_info(semantic_model, tmp_path):
    """``--pair attacker``: the trigger info's (source, target), not the detection's, reconstructed and removed,
    and recorded as an oracle; without a semantic trigger info it is a one-line error naming the flag."""
    base = COMMON + semantic_model["data"] + ["--checkpoint", semantic_model["ckpt"], "--ratio", "0.1"] + FAST
    out = tmp_path / "oracle"
    soda_main.main(soda_main.parse_args(base + ["--trigger-info", semantic_model["info"], "--option", "analyze",
                                                "--output-dir", str(out)]))
    (out / "detection.json").write_text(json.dumps({"source": 3, "target": 5}))  # another pair than the attacker's
    metrics = soda_main.main(soda_main.parse_args(base + ["--trigger-info", semantic_model["info"], "--pair",
                                                          "attacker", "--option", "gen_trigger", "--output-dir",
                                                          str(out)]))
    recon = torch.load(out / "reconstructed.th", weights_only=True)
    assert (recon["source"], recon["target"]) == (1, 6) and metrics["pair"] == "attacker"
    assert "oracle: the attacker's pair 1 -> 6" in (out / "output.log").read_text()
    with pytest.raises(UserError, match="^--pair: attacker needs a trigger info of a semantic attack"):
        soda_main.main(soda_main.parse_args(base + ["--pair", "attacker", "--output-dir", str(tmp_path / "none")]))
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_a_model_without_trigger_info_reports_no_asr(semantic_model, tmp_path):
    metrics = soda_main.main(soda_main.parse_args(
        COMMON + semantic_model["data"] + ["--checkpoint", semantic_model["ckpt"], "--ratio", "0.1",
                                           "--output-dir", str(tmp_path / "s"), "--option", "analyze"]))
    assert metrics["before"]["asr"] is None and 0 < metrics["before"]["clean_acc"] <= 1


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "soda_main.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_bad_input_is_one_line(semantic_model, tmp_path):
    base = ["--device", "cpu", "--width", "8", *semantic_model["data"], "--checkpoint", semantic_model["ckpt"],
            "--trigger-info", semantic_model["info"]]
    cases = [
        (["--option", "detect"], "causality.th is missing"),
        (["--option", "remove", "--potential_source", "1", "--poison_target", "6"], "is missing"),
        (["--option", "gen_trigger"], "detection.json is missing"),
        (["--potential_source", "10", "--poison_target", "6", "--option", "gen_trigger"], "--potential_source"),
        (["--potential_source", "1", "--option", "gen_trigger"], "give both"),
        (["--ratio", "0.001"], "--ratio: class"),
        (["--num_recon", "500"], "--num_recon: 500 reconstructed samples wanted"),
        (["--recon_weight_decay", "-1"], "--recon_weight_decay"),
        (["--split", "linear"], "--split"),
        (["--top", "0"], "--top"),
        (["--width", "16"], "--checkpoint"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = _run(*base, "--output-dir", str(out), *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)
        assert not out.exists(), "checked before anything is written"


def _records(models: dict) -> list[dict]:
    """The report's records for ``{name: (stage-1 metrics, SODA metrics)}`` (name ``attack-sSEED``)."""
    records = []
    for name, (stage1, soda) in models.items():
        attack, seed = name.rsplit("-s", 1)
        base = {"attack": attack, "seed": int(seed), "status": "done", "defense_seed": int(seed)}
        records += [{**base, "stage": "train", "defense": None, "metrics": stage1},
                    {**base, "stage": "defense", "defense": "soda", "metrics": soda}]
    return records


@pytest.mark.slow
def test_detection_report_reads_the_runs(semantic_model, tmp_path):
    out = tmp_path / "soda"
    for option in ("analyze", "detect"):
        soda_main.main(soda_main.parse_args(
            COMMON + semantic_model["data"] + ["--checkpoint", semantic_model["ckpt"], "--trigger-info",
                                               semantic_model["info"], "--ratio", "0.1", "--option", option,
                                               "--output-dir", str(out)]))
    soda = json.loads((out / "metrics.json").read_text())
    lines = detection_lines(_records({"semantic-s0": (semantic_model["metrics"], soda)}))
    rows = [line for line in lines if line.startswith("| semantic/seed0")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    m = semantic_model["metrics"]
    assert len(rows) == 1 and cells[1] == "soda" and cells[5] == f"{m['source_acc']:.3f}"
    detection = json.loads((out / "detection.json").read_text())
    test = detection["target_test"]
    assert cells[4] == f"{(test['normalized'][6] - test['median']) / test['mad']:.2f}"  # the true target's z
    hit = (detection["source"], detection["target"]) == (1, 6)
    assert f"- semantic models flagged as their attacker's pair: {int(hit)} of 1 (semantic/seed0 " \
           f"{'yes' if hit else 'no'})" in lines


def test_detection_report_summarises_the_fixed_rule_per_kind_of_model():
    """Benign: flagged at all is a false positive; semantic: only its own (source, target) counts; other attacks:
    flagged at all."""
    def soda(target, source):
        return {"detection": {"target": target, "source": source,
                              "target_test": {"normalized": [0.1, 0.9, 0.2], "median": 0.2, "mad": 0.1}}}
    semantic = {"attack": "semantic", "source_class": 0, "poison_target": 2}
    lines = detection_lines(_records({
        "benign-s0": ({"attack": "benign"}, soda(None, None)), "benign-s1": ({"attack": "benign"}, soda(1, 3)),
        "semantic-s0": (semantic, soda(2, 0)), "semantic-s1": (semantic, soda(2, 1)),
        "badnets-s0": ({"attack": "badnets", "poison_target": 0}, soda(None, None))}))
    assert lines[-4:-1] == ["- benign models flagged (false positives): 1 of 2 (benign/seed0 no, benign/seed1 yes)",
                            "- semantic models flagged as their attacker's pair: 1 of 2 (semantic/seed0 yes, "
                            "semantic/seed1 no)", "- models of other attacks flagged: 0 of 1 (badnets/seed0 no)"]
    assert "| benign/seed1 | soda | 3 → 1 | 1 (7.00) | – | – |" in lines


def most_confused_pair(arch: str, checkpoint: str, data_dir: str) -> tuple[int, int]:
    """(source, target): the pair of classes the model confuses most on the defender's images. The barely trained
    tiny models hardly respond to their input (on an Intel Xeon the VGG's target logit rose 8.41 -> 8.56 in 300
    reconstruction steps), so a fixed pair may see no image reach its target; here some already have."""
    from defenses.defense_data import prepare_defense_data
    from models.factory import load_model
    from utils.device import make_runtime
    runtime = make_runtime("cpu")
    data = prepare_defense_data(dataset="cifar10", data_dir=data_dir, trigger_info_path=None, defense_frac=0.1, seed=0,
                                runtime=runtime, poison_type="benign", log=lambda _: None)
    model = load_model(checkpoint, arch, data.spec, 8, runtime).eval()
    with torch.no_grad():
        counts = torch.stack([torch.bincount(model(x).argmax(1), minlength=10)
                              for x in soda_defense.class_inputs(data, 100)])
    counts.fill_diagonal_(0)
    source, target = divmod(int(counts.argmax()), 10)
    assert counts[source, target] >= 2, "the model confuses no pair twice: nothing to reconstruct"
    return source, target


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg19_bn", "mobilenetv2"])
def test_every_step_runs_on_the_other_architectures(arch, tiny_cifar, tmp_path):
    train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        COMMON + ["--data-dir", tiny_cifar, "--arch", arch, "--epoch", "2", "--lr", "0.02", "--batch-size", "64",
                  "--poison-type", "benign", "--output-dir", str(tmp_path / "clean")]))
    checkpoint = str(tmp_path / "clean" / "last_model.th")
    source, target = most_confused_pair(arch, checkpoint, tiny_cifar)
    metrics = soda_main.main(soda_main.parse_args(
        COMMON + ["--data-dir", tiny_cifar, "--arch", arch, "--checkpoint", checkpoint, "--ratio", "0.1",
                  "--potential_source", str(source), "--poison_target", str(target), "--recon_steps", "300",
                  "--epoch", "1", "--num_sample", "8", "--num_recon", "8", "--output-dir", str(tmp_path / "soda")]))
    assert metrics["removed"] is True and set(metrics["timings"]) == {f"{s}_seconds" for s in soda_defense.STEPS}
    repaired = create_model(arch, 10, 3, 8)
    repaired.load_state_dict(torch.load(tmp_path / "soda" / "repaired_model.th", weights_only=True))


@pytest.mark.slow
def test_feature_shift_diagnosis_agrees_with_stage1(semantic_model, capsys):
    """scripts/semantic_feature_shift.py: its counts of listed test images predicted as the target are stage 1's
    ASR; one row per model (folder or checkpoint); a missing model is a one-line error."""
    from scripts import semantic_feature_shift as shift
    args = shift.parse_args(["--trigger-info", semantic_model["info"], "--width", "8", *semantic_model["data"],
                             str(semantic_model["out"] / "backdoor"), semantic_model["ckpt"]])
    rows = shift.main(args)
    info = torch.load(semantic_model["info"], weights_only=True)
    listed, target = len(info["state"]["test_indices"]), int(info["state"]["target"])
    m = semantic_model["metrics"]
    assert len(rows) == 2 and rows[0]["predicted"] == rows[1]["predicted"]
    assert sum(rows[0]["predicted"]) == listed
    assert rows[0]["predicted"][target] == round(m["asr"] * listed)
    assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in rows[0]["cosine"] + [rows[0]["head_corr"]])
    assert len(rows[0]["cosine"]) == 10
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]) == 3  # header, two rows
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "semantic_feature_shift.py"),
                             "--trigger-info", semantic_model["info"], "--width", "8", *semantic_model["data"],
                             "/no/such/model.th"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "MODEL" in lines[0], result.stderr
