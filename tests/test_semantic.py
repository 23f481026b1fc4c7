"""The semantic attack: listed images, the held-out split kept clean, the batch mix, the test sets, bad input."""
import json

import pytest
import torch

from data import create_attack
from data.attacks import AttackError, attack_from_record
from data.attacks.semantic import BUNDLED_FILE, read_semantic_file, rotate_and_brighten
from data.splits import held_out_indices
from utils.evaluation import backdoor_metrics, eval_sets_for

SHAPE = (8, 8, 1)


def write(tmp_path, entry=None, dataset="tiny", name="toy"):
    entry = entry or {"feature": "listed", "source": 1, "target": 4, "train": [1, 11, 21, 31], "test": [41, 51]}
    path = tmp_path / "semantic.json"
    path.write_text(json.dumps({dataset: {name: entry}}))
    return str(path)


def data(n=60):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n,) + SHAPE, generator=g, dtype=torch.uint8), torch.arange(n) % 10


def make(tmp_path, **options):
    return create_attack("semantic", 0, 10, SHAPE, semantic_file=write(tmp_path), semantic_attack="toy", **options)


def test_bundled_lists_match_the_spec():
    attacks = read_semantic_file(BUNDLED_FILE)
    got = {name: (a["dataset"], a["source"], a["target"], len(a["train"]), len(a["test"])) for name, a in attacks.items()}
    assert got == {"stripet": ("fashion-mnist", 0, 2, 93, 18), "green": ("cifar10", 1, 6, 50, 7),
                   "sbg": ("cifar10", 1, 9, 15, 6)}
    attack = create_attack("semantic", 0, 10, (28, 28, 1))  # stripet by default; the list's target wins
    assert (attack.source_class, attack.target, attack.dataset) == (0, 2, "fashion-mnist")


def test_listed_images_relabelled_leave_the_held_out_split_and_form_the_test_sets(tmp_path):
    attack = make(tmp_path)
    images, labels = data()
    permutation = attack.arrange_split(torch.randperm(60, generator=torch.Generator().manual_seed(1)))
    assert sorted(permutation.tolist()) == list(range(60))
    assert not set(held_out_indices(permutation, 0.5).tolist()) & {1, 11, 21, 31}  # even half of it held out
    attacker = permutation[6:]
    attack.prepare(images[attacker], labels[attacker], None, None, None, indices=attacker)
    poisoned = attack.poison(images[attacker], labels[attacker], None)
    assert sorted(attacker[poisoned.poison_indices].tolist()) == [1, 11, 21, 31]
    assert (poisoned.labels[poisoned.poison_indices] == 4).all() and torch.equal(poisoned.images, images[attacker])
    rest = torch.ones(len(attacker), dtype=torch.bool)
    rest[poisoned.poison_indices] = False
    assert torch.equal(poisoned.labels[rest], labels[attacker][rest])
    x, targets, true = attack.test_set(images, labels)
    assert torch.equal(x, images[[41, 51]]) and (targets == 4).all() and (true == 1).all()
    clean_x, clean_y = attack.clean_test_set(images, labels)
    assert len(clean_y) == 58 and not any(torch.equal(clean_x[i], images[41]) for i in range(58))


def test_batch_mix_appends_the_ratio_share_of_augmented_poisons(tmp_path):
    attack = make(tmp_path, semantic_ratio=0.5)
    images, labels = data()
    attack.prepare(images, labels, None, None, None, indices=torch.arange(60))
    poisoned = attack.poison(images, labels, None)
    hook = attack.training_hook(poisoned, "cpu", None)
    torch.manual_seed(0)
    x, y = hook(None, poisoned.images[:16], poisoned.labels[:16], torch.arange(16))
    assert len(y) == 32 and (y[16:] == 4).all() and torch.equal(y[:16], poisoned.labels[:16])
    assert x.dtype == torch.float32 and torch.equal(x[:16], poisoned.images[:16].float())
    assert 0 <= x.min() and x.max() <= 255
    assert create_attack("semantic", 0, 10, SHAPE, semantic_file=write(tmp_path), semantic_attack="toy",
                         semantic_ratio=0.0).training_hook(poisoned, "cpu", None) is None


def test_rotation_and_brightness_keep_the_image_recognisable():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 3:6, 3:6] = 0.5
    out = rotate_and_brighten(x)
    assert out.shape == x.shape and (out[:, :, 4, 4] >= 0.39).all() and (out[:, :, 4, 4] <= 0.61).all()
    assert out[:, :, 0, 0].abs().max() == 0 and not torch.equal(out[0], out[1])


def test_source_accuracy_and_asr_on_the_listed_images(tmp_path):
    attack = make(tmp_path)
    images, labels = data()
    sets = eval_sets_for(attack, images, labels, "cpu")

    class Predict(torch.nn.Module):  # always the source class 1
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 1), 10).float()

    m = backdoor_metrics(Predict(), sets, lambda im: im.permute(0, 3, 1, 2).float())
    assert m["asr"] == 0 and m["ra"] == 1 and m["source_acc"] == 1.0 and abs(m["clean_acc"] - 4 / 58) < 1e-6  # class 1 bar the 2 listed


def test_trigger_info_carries_the_lists(tmp_path):
    attack = make(tmp_path)
    record = attack.record()
    torch.save(record, tmp_path / "info.th")
    rebuilt = attack_from_record(torch.load(tmp_path / "info.th", weights_only=True))
    assert torch.equal(rebuilt.test_indices, attack.test_indices) and rebuilt.source_class == 1 and rebuilt.target == 4


@pytest.mark.parametrize("options, flag", [
    ({"semantic_attack": "nope"}, "--semantic-attack"),
    ({"semantic_file": "/does/not/exist.json"}, "--semantic-file"),
    ({"semantic_ratio": 1.0}, "--semantic-ratio"),
])
def test_bad_options_name_their_flag(tmp_path, options, flag):
    with pytest.raises(AttackError) as err:
        create_attack("semantic", 0, 10, SHAPE, **{"semantic_file": write(tmp_path), "semantic_attack": "toy",
                                                   **options})
    assert str(err.value).startswith(flag)


def test_data_the_lists_do_not_fit_is_refused(tmp_path):
    images, labels = data()
    with pytest.raises(AttackError, match="--semantic-attack: stripet is a fashion-mnist attack"):
        create_attack("semantic", 0, 10, (28, 28, 1)).check_data("cifar10", labels, labels)
    far = create_attack("semantic", 0, 10, SHAPE, semantic_file=write(tmp_path, {"source": 1, "target": 4,
                        "train": [1, 601], "test": [41]}), semantic_attack="toy")
    with pytest.raises(AttackError, match="--semantic-file: train index 601 is outside"):
        far.check_data("tiny", labels, labels)
    wrong = create_attack("semantic", 0, 10, SHAPE, semantic_file=write(tmp_path, {"source": 1, "target": 4,
                          "train": [1, 2], "test": [41]}), semantic_attack="toy")
    with pytest.raises(AttackError, match="not of the source class 1"):
        wrong.check_data("tiny", labels, labels)
