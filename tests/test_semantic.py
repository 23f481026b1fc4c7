"""The semantic attack: listed images, the held-out split kept clean, the batch mix, the test sets, bad input."""
import json

import pytest
import torch

from data import create_attack
from data.attacks import AttackError, attack_from_record
from data.attacks import semantic
from data.attacks.semantic import BUNDLED_FILE, read_semantic_file, released_poison_augment, rotate_and_brighten
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


def test_appended_mix_appends_the_ratio_share_of_augmented_poisons(tmp_path):
    attack = make(tmp_path, semantic_ratio=0.5, semantic_recipe="appended")
    images, labels = data()
    attack.prepare(images, labels, None, None, None, indices=torch.arange(60))
    poisoned = attack.poison(images, labels, None)
    assert not poisoned.drawn_by_hook and attack.recipe("fashion-mnist") == {}
    hook = attack.training_hook(poisoned, "cpu", None)
    torch.manual_seed(0)
    x, y = hook(None, poisoned.images[:16], poisoned.labels[:16], torch.arange(16))
    assert len(y) == 32 and (y[16:] == 4).all() and torch.equal(y[:16], poisoned.labels[:16])
    assert x.dtype == torch.float32 and torch.equal(x[:16], poisoned.images[:16].float())
    assert 0 <= x.min() and x.max() <= 255
    assert create_attack("semantic", 0, 10, SHAPE, semantic_file=write(tmp_path), semantic_attack="toy",
                         semantic_recipe="appended", semantic_ratio=0.0).training_hook(poisoned, "cpu", None) is None


def released_setup(tmp_path, monkeypatch, listed=93, **options):
    """A released-recipe attack over 1000 tiny images whose ``listed`` class-1 training images are numbered
    1..listed in their pixels (the poison augmentation replaced by the identity, so each pick is identifiable)."""
    n = 1000
    labels = torch.arange(n) % 10
    train = (labels == 1).nonzero().flatten()[:listed].tolist()
    attack = create_attack("semantic", 0, 10, SHAPE, semantic_file=write(tmp_path, {
        "source": 1, "target": 4, "train": train, "test": [1]}), semantic_attack="toy", **options)
    images = torch.zeros((n,) + SHAPE, dtype=torch.uint8)
    images[train] = torch.arange(1, listed + 1, dtype=torch.uint8).view(-1, 1, 1, 1)
    attack.check_data("tiny", labels, labels)
    attack.prepare(images, labels, None, None, None, indices=torch.arange(n))
    poisoned = attack.poison(images, labels, None)
    monkeypatch.setattr(semantic, "released_poison_augment", lambda x, dataset: x.float())
    return attack, images, labels, poisoned


@pytest.mark.parametrize("ratio, tune", [(0.3125, False), (0.6875, True)])
def test_released_mix_takes_the_first_clean_images_and_picks_poisons_without_replacement(tmp_path, monkeypatch,
                                                                                          ratio, tune):
    """B = 64: r = 0.3125 -> 44 clean + 20 poisoned, r = 0.6875 (the tune) -> 20 + 44; the poisoned ones are
    picked without replacement from chunks of 64 of a shuffled pass over the 93 listed images (stripet's count):
    at 20 a pass gives a chunk of 64 and one of 29 (two batches, disjoint picks), at 44 only the chunk of 64."""
    attack, images, labels, poisoned = released_setup(
        tmp_path, monkeypatch, **({"tune_epochs": 1, "tune_ratio": ratio} if tune else {"semantic_ratio": ratio}))
    assert poisoned.drawn_by_hook
    attack.check_training(64)
    if tune:
        assert attack.tune_phase() == (1, 0.01)
        attack.begin_tune()
    hook = attack.training_hook(poisoned, "cpu", None)
    torch.manual_seed(0)
    clean = torch.arange(100, 164)  # a clean batch of 64 (class-1 images are listed only up to 930)
    count = int(64 * ratio)
    picks = []
    for _ in range(4):
        x, y = hook(None, images[clean], labels[clean], clean)
        assert len(y) == 64 and torch.equal(y[:64 - count], labels[clean][:64 - count]) and (y[64 - count:] == 4).all()
        assert torch.equal(x[:64 - count], images[clean][:64 - count].float())  # the first clean ones, unchanged
        ids = x[64 - count:, 0, 0, 0].long()
        assert len(set(ids.tolist())) == count and ids.min() >= 1  # no image twice in a batch, all listed
        picks.append(set(ids.tolist()))
    if count == 20:
        assert not picks[0] & picks[1] and not picks[2] & picks[3]  # one pass: the chunk of 64, then of 29


def test_released_augmentation_per_dataset():
    """Clean Fashion-MNIST images pass unchanged (augment none, normalization none: x/255 is the input); poisoned
    ones are cropped and flipped only there (no value changes), CIFAR-like ones also rotated and brightened."""
    from data import BatchTransform, get_spec, normalization_stats
    spec = get_spec("fashion-mnist")
    mean, std = normalization_stats("none", spec)
    images = torch.randint(0, 256, (16, 28, 28, 1), dtype=torch.uint8)
    x = BatchTransform.named("none", mean, std, "cpu").augment(images.float())
    assert torch.equal(x, images.permute(0, 3, 1, 2).float() / 255)
    attack = create_attack("semantic", 0, 10, (28, 28, 1))
    assert attack.recipe("fashion-mnist") == {"augment": "none", "normalization": "none", "held_out_frac": 0.0}
    assert attack.recipe("cifar10")["normalization"] == "dataset"
    flat = torch.full((64, 28, 28, 1), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    out = released_poison_augment(flat, "fashion-mnist")
    assert set(out.unique().tolist()) <= {0.0, 200.0} and (out == 0).any()  # crop padding, values unchanged
    colour = torch.full((64, 32, 32, 3), 100, dtype=torch.uint8)
    out = released_poison_augment(colour, "cifar10")
    centre = out[:, 16, 16, 0]
    assert centre.min() >= 50 - 1e-3 and centre.max() <= 150 + 1e-3 and centre.std() > 5  # brightness ×0.5–1.5


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
    ({"semantic_ratio": 0.0}, "--semantic-ratio"),
    ({"tune_ratio": 1.5}, "--tune-ratio"),
    ({"tune_lr": 0.0}, "--tune-lr"),
    ({"tune_epochs": -1}, "--tune-epochs"),
    ({"semantic_recipe": "other"}, "--semantic-recipe"),
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


@pytest.mark.parametrize("options, batch, flag, needle", [
    ({"semantic_ratio": 0.01}, 64, "--semantic-ratio", "gives 0 poisoned"),
    ({"tune_epochs": 2, "tune_ratio": 0.01}, 8, "--tune-ratio", "gives 0 poisoned"),
    ({"semantic_ratio": 0.5}, 16, "--semantic-ratio", "only 4 images are listed"),
])
def test_batch_shares_that_do_not_fit_the_batch_name_their_flag(tmp_path, options, batch, flag, needle):
    """A share r < 1 always leaves a clean image (⌊B·r⌋ < B); one that picks none, or more than are listed, is
    refused before anything is written."""
    with pytest.raises(AttackError) as err:
        make(tmp_path, **options).check_training(batch)
    assert str(err.value).startswith(flag) and needle in str(err.value)
    make(tmp_path, semantic_ratio=0.25).check_training(16)  # 4 of the 4 listed: fits


def test_tune_options_belong_to_the_semantic_attack():
    with pytest.raises(AttackError) as err:
        create_attack("badnets", 0, 10, SHAPE, tune_epochs=5)
    assert str(err.value).startswith("--tune-epochs: not an option of badnets")


def test_released_defaults_per_attack():
    stripet = create_attack("semantic", 0, 10, (28, 28, 1))
    assert stripet.opts["semantic_ratio"] == 0.3125 and stripet.tune_phase() == (5, 0.01)
    assert stripet.opts["tune_ratio"] == 0.6875 and stripet.opts["semantic_recipe"] == "released"
    green = create_attack("semantic", 0, 10, (32, 32, 3), semantic_attack="green")
    assert green.opts["semantic_ratio"] == 0.7 and green.tune_phase() is None


def test_trigger_infos_from_before_the_recipe_options_still_load(tmp_path):
    record = make(tmp_path, semantic_recipe="appended", semantic_ratio=0.0).record()
    for key in ("semantic_recipe", "tune_epochs", "tune_lr", "tune_ratio"):
        del record["options"][key]
    rebuilt = attack_from_record(record)
    assert rebuilt.target == 4 and rebuilt.opts["semantic_ratio"] == 0.0 and rebuilt.tune_phase() is None
