
import numpy as np
import pytest
import torch

from data import attack_from_record, build_attack, choose_poison_indices, poison_training_set, poisoned_test_set
from data.attacks.badnets import TRIGGER_TYPES
from data.trigger_info import load_trigger_info
from utils.errors import UserError

ROWS = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]


@pytest.mark.parametrize("trigger_type", TRIGGER_TYPES)
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1)])
def test_badnets_patch_pixels(trigger_type, shape):
    h, w, c = shape
    attack = build_attack("badnets", 0, 10, shape, alpha=1.0, trigger_type=trigger_type)
    images = torch.full((4, h, w, c), 77, dtype=torch.uint8)
    out = attack.apply(images)
    expected = torch.tensor(ROWS, dtype=torch.uint8).view(1, 3, 3, 1).expand(4, 3, 3, c)
    assert torch.equal(out[:, h - 3:, w - 3:, :], expected)
    untouched = torch.ones(h, w, dtype=torch.bool)
    untouched[h - 3:, w - 3:] = False
    assert (out[:, untouched] == 77).all()
    # RNP's description: last row from the last column leftwards is 255, 0, 255
    assert out[0, h - 1, w - 1, 0] == 255 and out[0, h - 1, w - 2, 0] == 0 and out[0, h - 3, w - 1, 0] == 255
    assert out[0, h - 3, w - 3, 0] == 0


def test_blend_formula_and_fixed_pattern():
    attack = build_attack("blend", 0, 10, (32, 32, 3), alpha=0.2)
    again = build_attack("blend", 0, 10, (32, 32, 3), alpha=0.2)
    assert torch.equal(attack.pattern, again.pattern)  # fixed seed
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    out = attack.apply(images)
    # Truncated like the original's astype(np.uint8), exactly: floor(0.8·x + 0.2·p) = (4x + p) // 5.
    expected = (4 * images.long() + attack.pattern.long()) // 5
    assert torch.equal(out.long(), expected)
    assert torch.equal(out, attack.apply(images))


def test_blend_truncation_is_exact_for_every_pixel_pair():
    """Every (image, pattern) grey-level pair at alpha 0.2: no off-by-one from rounding error."""
    attack = build_attack("blend", 0, 10, (256, 256, 1), alpha=0.2)
    attack.pattern = torch.arange(256, dtype=torch.uint8).view(1, 256, 1).expand(256, 256, 1).contiguous()
    images = torch.arange(256, dtype=torch.uint8).view(1, 256, 1, 1).expand(1, 256, 256, 1)
    expected = (4 * images.long() + attack.pattern.long()) // 5
    assert torch.equal(attack.apply(images).long(), expected)


def test_poison_counts_and_labels_non_target_rule():
    labels = torch.arange(1000) % 10
    images = torch.zeros(1000, 8, 8, 1, dtype=torch.uint8)
    attack = build_attack("badnets", 3, 10, (8, 8, 1), alpha=1.0)
    idx = choose_poison_indices(labels, 0.1, attack, torch.Generator().manual_seed(0))
    assert len(idx) == int(0.1 * 900)  # rate × non-target images (ANP's rule)
    assert (labels[idx] != 3).all() and len(set(idx.tolist())) == len(idx)
    poisoned_images, poisoned_labels = poison_training_set(images, labels, attack, idx)
    assert (poisoned_labels[idx] == 3).all()
    rest = torch.ones(1000, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned_labels[rest], labels[rest]) and (poisoned_images[rest] == 0).all()
    assert (poisoned_images[idx, -1, -1, 0] == 255).all()
    all_rule = choose_poison_indices(labels, 0.1, attack, torch.Generator().manual_seed(0), candidates="all")
    assert len(all_rule) == 100  # RNP's rule: rate × all images


def test_all_to_all_training_relabel():
    labels = torch.arange(200) % 10
    images = torch.zeros(200, 8, 8, 3, dtype=torch.uint8)
    attack = build_attack("badnets", 0, 10, (8, 8, 3), alpha=1.0, target_type="all2all")
    idx = choose_poison_indices(labels, 0.1, attack, torch.Generator().manual_seed(0))
    assert len(idx) == 20 and (labels[idx] == 0).any()  # every class is a candidate, the "target" too
    _, poisoned_labels = poison_training_set(images, labels, attack, idx)
    assert torch.equal(poisoned_labels[idx], (labels[idx] + 1) % 10)
    rest = torch.ones(200, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned_labels[rest], labels[rest])


def test_poison_choice_is_seeded():
    labels = torch.arange(500) % 10
    attack = build_attack("badnets", 0, 10, (8, 8, 1), alpha=1.0)
    a = choose_poison_indices(labels, 0.2, attack, torch.Generator().manual_seed(5))
    b = choose_poison_indices(labels, 0.2, attack, torch.Generator().manual_seed(5))
    c = choose_poison_indices(labels, 0.2, attack, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_poisoned_test_set_has_no_target_images_and_all2all():
    labels = torch.arange(100) % 10
    images = torch.zeros(100, 8, 8, 3, dtype=torch.uint8)
    attack = build_attack("badnets", 2, 10, (8, 8, 3), alpha=1.0)
    x, targets, true = poisoned_test_set(images, labels, attack)
    assert len(x) == 90 and (true != 2).all() and (targets == 2).all()
    all2all = build_attack("badnets", 0, 10, (8, 8, 3), alpha=1.0, target_type="all2all")
    x, targets, true = poisoned_test_set(images, labels, all2all)
    assert len(x) == 100 and torch.equal(targets, (true + 1) % 10)


def test_benign_changes_nothing():
    attack = build_attack("benign", 0, 10, (8, 8, 3))
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    assert torch.equal(attack.apply(images), images)


@pytest.mark.parametrize("name", ["badnets", "blend"])
def test_record_round_trip_weights_only(tmp_path, name):
    attack = build_attack(name, 4, 10, (32, 32, 3), alpha=0.3)
    path = tmp_path / "trigger_info.th"
    torch.save(attack.record(), path)
    record = torch.load(path, weights_only=True)
    assert record["trigger_pattern"].shape == (1, 32, 32, 3) and record["trigger_pattern"].dtype == torch.uint8
    rebuilt = attack_from_record(record)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(rebuilt.apply(images), attack.apply(images)) and rebuilt.target == 4


def test_original_numpy_trigger_info_loads(tmp_path):
    pattern = np.zeros((1, 32, 32, 3), np.uint8)
    pattern[0, 29:, 29:, :] = np.array(ROWS, np.uint8)[:, :, None]
    mask = np.zeros((1, 32, 32, 3), np.uint8)
    mask[0, 29:, 29:, :] = 1
    path = tmp_path / "trigger_info.th"
    torch.save({"trigger_pattern": pattern, "trigger_mask": mask, "trigger_alpha": 1.0,
                "poison_target": np.array([0])}, path)
    record = load_trigger_info(str(path))
    attack = attack_from_record(record)
    out = attack.apply(torch.full((1, 32, 32, 3), 9, dtype=torch.uint8))
    assert out[0, 31, 31, 0] == 255 and out[0, 0, 0, 0] == 9 and attack.target == 0


def test_trigger_info_with_code_is_refused(tmp_path):
    import collections
    path = tmp_path / "evil.th"
    torch.save({"x": collections.OrderedDict, "trigger_pattern": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="--trigger-info"):
        load_trigger_info(str(path))
