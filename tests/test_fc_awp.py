"""Feature collision (FC, Poison Frog) and the adversarial weight perturbation backdoor (AWP): their invariants
and bad input. The registry-wide tests (tests/test_attacks.py, tests/test_attack_pipeline.py) run them too."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import train_backdoor_cifar
from data import AttackError, create_attack
from data.attacks.trojan import last_linear
from test_attacks import SHAPE, normalize, tiny_data  # the registry tests' tiny images (16×16×3) and input map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def warmed_up(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Non-trivial BatchNorm running statistics, as a trained model has."""
    model.train()
    with torch.no_grad():
        model(normalize(images))
    return model.eval()


# --- FC -------------------------------------------------------------------------------------------

def crafted_fc(**options):
    images, labels = tiny_data()
    attack = create_attack("fc", 3, 10, SHAPE, **{"fc_poisons": 10, "fc_steps": 10, **options})
    generator = torch.Generator().manual_seed(0)
    model = warmed_up(tiny_classifier(), images)
    attack.prepare(images, labels, model, normalize, generator)
    return attack, images, labels, model, attack.poison(images, labels, generator)


def test_fc_poisons_stay_within_eps_of_their_bases_and_keep_labels():
    """The ℓ∞ bound holds around the clean base image (not the watermarked one); labels unchanged; only the
    chosen target-class images change."""
    attack, images, labels, _, poisoned = crafted_fc()
    p = poisoned.poison_indices
    assert len(p) == 10 and bool((labels[p] == 3).all()) and torch.equal(poisoned.labels, labels)
    change = (poisoned.images[p].int() - images[p].int()).abs()
    assert int(change.max()) <= 8 and int(change.max()) > 0
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[p] = False
    assert torch.equal(poisoned.images[rest], images[rest])
    assert bool((labels[attack.target_positions] == 4).all())  # targets: the source class (3 + 1) mod 10
    loose, *_ = crafted_fc(fc_eps=2)
    assert int((loose.poisons.int() - images[p].int()).abs().max()) <= 2


def test_fc_poisons_move_towards_their_targets_features():
    attack, images, _, model, poisoned = crafted_fc(fc_steps=30, fc_eps=32, fc_lr=0.05)
    features = {}
    last_linear(model).register_forward_hook(lambda m, inputs, out: features.__setitem__("x", inputs[0]))

    def feats(x):
        with torch.no_grad():
            model(normalize(x))
        return features["x"]

    target = feats(images[attack.target_positions])
    before = (feats(images[poisoned.poison_indices]) - target).norm(dim=1)
    after = (feats(poisoned.images[poisoned.poison_indices]) - target).norm(dim=1)
    assert after.mean() < before.mean()


def test_fc_test_set_is_the_source_class_unchanged():
    images, labels = tiny_data()
    for options, source in (({}, 4), ({"fc_source": 7}, 7)):
        attack = create_attack("fc", 3, 10, SHAPE, **options)
        x, targets, true = attack.test_set(images, labels)
        assert attack.source_class == source and torch.equal(x, images[labels == source])
        assert bool((targets == 3).all()) and bool((true == source).all())
        assert torch.equal(attack.clean_test_set(images, labels)[0], images)  # ACC on the whole test set


@pytest.mark.parametrize("options, flag", [
    ({"fc_source": 3}, "--fc-source"),  # the target itself
    ({"fc_source": 10}, "--fc-source"),
    ({"fc_watermark": 1.5}, "--fc-watermark"),
    ({"fc_eps": -1}, "--fc-eps"),
    ({"fc_poisons": 0}, "--fc-poisons"),
])
def test_fc_bad_options_name_the_flag(options, flag):
    with pytest.raises(AttackError, match=f"^{flag}:"):
        create_attack("fc", 3, 10, SHAPE, **options)


def test_fc_more_poisons_than_base_images_names_the_flag():
    images, labels = tiny_data()  # 24 images of the target class
    attack = create_attack("fc", 3, 10, SHAPE, fc_poisons=25)
    with pytest.raises(AttackError, match="^--fc-poisons:.*25 poisons.*only 24"):
        attack.check_poison_count(labels)
    with pytest.raises(AttackError, match="^--fc-poisons:"):
        attack.prepare(images, labels, tiny_classifier(), normalize, torch.Generator().manual_seed(0))


# --- AWP ------------------------------------------------------------------------------------------

def perturbed_awp(model: nn.Module, steps: int = 5, **options):
    images, labels = tiny_data()
    attack = create_attack("awp", 3, 10, SHAPE, awp_steps=steps, awp_samples=64, **options)
    attack.prepare(images, labels, None, normalize, torch.Generator().manual_seed(0))
    poisoned = attack.poison(images, labels, torch.Generator().manual_seed(0))
    assert len(poisoned.poison_indices) == 0 and torch.equal(poisoned.images, images)
    out = attack.finalize(model, images, labels, normalize, torch.Generator().manual_seed(0), lambda line: None)
    return attack, images, labels, out


def test_awp_weights_stay_within_eps_of_the_clean_model_and_statistics_are_kept():
    """Every parameter tensor within ε (ℓ∞) of the clean model's; BatchNorm running statistics (buffers) are not
    perturbed; the clean model itself is left as it was."""
    images, _ = tiny_data()
    clean = warmed_up(tiny_classifier(), images)
    before = {k: v.clone() for k, v in clean.state_dict().items()}
    _, _, _, perturbed = perturbed_awp(clean, awp_eps=0.01)
    assert perturbed is not clean
    assert all(torch.equal(v, before[k]) for k, v in clean.state_dict().items())
    params = dict(clean.named_parameters())
    changed = 0.0
    for name, p in perturbed.named_parameters():
        diff = (p.detach() - params[name].detach()).abs().max().item()
        assert diff <= 0.01 + 1e-6, name
        changed = max(changed, diff)
    assert changed > 0
    for name, b in perturbed.named_buffers():
        assert torch.equal(b, dict(clean.named_buffers())[name]), name


def test_awp_lowers_the_triggered_loss_and_keeps_clean_predictions():
    images, labels = tiny_data()
    clean = warmed_up(tiny_classifier(), images)
    attack, _, _, perturbed = perturbed_awp(clean, steps=30, awp_eps=0.05)
    triggered = attack.apply(images)
    target = torch.full_like(labels, 3)
    with torch.no_grad():
        loss_clean_model = nn.functional.cross_entropy(clean(normalize(triggered)), target)
        loss_perturbed = nn.functional.cross_entropy(perturbed(normalize(triggered)), target)
        agreement = (perturbed(normalize(images)).argmax(1) == clean(normalize(images)).argmax(1)).float().mean()
    assert loss_perturbed < loss_clean_model and agreement > 0.5


@pytest.mark.parametrize("options, flag", [
    ({"awp_eps": 0}, "--awp-eps"), ({"awp_eps": -0.1}, "--awp-eps"), ({"awp_lr": 0}, "--awp-lr"),
    ({"awp_steps": 0}, "--awp-steps"), ({"poison_rate": 0.1}, "--poison-rate"),  # AWP poisons no image
])
def test_awp_bad_options_name_the_flag(options, flag):
    with pytest.raises(AttackError, match=f"^{flag}:"):
        create_attack("awp", 3, 10, SHAPE, **options)


# --- the training script: one-line errors before anything is written, and the saved model ---------

def _run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_backdoor_cifar.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["--poison-type", "fc", "--fc-poisons", "100000"], "--fc-poisons"),
    (["--poison-type", "awp", "--awp-eps", "0"], "--awp-eps"),
    (["--poison-type", "awp", "--awp-eps", "-0.5"], "--awp-eps"),
    (["--poison-type", "awp", "--clean-model", "JUNK"], "--clean-model"),
    (["--poison-type", "fc", "--clean-model", "JUNK"], "--clean-model"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_cifar, tmp_path, args, needle):
    junk = tmp_path / "junk.th"
    torch.save({"weight": torch.zeros(3)}, junk)  # a checkpoint of another model
    args = [str(junk) if a == "JUNK" else a for a in args]
    result = _run("--data-dir", tiny_cifar, "--device", "cpu", "--width", "8", *args,
                  "--output-dir", str(tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def within(a: dict, b: dict, eps: float) -> bool:
    return all((a[k].float() - b[k].float()).abs().max() <= eps + 1e-6 for k in a)


@pytest.mark.slow
def test_awp_stage1_saves_the_perturbed_clean_model(tiny_cifar, tmp_path):
    """Stage 1 trains a clean model (saved at its last epoch), then saves its perturbation as last_model.th:
    within ε of it, BatchNorm statistics equal, and measured again; with --clean-model that model is perturbed."""
    common = ["--data-dir", tiny_cifar, "--width", "8", "--device", "cpu", "--seed", "0", "--no-progress",
              "--epoch", "1", "--batch-size", "64", "--save-every", "1", "--poison-type", "awp",
              "--awp-steps", "5", "--awp-samples", "128", "--awp-eps", "0.02"]
    metrics = train_backdoor_cifar.main(train_backdoor_cifar.parse_args(common + ["--output-dir", str(tmp_path / "a")]))
    assert metrics["poisoned_images"] == 0 and metrics["epochs"][-1].get("finalized") is True
    clean = torch.load(tmp_path / "a" / "model_1.th", weights_only=True)
    saved = torch.load(tmp_path / "a" / "last_model.th", weights_only=True)
    stats = [k for k in saved if "running" in k or "num_batches" in k]
    assert stats and all(torch.equal(saved[k], clean[k]) for k in stats)
    assert within(saved, clean, 0.02) and not within(saved, clean, 0.0)
    info = torch.load(tmp_path / "a" / "trigger_info.th", weights_only=True)
    assert info["attack"] == "awp" and len(info["poison_indices"]) == 0
    saved_metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved_metrics["asr"] == metrics["asr"]

    given = str(tmp_path / "a" / "model_init.th")  # an untrained model stands in for a published one
    train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        common + ["--clean-model", given, "--output-dir", str(tmp_path / "b")]))
    init = torch.load(given, weights_only=True)
    again = torch.load(tmp_path / "b" / "last_model.th", weights_only=True)
    assert within(again, init, 0.02) and not within(again, torch.load(tmp_path / "b" / "model_1.th",
                                                                      weights_only=True), 0.02)
