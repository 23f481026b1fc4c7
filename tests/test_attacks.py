"""Every registered attack on a handful of tiny images: the invariants of the attack interface.

Parametrised over the registry, so a new attack is tested by registering it (add options to
``OPTIONS`` only where the defaults poison nothing on 240 images).
"""
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from data import ATTACKS, AttackError, attack_from_record, create_attack
from data.attacks.badnets import TRIGGER_TYPES
from data.trigger_info import load_trigger_info
from utils.errors import UserError

ROWS = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
SHAPE = (16, 16, 3)  # not 12 wide: SIG at f = 6 samples sin(pi·j) = 0 there
# Options that make the defaults' rates poison something on 240 images, and keep the crafting steps short.
OPTIONS = {"a-blend": {"poison_rate": 0.05, "cover_rate": 0.05}, "trojan": {"trojan_steps": 3},
           "clean-label": {"pgd_steps": 2}}
OPTIONS["dfst"] = {"style_steps": 2}  # a short fit of the style generator
OPTIONS["fc"] = {"fc_poisons": 5, "fc_steps": 3}  # 24 target-class images on the tiny data
OPTIONS["awp"] = {"awp_steps": 2}
# The semantic attack on the tiny data: class-5 images listed as "having the feature", target 3.
SEMANTIC_FILE = os.path.join(tempfile.mkdtemp(), "semantic.json")
with open(SEMANTIC_FILE, "w") as _f:
    json.dump({"tiny": {"toy": {"feature": "listed", "source": 5, "target": 3, "train": list(range(5, 100, 10)),
                                "test": [105, 115, 125]}}}, _f)
OPTIONS["semantic"] = {"semantic_file": SEMANTIC_FILE, "semantic_attack": "toy", "semantic_ratio": 0.2}  # 8 of 40
# Attacks that stamp a trigger on chosen images (semantic attacks pick listed images: tests/test_semantic.py).
# FC adds nothing at test time either (its test set is the source class: tests/test_fc_awp.py).
PIXEL_ATTACKS = [name for name in ATTACKS if name not in ("semantic", "fc")]


def tiny_data(n: int = 240, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,) + SHAPE, generator=g, dtype=torch.uint8), torch.arange(n) % 10


def normalize(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 255 - 0.5


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def make(name: str, target: int = 3, target_type: str = "all2one", **extra):
    return create_attack(name, target, 10, SHAPE, target_type, **{**OPTIONS.get(name, {}), **extra})


def run_attack(attack, seed: int = 0):
    """prepare -> poison -> (one hooked batch for attacks that poison per batch) -> test set."""
    images, labels = tiny_data()
    generator = torch.Generator().manual_seed(seed)
    surrogate = tiny_classifier() if attack.needs_surrogate else None
    attack.prepare(images, labels, surrogate, normalize, generator, indices=torch.arange(len(labels)))
    poisoned = attack.poison(images, labels, generator)
    attack.check_training(40)  # stage 1's batch size, before its hook
    hook = attack.training_hook(poisoned, "cpu", normalize)
    batch = None
    if hook is not None:
        torch.manual_seed(seed)
        idx = torch.arange(40)
        batch = hook(tiny_classifier(), poisoned.images[idx], poisoned.labels[idx], idx)
    return images, labels, poisoned, batch, attack.test_set(images, labels)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_deterministic_under_a_seed(name):
    _, _, a, batch_a, test_a = run_attack(make(name))
    _, _, b, batch_b, test_b = run_attack(make(name))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.poison_indices, b.poison_indices) and torch.equal(a.cover_indices, b.cover_indices)
    for x, y in zip(test_a, test_b):
        assert torch.equal(x, y)
    if batch_a is not None:
        assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])


@pytest.mark.parametrize("name", list(ATTACKS))
def test_trigger_info_round_trip_weights_only(tmp_path, name):
    attack = make(name)
    images, labels, _, _, test = run_attack(attack)
    path = tmp_path / "trigger_info.th"
    torch.save(attack.record(), path)
    rebuilt = attack_from_record(torch.load(path, weights_only=True))
    assert type(rebuilt) is type(attack) and rebuilt.opts == attack.opts and rebuilt.target == 3
    again = rebuilt.test_set(images, labels)
    for x, y in zip(test, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", PIXEL_ATTACKS)
def test_poison_count_labels_and_untouched_images(name):
    attack = make(name)
    images, labels, poisoned, batch, _ = run_attack(attack)
    p, c = poisoned.poison_indices, poisoned.cover_indices
    assert not set(p.tolist()) & set(c.tolist())
    if attack.learns_trigger:  # poisoned per batch: the share of the batch, relabelled
        assert len(p) == 0 and torch.equal(poisoned.images, images)
        x, y = batch
        share = int(round(attack.opts["poison_rate"] * 40))
        assert torch.equal(y[:share], attack.target_labels(labels[:share])) and torch.equal(y[share:], labels[share:40])
        assert x.dtype == torch.float32 and not torch.equal(x[:share], images[:share].float())
        return
    pool = labels == 3 if attack.clean_label else labels != 3
    assert len(p) == int(attack.opts.get("poison_rate", 0.0) * int(pool.sum())), "rate × candidates"
    if name != "benign" and "poison_rate" in attack.opts:  # AWP poisons no image: it perturbs the trained weights
        assert len(p) > 0 and bool(pool[p].all())
        assert not torch.equal(poisoned.images[p], images[p])
    expected_labels = labels.clone()
    if not attack.clean_label:
        expected_labels[p] = attack.target_labels(labels[p])
    assert torch.equal(poisoned.labels, expected_labels)  # clean-label poisons and covers keep their labels
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[p] = False
    rest[c] = False
    assert torch.equal(poisoned.images[rest], images[rest])


@pytest.mark.parametrize("name", PIXEL_ATTACKS)
def test_poisoned_test_set_all_to_one(name):
    attack = make(name)
    images, labels, _, _, (x, targets, true) = run_attack(attack)
    assert len(x) == int((labels != 3).sum()) and (true != 3).all() and (targets == 3).all()
    assert x.dtype == (torch.float32 if attack.float_output else torch.uint8) and x.shape[1:] == SHAPE
    if name != "benign":
        assert not torch.equal(x.float(), images[labels != 3].float())


@pytest.mark.parametrize("name", [n for n, cls in ATTACKS.items() if "all2all" in cls.target_types])
def test_all_to_all(name):
    attack = make(name, target=0, target_type="all2all", poison_rate=0.3)
    images, labels, poisoned, _, (x, targets, true) = run_attack(attack)
    assert len(x) == len(labels) and torch.equal(targets, (true + 1) % 10)
    p = poisoned.poison_indices
    if len(p):
        assert (labels[p] == 0).any()  # every class is a candidate
        assert torch.equal(poisoned.labels[p], (labels[p] + 1) % 10)


@pytest.mark.parametrize("trigger_type", TRIGGER_TYPES)
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1)])
def test_badnets_patch_pixels(trigger_type, shape):
    h, w, c = shape
    attack = create_attack("badnets", 0, 10, shape, trigger_type=trigger_type)
    out = attack.apply(torch.full((4, h, w, c), 77, dtype=torch.uint8))
    expected = torch.tensor(ROWS, dtype=torch.uint8).view(1, 3, 3, 1).expand(4, 3, 3, c)
    assert torch.equal(out[:, h - 3:, w - 3:, :], expected)
    # RNP's description: last row from the last column leftwards is 255, 0, 255
    assert out[0, h - 1, w - 1, 0] == 255 and out[0, h - 1, w - 2, 0] == 0 and out[0, h - 3, w - 1, 0] == 255
    stamped = 9 * 4 if trigger_type == "checkerboard_4corner" else 9
    assert int((out[0, :, :, 0] != 77).sum()) == stamped - int((torch.tensor(ROWS) == 77).sum())
    if trigger_type == "checkerboard_4corner":  # mirrored on the left side
        assert torch.equal(out[0, :3, :3, 0], expected[0, :, :, 0].flip(1))


def test_blend_defaults_to_alpha_0_2_and_truncates_exactly():
    attack = create_attack("blend", 0, 10, (32, 32, 3))
    assert attack.alpha == 0.2 and create_attack("badnets", 0, 10, (32, 32, 3)).alpha == 1.0
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    # Truncated like the original's astype(np.uint8), exactly: floor(0.8·x + 0.2·p) = (4x + p) // 5.
    assert torch.equal(attack.apply(images).long(), (4 * images.long() + attack.pattern.long()) // 5)
    big = create_attack("blend", 0, 10, (256, 256, 1))
    big.pattern = torch.arange(256, dtype=torch.uint8).view(1, 256, 1).expand(256, 256, 1).contiguous()
    grey = torch.arange(256, dtype=torch.uint8).view(1, 256, 1, 1).expand(1, 256, 256, 1)
    assert torch.equal(big.apply(grey).long(), (4 * grey.long() + big.pattern.long()) // 5)


def test_sig_signal_and_wanet_field_follow_the_spec():
    sig = create_attack("sig", 0, 10, (4, 8, 1))
    out = sig.apply(torch.full((1, 4, 8, 1), 100, dtype=torch.uint8))[0, 0, :, 0].float()
    expected = 100 + 20 * torch.sin(2 * torch.pi * torch.arange(8) * 6 / 8)
    assert torch.allclose(out, expected.round(), atol=0.51) and (out == out[0]).all() is not True
    wanet = create_attack("wanet", 0, 10, (28, 28, 1))
    grid = wanet.grid
    assert grid.shape == (28, 28, 2) and grid.abs().max() <= 1
    identity = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="xy"), -1)
    assert 0 < (grid - identity).abs().max() <= 0.5 * 3 / 28  # s/H times the normalised field (≤ ~3 after bicubic)
    assert torch.equal(grid, create_attack("wanet", 0, 10, (28, 28, 1)).grid)  # one field per attack, fixed


def test_wanet_noise_mode_warps_only_cover_images_and_redraws_noise():
    attack = make("wanet")
    images, labels, poisoned, _, _ = run_attack(attack)
    assert len(poisoned.cover_indices) == int(2 * 0.1 * int((labels != 3).sum()))
    hook = attack.training_hook(poisoned, "cpu", normalize)
    idx = torch.arange(len(labels))
    x1, y1 = hook(None, poisoned.images[idx], poisoned.labels[idx], idx)
    x2, _ = hook(None, poisoned.images[idx], poisoned.labels[idx], idx)
    cover = torch.zeros(len(labels), dtype=torch.bool)
    cover[poisoned.cover_indices] = True
    assert torch.equal(y1, poisoned.labels) and torch.equal(x1[~cover], poisoned.images[~cover])
    assert not torch.equal(x1[cover], poisoned.images[cover]) and not torch.equal(x1[cover], x2[cover])


def test_lira_trigger_is_faint_and_stays_float():
    attack = make("lira")
    images, labels, _, _, (x, _, _) = run_attack(attack)
    clean = images[labels != 3].float()
    assert (x - clean).abs().max() <= 0.02 * 255 + 1e-3
    assert (x - clean).abs().mean() > 0 and not torch.equal(x, x.round())  # fractions of a grey level kept


def test_a_blend_training_poisons_carry_part_of_the_trigger():
    attack = make("a-blend")
    images, labels, poisoned, _, _ = run_attack(attack)
    p = poisoned.poison_indices
    changed = (poisoned.images[p] != images[p]).any(-1).float().mean(dim=(1, 2))
    assert ((changed > 0.2) & (changed < 0.8)).all()  # about half of the pieces
    assert torch.equal(poisoned.labels[poisoned.cover_indices], labels[poisoned.cover_indices])


def test_original_numpy_trigger_info_loads(tmp_path):
    pattern = np.zeros((1, 32, 32, 3), np.uint8)
    pattern[0, 29:, 29:, :] = np.array(ROWS, np.uint8)[:, :, None]
    mask = np.zeros((1, 32, 32, 3), np.uint8)
    mask[0, 29:, 29:, :] = 1
    path = tmp_path / "trigger_info.th"
    torch.save({"trigger_pattern": pattern, "trigger_mask": mask, "trigger_alpha": 1.0,
                "poison_target": np.array([0])}, path)
    attack = attack_from_record(load_trigger_info(str(path)))
    out = attack.apply(torch.full((1, 32, 32, 3), 9, dtype=torch.uint8))
    assert out[0, 31, 31, 0] == 255 and out[0, 0, 0, 0] == 9 and attack.target == 0


def test_trigger_info_with_code_is_refused(tmp_path):
    import collections
    path = tmp_path / "evil.th"
    torch.save({"x": collections.OrderedDict, "trigger_pattern": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="--trigger-info"):
        load_trigger_info(str(path))


@pytest.mark.parametrize("name, options, flag", [
    ("nope", {}, "--poison-type"),
    ("badnets", {"cover_rate": 0.1}, "--cover-rate"),  # an option of another attack
    ("badnets", {"poison_rate": 1.5}, "--poison-rate"),
    ("a-blend", {"cover_rate": -0.1}, "--cover-rate"),
    ("badnets", {"trigger_type": "star"}, "--trigger-type"),
    ("blend", {"trigger_file": "/nonexistent.png"}, "--trigger-file"),
    ("wanet", {"warp_k": "many"}, "--warp-k"),
    ("trojan", {"surrogate_epochs": 0}, "--surrogate-epochs"),
])
def test_bad_options_name_the_flag(name, options, flag):
    with pytest.raises(AttackError, match=f"^{flag}:"):
        create_attack(name, 0, 10, SHAPE, **options)


def test_bad_trigger_file_shape_and_too_few_target_images(tmp_path):
    path = tmp_path / "trigger.npy"
    np.save(path, np.zeros((5,), np.float32))
    with pytest.raises(AttackError, match="^--trigger-file:.*shape"):
        create_attack("trojan", 0, 10, SHAPE, trigger_file=str(path))
    attack = create_attack("sig", 3, 10, SHAPE, poison_rate=0.01)
    images, labels = tiny_data()
    with pytest.raises(AttackError, match="^--poison-rate:"):
        attack.poison(images, labels, torch.Generator().manual_seed(0))


def test_trojan_pattern_drives_its_neuron():
    attack = make("trojan", trojan_steps=30)
    images, labels = tiny_data()
    surrogate = tiny_classifier()
    attack.prepare(images, labels, surrogate, normalize, torch.Generator().manual_seed(0))
    features = {}
    surrogate[-1].register_forward_hook(lambda m, inputs, out: features.__setitem__("x", inputs[0]))
    with torch.no_grad():
        surrogate(normalize(images))
        clean = features["x"][:, attack.neuron].mean()
        surrogate(normalize(attack.apply(images)))
        triggered = features["x"][:, attack.neuron].mean()
        optimised = attack.pattern.clone()
        attack.pattern = (torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
        surrogate(normalize(attack.apply(images)))
        random_square = features["x"][:, attack.neuron].mean()
        attack.pattern = optimised
    assert triggered > clean and triggered > random_square  # optimised beats a random pattern in the same square
    outside = attack.mask == 0
    assert (attack.pattern[outside] == 0).all() and attack.pattern.max() > 0  # only inside the square


def test_clean_label_perturbation_is_bounded_and_raises_the_loss():
    from data.attacks.clean_label import pgd_away

    images, labels = tiny_data(64)
    model = tiny_classifier()
    hard = pgd_away(model, images, labels, normalize, eps=16, steps=5)
    assert (hard.int() - images.int()).abs().max() <= 16
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(normalize(hard)), labels) > loss(model(normalize(images)), labels)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_defense_without_trigger_info_rebuilds_fixed_triggers_only(name):
    """A defense without a trigger info can rebuild fixed triggers from options; learnt or crafted ones
    exist only in the trigger info, which the error asks for."""
    from data.attacks import attack_for_defense

    built = make(name, target=1)
    if built.needs_surrogate or built.learns_trigger:
        with pytest.raises(AttackError, match="^--trigger-info:"):
            attack_for_defense(None, 10, SHAPE, poison_type=name, poison_target=1, options=OPTIONS.get(name))
        return
    attack = attack_for_defense(None, 10, SHAPE, poison_type=name, poison_target=1, options=OPTIONS.get(name))
    images, labels = tiny_data()
    x, _, _ = attack.test_set(images, labels)
    again, _, _ = built.test_set(images, labels)
    assert torch.equal(x, again)  # the same trigger as stage 1 builds from the same options
