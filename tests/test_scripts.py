"""End-to-end: every script on a tiny generated CIFAR-format dataset, plus the bad-input contract.

The pipeline runs once per module (stage 1 -> ANP -> prune -> RNP); the tests then check its
artifacts. Blend at alpha 0.5 on the generated data is learnt within a few epochs, so the
backdoor is real and ANP must lower its ASR.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import optimize_mask_cifar
import prune_neuron_cifar
import rnp_main
import train_backdoor_cifar
from conftest import ROOT
from defenses.pruning import read_mask_values, read_pruning_file
from utils.errors import UserError

COMMON = ["--width", "8", "--device", "cpu", "--seed", "0", "--no-progress"]


@pytest.fixture(scope="module")
def pipeline(tiny_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    data = ["--data-dir", tiny_cifar]
    stage1 = train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        COMMON + data + ["--epoch", "4", "--schedule", "3", "--batch-size", "32", "--lr", "0.05", "--save-every", "2",
                         "--poison-type", "blend", "--trigger-alpha", "0.5", "--poison-rate", "0.1",
                         "--output-dir", str(out / "backdoor")]))
    ckpt, info = str(out / "backdoor" / "last_model.th"), str(out / "backdoor" / "trigger_info.th")
    anp = ["--checkpoint", ckpt, "--trigger-info", info, "--output-dir", str(out / "anp")]
    stage2 = optimize_mask_cifar.main(optimize_mask_cifar.parse_args(
        COMMON + data + anp + ["--val-frac", "0.05", "--nb-iter", "100", "--print-every", "50", "--batch-size", "32"]))
    stage3 = prune_neuron_cifar.main(prune_neuron_cifar.parse_args(
        COMMON + data + anp + ["--mask-file", str(out / "anp" / "mask_values.txt")]))
    return {"out": out, "data": data, "ckpt": ckpt, "info": info, "stage1": stage1, "stage2": stage2, "stage3": stage3}


@pytest.mark.slow
def test_stage1_artifacts_and_backdoor_learned(pipeline):
    folder = pipeline["out"] / "backdoor"
    for name in ["model_init.th", "model_2.th", "model_4.th", "last_model.th", "trigger_info.th", "output.log"]:
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 <= metrics["ra"] <= 1 and len(metrics["epochs"]) == 4  # exactly --epoch epochs
    assert metrics["clean_acc"] >= 0.8 and metrics["asr"] >= 0.9
    state = torch.load(folder / "last_model.th", weights_only=True)
    assert "linear.weight" in state and not any("neuron_" in k for k in state)
    info = torch.load(folder / "trigger_info.th", weights_only=True)
    assert info["trigger_pattern"].shape == (1, 32, 32, 3) and info["dataset"] == "cifar10"
    assert info["augmentation"] == metrics["augmentation"] == "crop-flip"  # CIFAR-10's default, recorded
    assert len(info["split_permutation"]) == 2000 and len(info["poison_indices"]) == metrics["poisoned_images"]
    held_out = set(info["split_permutation"][:200].tolist())
    assert not held_out & set(info["poison_indices"].tolist())


@pytest.mark.slow
def test_anp_artifacts(pipeline):
    folder = pipeline["out"] / "anp"
    assert pipeline["stage2"]["augmentation"] == "crop-flip"  # the training augmentation, from the trigger info
    values = read_mask_values(str(folder / "mask_values.txt"))
    assert len(values) == pipeline["stage2"]["neurons"] and all(0 <= v <= 1 for _, _, v in values)
    rows = read_pruning_file(str(folder / "pruning_by_threshold.txt"))
    assert len(rows) == 19 and all(len(r) == 8 for r in rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    before, point = metrics["before"], metrics["operating_point"]
    assert before["asr"] == pytest.approx(pipeline["stage1"]["asr"])
    assert point["threshold"] == 0.2 and point["neurons_pruned"] >= 1 and point["rule"] == "fixed"
    assert [r["value"] for r in metrics["rows"]][:3] == [0.0, 0.05, 0.1]
    assert all(r1["pruned"] <= r2["pruned"] for r1, r2 in zip(metrics["rows"], metrics["rows"][1:]))  # cumulative
    assert (folder / "pruned_model.th").is_file() and (folder / "pruning_by_threshold.png").is_file()
    pruned = torch.load(folder / "pruned_model.th", weights_only=True)
    zero = sum(int((v == 0).sum()) for k, v in pruned.items() if k.endswith("weight") and v.dim() == 1)
    assert zero >= point["neurons_pruned"]
    # The clean-data rule for the operating point, opt-in.
    data, anp = pipeline["data"], ["--checkpoint", pipeline["ckpt"], "--trigger-info", pipeline["info"]]
    rule = prune_neuron_cifar.main(prune_neuron_cifar.parse_args(
        COMMON + data + anp + ["--mask-file", str(folder / "mask_values.txt"), "--output-dir", str(folder / "rule"),
                               "--operating-point", "defense-acc", "--max-acc-drop", "0.05", "--val-frac", "0.05"]))
    point, before = rule["operating_point"], rule["before"]
    assert set(rule["timings"]) == {"prune_seconds"} and "reports" not in rule  # the masks are read, not re-made
    assert not (folder / "rule" / "mask_values.txt").exists()
    assert point["rule"] == "defense-acc" and point["max_acc_drop"] == 0.05
    assert point["defense_acc"] >= before["defense_acc"] - 0.05
    assert point["threshold"] is None or any(r["value"] == point["threshold"] and r["pruned"] == point["neurons_pruned"]
                                             for r in rule["rows"])


def assert_saved_operating_point(pipeline, folder, mask_file: str, threshold: float = 0.2) -> dict:
    """``pruned_model.th``, re-evaluated here, is the reported operating point: exactly the neurons with
    mask <= threshold have gamma 0 (nothing else changed), and its ACC / ASR / RA are the reported ones."""
    point = json.loads((folder / "metrics.json").read_text())["operating_point"]
    expected = {(layer, idx) for layer, idx, value in read_mask_values(mask_file) if value <= threshold}
    original = torch.load(pipeline["ckpt"], weights_only=True)
    pruned = torch.load(folder / "pruned_model.th", weights_only=True)
    changed = {(key[:-len(".weight")], i) for key, value in pruned.items()
               for i in (value != original[key]).nonzero().flatten().tolist()}
    assert changed == expected and all(pruned[f"{layer}.weight"][i] == 0 for layer, i in changed)
    assert point["threshold"] == threshold and point["neurons_pruned"] == len(expected) >= 1
    measured = evaluate_checkpoint(pipeline, str(folder / "pruned_model.th"))
    for key in ("clean_acc", "asr", "ra"):
        assert measured[key] == pytest.approx(point[key], abs=1e-6), key
    return measured


@pytest.mark.slow
def test_anp_saved_operating_point(pipeline):
    assert_saved_operating_point(pipeline, pipeline["out"] / "anp", str(pipeline["out"] / "anp" / "mask_values.txt"))


@pytest.mark.slow
def test_same_seed_same_model(tiny_cifar, tmp_path):
    """Stage 1 with one seed twice gives the same model and trigger info; another seed does not."""
    def stage1(seed: int, name: str):
        train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
            ["--width", "4", "--device", "cpu", "--seed", str(seed), "--no-progress", "--data-dir", tiny_cifar,
             "--epoch", "1", "--batch-size", "64", "--poison-type", "badnets", "--output-dir", str(tmp_path / name)]))
        return (torch.load(tmp_path / name / "last_model.th", weights_only=True),
                torch.load(tmp_path / name / "trigger_info.th", weights_only=True))

    (a, info_a), (b, info_b), (c, info_c) = stage1(3, "a"), stage1(3, "b"), stage1(4, "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("split_permutation", "poison_indices"):
        assert torch.equal(info_a[key], info_b[key]) and not torch.equal(info_a[key], info_c[key]), key
    assert not all(torch.equal(a[k], c[k]) for k in a)


def evaluate_checkpoint(pipeline, path: str) -> dict:
    """ACC / ASR / RA of a saved checkpoint, re-evaluated here on the whole test sets."""
    from defenses.defense_data import prepare_defense_data
    from models.factory import load_model
    from utils.device import make_runtime
    from utils.evaluation import backdoor_metrics

    runtime = make_runtime("cpu")
    data = prepare_defense_data(dataset=None, data_dir=pipeline["data"][1], trigger_info_path=pipeline["info"],
                                defense_frac=0.05, seed=0, runtime=runtime, log=lambda *_: None)
    model = load_model(path, "resnet18", data.spec, 8, runtime)
    return backdoor_metrics(model, data.eval_sets, data.transform.normalize)


@pytest.mark.slow
def test_rnp_one_command(pipeline):
    out, data = pipeline["out"], pipeline["data"]
    base = COMMON + data + ["--backdoor_model_path", pipeline["ckpt"], "--trigger-info", pipeline["info"],
                            "--ratio", "0.05", "--unlearning_epochs", "5", "--recovering_epochs", "5",
                            "--batch-size", "32", "--pruning-max", "0.3"]
    first = rnp_main.main(rnp_main.parse_args(
        base + ["--log_root", str(out / "rnp"), "--output_weight", str(out / "w")]))
    for name in ["mask_values.txt", "pruning_by_threshold.txt", "pruned_model.th", "output.log", "metrics.json",
                 "pruning_by_threshold.png"]:
        assert (out / "rnp" / name).is_file(), name
    tar = torch.load(out / "w" / "unlearned_model_last.tar", weights_only=True)
    assert set(tar) >= {"epoch", "state_dict", "clean_acc", "bad_acc"}
    assert first["unlearning"]["stop_epoch"] == tar["epoch"] and set(first["timings"]) == {
        "unlearn_seconds", "recover_seconds", "prune_seconds"}
    # The tar's accuracies are those of the unlearned model it holds, on the whole test sets.
    unlearned = evaluate_checkpoint(pipeline, str(out / "w" / "unlearned_model_last.tar"))
    assert tar["clean_acc"] == pytest.approx(unlearned["clean_acc"], abs=1e-6)
    assert tar["bad_acc"] == pytest.approx(unlearned["asr"], abs=1e-6)
    assert unlearned["clean_acc"] < first["before"]["clean_acc"]  # it is unlearned, not the backdoored model
    assert first["before"]["clean_acc"] >= 0.8 and "operating_point" in first
    assert_saved_operating_point(pipeline, out / "rnp", str(out / "rnp" / "mask_values.txt"))
    # The RNP mask file parses with the ANP pruning stage.
    prune_neuron_cifar.main(prune_neuron_cifar.parse_args(
        COMMON + data + ["--checkpoint", pipeline["ckpt"], "--trigger-info", pipeline["info"],
                         "--mask-file", str(out / "rnp" / "mask_values.txt"), "--output-dir", str(out / "rnp_anp")]))


@pytest.mark.slow
def test_rnp_resume_from_an_unlearned_model_recovers_on_that_model(pipeline, monkeypatch, tmp_path):
    """``--unlearned_model_path``: phase 1 skipped, and phase 2 starts from exactly the given weights."""
    data = pipeline["data"]
    state = torch.load(pipeline["ckpt"], weights_only=True)
    given = {k: (v * 0.9 if k.endswith("conv1.weight") else v) for k, v in state.items()}  # neither model
    torch.save({"epoch": 1, "state_dict": given, "clean_acc": 0.0, "bad_acc": 0.0}, tmp_path / "given.tar")
    seen = {}
    import defenses.rnp_defense as rnp_defense
    original = rnp_defense.recover_masks

    def spy(model, *args, **kwargs):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(model, *args, **kwargs)
    monkeypatch.setattr(rnp_defense, "recover_masks", spy)
    resumed = rnp_main.main(rnp_main.parse_args(
        COMMON + data + ["--backdoor_model_path", pipeline["ckpt"], "--trigger-info", pipeline["info"],
                         "--ratio", "0.05", "--recovering_epochs", "1", "--batch-size", "32", "--pruning-max", "0.1",
                         "--unlearned_model_path", str(tmp_path / "given.tar"), "--log_root", str(tmp_path / "r"),
                         "--output_weight", str(tmp_path / "w")]))
    assert resumed["unlearning"] is None and "unlearn_seconds" not in resumed["timings"]
    assert not (tmp_path / "w").exists() and resumed["recovering_epochs"]
    for key, value in given.items():
        assert torch.equal(seen[key], value), key
    assert (tmp_path / "r" / "mask_values.txt").is_file()


@pytest.mark.slow
def test_rnp_resume_from_a_mask_file_prunes_by_that_file(pipeline, tmp_path):
    """``--mask_file``: phases 1 and 2 skipped; the backdoored model is pruned by the given masks."""
    data = pipeline["data"]
    values = read_mask_values(str(pipeline["out"] / "anp" / "mask_values.txt"))
    chosen = {("bn1", 0): 0.0, ("layer1.0.bn1", 2): 0.1, ("layer4.1.bn2", 5): 0.15}
    from defenses.pruning import write_mask_values
    write_mask_values([(layer, idx, chosen.get((layer, idx), 1.0)) for layer, idx, _ in values],
                      str(tmp_path / "mask.txt"))
    masked = rnp_main.main(rnp_main.parse_args(
        COMMON + data + ["--backdoor_model_path", pipeline["ckpt"], "--trigger-info", pipeline["info"],
                         "--ratio", "0.05", "--pruning-max", "0.3", "--mask_file", str(tmp_path / "mask.txt"),
                         "--log_root", str(tmp_path / "r"), "--output_weight", str(tmp_path / "w")]))
    assert set(masked["timings"]) == {"prune_seconds"} and masked["unlearning"] is None
    assert not (tmp_path / "w").exists() and not (tmp_path / "r" / "mask_values.txt").exists()
    assert [r["pruned"] for r in masked["rows"][:5]] == [1, 1, 2, 3, 3]
    original = torch.load(pipeline["ckpt"], weights_only=True)
    pruned = torch.load(tmp_path / "r" / "pruned_model.th", weights_only=True)
    changed = {(k, i) for k, v in pruned.items() for i in range(v.numel() if v.dim() == 1 else 0)
               if v.dim() == 1 and v[i] != original[k][i]}
    assert changed == {("bn1.weight", 0), ("layer1.0.bn1.weight", 2), ("layer4.1.bn2.weight", 5)}
    assert all(pruned[k][i] == 0 for k, i in changed)


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("script,args,needle", [
    ("train_backdoor_cifar.py", ["--poison-rate", "1.5"], "--poison-rate"),
    ("train_backdoor_cifar.py", ["--poison-type", "nope"], "--poison-type"),
    ("train_backdoor_cifar.py", ["--poison-target", "10"], "--poison-target"),
    ("train_backdoor_cifar.py", ["--arch", "resnet7"], "--arch"),
    ("train_backdoor_cifar.py", ["--dataset", "mnist3d"], "--dataset"),
    ("train_backdoor_cifar.py", ["--device", "cuda"], "--device"),
    ("optimize_mask_cifar.py", ["--checkpoint", "/nonexistent.th"], "--checkpoint"),
    ("prune_neuron_cifar.py", ["--checkpoint", "x.th"], "--mask-file"),
    ("train_backdoor_cifar.py", ["--poison-type", "badnets", "--cover-rate", "0.1"], "--cover-rate"),
    ("train_backdoor_cifar.py", ["--poison-type", "a-blend", "--cover-rate", "2"], "--cover-rate"),
    ("train_backdoor_cifar.py", ["--poison-type", "blend", "--trigger-file", "/nonexistent.png"], "--trigger-file"),
    ("train_backdoor_cifar.py", ["--poison-type", "sig", "--poison-rate", "0.001"], "--poison-rate"),
    ("train_backdoor_cifar.py", ["--poison-type", "clean-label", "--clean-model", "/nonexistent.th"], "--clean-model"),
    ("train_backdoor_cifar.py", ["--poison-type", "wanet", "--target-type", "all2all"], "--target-type"),
    ("optimize_mask_cifar.py", ["--checkpoint", "/nonexistent.th", "--poison-type", "lira"], "--trigger-info"),
    ("train_backdoor_cifar.py", ["--poison-type", "semantic"], "--semantic-attack: stripet is a fashion-mnist"),
    ("train_backdoor_cifar.py", ["--poison-type", "semantic", "--semantic-attack", "nope"], "--semantic-attack"),
    ("train_backdoor_cifar.py", ["--init-model", "/nonexistent.th"], "--init-model"),
    ("soda_main.py", ["--checkpoint", "/nonexistent.th"], "--checkpoint"),
    ("soda_main.py", ["--checkpoint", "x.th", "--recon_per_batch", "64"], "--recon_per_batch"),
])
def test_bad_input_is_one_line(tiny_cifar, tmp_path, script, args, needle):
    if needle == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = ["--output-dir", str(tmp_path / "out")]
    result = _run(script, "--data-dir", tiny_cifar, "--device", "cpu", *args, *out) if needle != "--device" else \
        _run(script, "--data-dir", tiny_cifar, *args, *out)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists(), "every script checks its input before it writes anything"


@pytest.mark.slow
def test_bad_files_are_one_line(pipeline, tmp_path):
    data = pipeline["data"]
    bad_mask = tmp_path / "mask.txt"
    bad_mask.write_text("No Layer Idx Mask\n0 bn1 zero 0.5\n")
    wrong_layer = tmp_path / "mask2.txt"
    wrong_layer.write_text("No Layer Idx Mask\n0 bn9 0 0.5\n")
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"junk")
    cases = [
        ("prune_neuron_cifar.py", ["--checkpoint", pipeline["ckpt"], "--trigger-info", pipeline["info"],
                                   "--mask-file", str(bad_mask)], "--mask-file"),
        ("prune_neuron_cifar.py", ["--checkpoint", pipeline["ckpt"], "--trigger-info", pipeline["info"],
                                   "--mask-file", str(wrong_layer)], "--mask-file"),
        ("optimize_mask_cifar.py", ["--checkpoint", pipeline["ckpt"], "--trigger-info", str(junk)], "--trigger-info"),
        ("optimize_mask_cifar.py", ["--checkpoint", pipeline["ckpt"], "--trigger-info", pipeline["info"],
                                    "--width", "16"], "--width"),
        ("optimize_mask_cifar.py", ["--checkpoint", str(junk), "--trigger-info", pipeline["info"]], "--checkpoint"),
        ("rnp_main.py", ["--backdoor_model_path", pipeline["ckpt"], "--trigger_type", "trojanTrigger"],
         "--trigger_type"),
        ("train_backdoor_cifar.py", ["--poison-type", "trojan", "--clean-model", str(junk),
                                     "--output-dir", str(tmp_path / "t1")], "--clean-model"),
        ("train_backdoor_cifar.py", ["--poison-type", "trojan", "--clean-model", pipeline["ckpt"], "--width", "16",
                                     "--output-dir", str(tmp_path / "t2")], "--clean-model"),
    ]
    for script, args, needle in cases:
        result = _run(script, *data, "--device", "cpu", "--width", "8", *args) if "--width" not in args else \
            _run(script, *data, "--device", "cpu", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (script, result.stderr)
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()


# Runs a script with every network connection refused, whatever the machine allows.
OFFLINE = """import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_missing_cifar_is_one_line(tmp_path):
    """With no way to download (sockets refused here, so a machine with internet fetches nothing)."""
    data_dir = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, "-c", OFFLINE, os.path.join(ROOT, "train_backdoor_cifar.py"),
                             "--data-dir", str(data_dir), "--device", "cpu", "--width", "8", "--epoch", "1",
                             "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "cifar-10-batches-py" in lines[0], result.stderr
    assert "download failed" in lines[0]
    downloaded = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tar.gz")]
    assert not downloaded and not (tmp_path / "out" / "last_model.th").exists()


def test_functions_raise_user_errors_in_process(tiny_cifar, tmp_path):
    with pytest.raises(UserError, match="--poison-rate"):
        train_backdoor_cifar.main(train_backdoor_cifar.parse_args(["--poison-rate", "-0.1", "--data-dir", tiny_cifar]))


@pytest.mark.slow
def test_defense_augmentation_follows_the_trigger_info(pipeline, tmp_path):
    from defenses.defense_data import prepare_defense_data
    from utils.device import make_runtime

    def prepare(info_path, augment=None):
        return prepare_defense_data(dataset=None, data_dir=pipeline["data"][1], trigger_info_path=info_path,
                                    defense_frac=0.05, seed=0, runtime=make_runtime("cpu"), poison_type="badnets",
                                    poison_target=0, augment=augment, log=lambda *_: None)

    assert prepare(pipeline["info"]).augmentation == "crop-flip"
    info = torch.load(pipeline["info"], weights_only=True)
    info["augmentation"] = "none"
    recorded_none = tmp_path / "none.th"
    torch.save(info, recorded_none)
    data = prepare(str(recorded_none))
    assert data.augmentation == "none" and (data.transform.pad, data.transform.hflip) == (0, False)
    assert prepare(str(recorded_none), augment="crop").augmentation == "crop"  # the flag overrides the record
    info["augmentation"] = "rotate"
    torch.save(info, tmp_path / "bad.th")
    with pytest.raises(UserError, match="--trigger-info"):
        prepare(str(tmp_path / "bad.th"))
    del info["augmentation"]  # trigger infos written before the option existed: the dataset's default
    torch.save(info, tmp_path / "old.th")
    assert prepare(str(tmp_path / "old.th")).augmentation == "crop-flip"
