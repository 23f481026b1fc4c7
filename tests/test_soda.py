"""SODA's steps on hand-made models and score vectors (spec: shared/spec/soda.md)."""
import pytest
import torch
from torch import nn

from defenses import soda
from models import create_model
from models.split import split_model, split_points
from utils.errors import OptionError, UserError

D, C = 40, 6


class FeatureNet(nn.Module):
    """Inputs are feature vectors; one hidden layer, then the head: a model whose neurons we design."""

    def __init__(self, head_weight: torch.Tensor):
        super().__init__()
        self.hidden = nn.Linear(D, D, bias=False)
        self.linear = nn.Linear(D, C)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.eye(D))
            self.linear.weight.copy_(head_weight)
            self.linear.bias.zero_()

    def stages(self):
        return [("hidden", lambda x: torch.relu(self.hidden(x))), ("linear", self.linear)]

    def forward(self, x):
        for _, stage in self.stages():
            x = stage(x)
        return x


def planted(source=None, target=None, seed=0):
    """Every class reads all neurons with a shared profile and its own 5 neurons a little more; with a
    backdoor the target also reads the source's neurons strongly, so its causal profile is the odd one out."""
    g = torch.Generator().manual_seed(seed)
    profile = torch.rand(D, generator=g) + 0.5
    w = profile.repeat(C, 1) * (1 + 0.05 * torch.randn(C, D, generator=g))
    for k in range(C):
        w[k, 5 * k:5 * k + 5] += 0.3
    if source is not None:
        w[target, 5 * source:5 * source + 5] += 4.0
    return FeatureNet(w)


def class_inputs(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for c in range(C):
        x = torch.rand(n, D, generator=g) * 0.2
        x[:, 5 * c:5 * c + 5] += 1.0
        inputs.append(x)
    return inputs


def test_closed_form_equals_the_intervention_at_the_last_split():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=C, in_channels=1, width=4).eval()
    x = torch.randn(7, 1, 12, 12)
    split = split_model(model)
    assert split.is_head and torch.allclose(split.back(split.front(x)), model(x), atol=1e-6)
    general = soda.intervention_matrix(split, x, chunk=5)
    assert general.shape == (32, C) and torch.allclose(general, soda.closed_form_matrix(split), atol=1e-5)


def test_deeper_split_intervention_matches_one_neuron_at_a_time():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=C, in_channels=1, width=4).eval()
    assert split_points(model)[:3] == ["penultimate", "stem", "layer1"]
    split = split_model(model, "layer4")
    x = torch.randn(3, 1, 12, 12)
    h = split.front(x)
    assert torch.allclose(split.back(h), model(x), atol=1e-6)
    matrix = soda.intervention_matrix(split, x, chunk=7)
    assert matrix.shape == (h[0].numel(), C)
    for i in (0, 5, h[0].numel() - 1):
        bumped = h.flatten(1).clone()
        bumped[:, i] += 1
        expected = (split.back(bumped.view_as(h)) - split.back(h)).abs().mean(0)
        assert torch.allclose(matrix[i], expected, atol=1e-5)
    with pytest.raises(UserError, match="--split"):
        split_model(model, "linear")


@pytest.mark.parametrize("arch, head", [("resnet18", "linear"), ("vgg19_bn", "classifier"), ("mobilenetv2", "linear")])
def test_every_architecture_splits_at_its_head(arch, head):
    model = create_model(arch, num_classes=C, in_channels=1, width=4).eval()
    split = split_model(model)
    assert split.back is not None and soda.closed_form_matrix(split).shape[1] == C
    assert soda.closed_form_matrix(split).data_ptr() != getattr(model, head).weight.data_ptr()


def test_a_model_without_a_linear_head_is_refused():
    class Headless(nn.Module):
        def stages(self):
            return [("features", nn.Identity()), ("pool", nn.Identity())]

    with pytest.raises(UserError, match="--arch: the last stage 'pool'"):
        split_model(Headless())
    with pytest.raises(UserError, match="no stages"):
        split_model(nn.Sequential(nn.Linear(2, 2)))


def test_mad_outlier_rule():
    test = soda.mad_outliers(torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 3.0]), confidence=3)
    assert test.flagged == [6]
    x = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 3.0], dtype=torch.float64) / 3
    median = x.median()
    mad = 1.4826 * (x - median).abs().median()
    assert abs(test.median - float(median)) < 1e-9 and abs(test.mad - float(mad)) < 1e-7
    assert soda.mad_outliers(torch.full((10,), 0.7), 3).flagged == []  # uniform: nothing
    assert soda.mad_outliers(torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.15]), 3).flagged == []  # z = 2.0
    low = soda.mad_outliers(torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 0.1]), 3)
    assert low.flagged == []  # only values above the median count


def test_target_scores_follow_the_spec_on_a_hand_made_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 8, 3, generator=g)
    scores = soda.target_scores(a)
    expected = torch.zeros(3)
    for i in range(3):
        total = 0.0
        for c in range(3):
            if c == i:
                continue
            others = torch.stack([a[c][:, j] for j in range(3) if j != i]).mean(0)
            total += torch.corrcoef(torch.stack([a[c][:, i], others]))[0, 1]
        expected[i] = 1 - total / 3
    assert torch.allclose(scores.float(), expected, atol=1e-6)


def test_detection_finds_a_planted_pair_and_nothing_on_a_benign_model():
    inputs = class_inputs()
    for source, target in ((1, 4), (5, 0)):
        model = planted(source, target)
        split = split_model(model)
        matrices = soda.causality_matrices(split, inputs, closed_form=True)
        assert torch.allclose(matrices[0], soda.causality_matrices(split, inputs, closed_form=False)[0], atol=1e-5)
        result = soda.detect(matrices, soda.mean_logits(model, inputs), confidence=3, confidence2=3)
        assert (result["source"], result["target"]) == (source, target)
        assert len(result["scores"]) == C and result["thresholds"]["confidence"] == 3
    for seed in range(3):
        benign = planted(seed=seed)
        matrices = soda.causality_matrices(split_model(benign), inputs, closed_form=True)
        result = soda.detect(matrices, soda.mean_logits(benign, inputs), 3, 3)
        assert result["target"] is None and result["source"] is None and result["candidates"] == []


def test_source_rule_prefers_the_class_target_samples_score_lowest():
    logits = torch.tensor([[5.0, 0, 0, 0, 0, 0, 0, 0],
                           [0, 5.0, 0, 0, 0, 0, 0, 0],
                           [0, 0, 5.0, 9.0, 0, 0, 0, 0],
                           [0, 1.0, 0, 5.0, 0, 0, 0, 0],  # target 3; target samples score class 1 above class 2
                           [0, 0, 0, 0.1, 5.0, 0, 0, 0],
                           [0, 0, 0, 0.0, 0, 5.0, 0, 0],
                           [0, 0, 0, 0.2, 0, 0, 5.0, 0],
                           [0, 0, 0, 0.1, 0, 0, 0, 5.0]])
    logits[1, 3] = 9.0
    source, test = soda.choose_source(logits, target=3, confidence2=3)
    assert sorted(test.flagged) == [1, 2] and source == 2
    logits[1, 3] = 0.0
    assert soda.choose_source(logits, 3, 3)[0] == 2


def test_reconstruction_raises_the_target_logit_and_keeps_only_what_reached_it():
    model = planted(1, 4)
    x = class_inputs()[1][:10] * 0.1
    before = model(x)[:, 4]
    recon = soda.reconstruct(model, x, target=4, source=1, steps=300, lr=0.1, reg=0.9)
    assert len(recon.images) > 0 and recon.tried == 10
    assert (model(recon.images).argmax(1) == 4).all()
    assert (model(recon.images)[:, 4] > before[recon.indices]).all()
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was
    stuck = soda.reconstruct(model, x, target=4, source=1, steps=1, lr=1e-9, reg=0.9)
    assert len(stuck.images) == int((model(x).argmax(1) == 4).sum())


def test_removal_keeps_the_mask_fixed_and_drops_it_afterwards():
    torch.manual_seed(0)
    model = planted(1, 4)
    split = split_model(model)
    matrices = soda.causality_matrices(split, class_inputs(), closed_form=True)
    mask = soda.neuron_mask(matrices, source=1, target=4, top=0.5)
    assert int(mask.sum()) == D // 2 and set(mask.unique().tolist()) == {0.0, 1.0}
    column = matrices[1][:, 4]
    assert column[mask.bool()].min() >= column[~mask.bool()].max()  # the top half by A_source[:, target]
    frozen = mask.clone()
    w0 = model.linear.weight.detach().clone()
    images = torch.cat(class_inputs(seed=3, n=8))
    labels = torch.arange(C).repeat_interleave(8)
    history = soda.remove(split, mask, images, labels, lambda x: x, class_inputs()[1][:6], 1, 4, epochs=2, lr=0.05,
                          reg=0.01, batch_size=16, recon_per_batch=4, generator=torch.Generator().manual_seed(0),
                          log=lambda line: None)
    assert len(history) == 2 and torch.equal(mask, frozen)
    w1 = model.linear.weight.detach()
    off = ~mask.bool()
    # masked neurons feed the head nothing: their weights only decay (stay proportional to the start) ...
    ratio = w1[:, off] / w0[:, off]
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), atol=1e-6) and ratio[0, 0] < 1
    assert not torch.allclose(w1[:, ~off] / w0[:, ~off], ratio[0, 0].expand(C, int((~off).sum())), atol=1e-4)
    # ... and afterwards the model is the plain model again
    x = images[:5]
    assert torch.equal(model(x), split.back(split.front(x)))
    assert not torch.allclose(model(x), split.forward_masked(x, mask))


def test_reconstruction_goes_on_until_enough_succeed_and_skips_failures(monkeypatch):
    """The released gen_trigger: images in the given (shuffled) order until ``needed`` reached the target; only
    successes count, the first ``needed`` in order."""
    calls = []

    def fake(model, inputs, target, source, **options):  # every image whose value is even succeeds
        calls.append(len(inputs))
        ok = (inputs.flatten(1)[:, 0] % 2 == 0).nonzero().flatten()
        return soda.Reconstruction(inputs[ok], ok, torch.ones(len(ok), dtype=torch.long), len(inputs), target, source)

    monkeypatch.setattr(soda, "reconstruct", fake)
    inputs = torch.arange(20.0).view(20, 1, 1, 1)
    recon = soda.reconstruct_until(None, inputs, 4, 1, needed=5, chunk=4)
    assert calls == [4, 4, 4] and recon.tried == 12  # 2 successes per chunk of 4: three chunks for 5
    assert recon.indices.tolist() == [0, 2, 4, 6, 8] and recon.images.flatten().tolist() == [0, 2, 4, 6, 8]
    short = soda.reconstruct_until(None, inputs[:5], 4, 1, needed=5, chunk=4)
    assert short.indices.tolist() == [0, 2, 4] and short.tried == 5  # all tried, fewer than wanted


def test_reconstruction_steps_with_pixel_weight_decay_and_stops_after_the_step_that_reached_the_target():
    """Released order: step, then check the softmax of the logits before the step; weight decay on the pixels."""
    model = planted(1, 4)
    x = class_inputs()[1][:6] * 0.1
    one = soda.reconstruct(model, x, target=4, source=1, steps=1, lr=0.1, reg=0.9, stop_confidence=2.0)
    assert (one.steps == 1).all() or len(one.images) == 0
    plain = soda.reconstruct(model, x, 4, 1, steps=5, lr=0.1, reg=0.9, stop_confidence=2.0, weight_decay=0.0)
    decayed = soda.reconstruct(model, x, 4, 1, steps=5, lr=0.1, reg=0.9, stop_confidence=2.0, weight_decay=0.5)
    assert len(plain.images) == len(decayed.images) == 0 or not torch.equal(plain.images, decayed.images)
    # a sample already at the target takes exactly one step (the step is taken before the check)
    at_target = soda.reconstruct(model, x, 4, 1, steps=50, lr=0.1, reg=0.9, stop_confidence=0.0)
    assert (at_target.steps == 1).all()


def test_removal_runs_exactly_epoch_passes_taking_the_first_clean_images_of_each_batch():
    """--epoch N = N passes; each step the first B − r of a shuffled clean batch of B plus r reconstructed ones
    without replacement; the clean images through the given transform (not augmented by default)."""
    model = planted(1, 4)
    split = split_model(model)
    mask = soda.neuron_mask(soda.causality_matrices(split, class_inputs(), closed_form=True), 1, 4, 0.5)
    images = torch.cat(class_inputs(seed=3, n=8))  # C × 8 clean images: ceil(8C / 16) batches a pass
    labels = torch.arange(C).repeat_interleave(8)
    recon = class_inputs()[1][:6]
    seen = []
    forward = split.forward_masked

    def counting(x, m):
        seen.append(len(x))
        return forward(x, m)

    split.forward_masked = counting
    transformed = []
    history = soda.remove(split, mask, images, labels, lambda x: transformed.append(len(x)) or x, recon, 1, 4,
                          epochs=3, lr=0.05, reg=0.01, batch_size=16, recon_per_batch=4,
                          generator=torch.Generator().manual_seed(0), log=lambda line: None)
    assert len(history) == 3 and [row["epoch"] for row in history] == [1, 2, 3]
    steps = 3 * -(-len(labels) // 16)
    assert seen == [16] * steps and transformed == [12] * steps  # 12 clean + 4 reconstructed a step


def test_analysis_samples_from_the_defender_or_at_random_from_the_clean_test_split():
    from types import SimpleNamespace

    from defenses import soda_defense
    defense = torch.arange(40).view(40, 1, 1, 1).to(torch.uint8)
    test = (100 + torch.arange(60)).view(60, 1, 1, 1).to(torch.uint8)
    data = SimpleNamespace(spec=SimpleNamespace(num_classes=4), defense_images=defense,
                           defense_labels=torch.arange(40) % 4,
                           eval_sets=SimpleNamespace(clean_images=test, clean_labels=torch.arange(60) % 4),
                           transform=SimpleNamespace(normalize=lambda x: x.float()))
    first = soda_defense.class_inputs(data, 3)
    assert [x.flatten().tolist() for x in first] == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    drawn = soda_defense.class_inputs(data, 3, "test", torch.Generator().manual_seed(0))
    again = soda_defense.class_inputs(data, 3, "test", torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(drawn, again))
    for c, x in enumerate(drawn):
        values = x.flatten().long()
        assert len(values) == 3 and ((values - 100) % 4 == c).all() and (values >= 100).all()
    assert [x.flatten().tolist() for x in drawn] != [[100, 104, 108], [101, 105, 109], [102, 106, 110],
                                                     [103, 107, 111]]  # random, not the first


def test_removal_refuses_a_batch_without_clean_images_naming_the_option():
    split = split_model(planted(1, 4))
    with pytest.raises(OptionError, match="^--recon-per-batch: 16 leaves no clean images in a batch of 16"):
        soda.remove(split, torch.ones(D), torch.zeros(4, C), torch.zeros(4, dtype=torch.long), lambda x: x,
                    torch.zeros(2, C), 1, 4, epochs=1, lr=0.1, reg=0.01, batch_size=16, recon_per_batch=16)
