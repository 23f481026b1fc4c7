"""The folded, incremental evaluation of pruning sweeps equals the plain evaluation."""
import pytest
import torch
from torch import nn

from defenses.pruning import prune_neuron, prune_sweep, sort_by_mask
from models import create_model
from utils.device import keep_freed_host_memory
from utils.evaluation import EvalSets, backdoor_metrics, metrics_from_logits, predict, predict_plain
from utils.incremental import IncrementalPredictor, NotTraceable


def normalize(images):
    return (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def trained_looking(arch: str, channels: int = 1, width: int = 8, seed: int = 0) -> nn.Module:
    """A model whose BatchNorms have non-trivial statistics and affine parameters (eval mode)."""
    torch.manual_seed(seed)
    model = create_model(arch, 10, channels, width).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def images(n: int, channels: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28, channels), dtype=torch.uint8, generator=generator)


def all_neurons(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(name, i, float(torch.rand((), generator=generator)))
            for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)
            for i in range(module.num_features)]


@pytest.mark.parametrize("arch", ["resnet18", "vgg19_bn", "mobilenetv2"])
def test_folded_prediction_equals_the_model(arch):
    model = trained_looking(arch)
    x = images(70)
    plain = predict_plain(model, x, normalize, batch_size=32)
    assert torch.allclose(predict(model, x, normalize, batch_size=32), plain, atol=1e-4)
    model.train()  # predict evaluates in eval mode and leaves the mode as it was
    assert torch.allclose(predict(model, x, normalize), plain, atol=1e-4)
    assert model.training


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("cache_bytes", [None, 0, 300_000])
def test_incremental_logits_follow_every_row_of_a_sweep(arch, cache_bytes):
    model = trained_looking(arch)
    sets = {"a": images(90), "b": images(50, seed=2)}
    predictor = IncrementalPredictor(model, sets, normalize, batch_size=32, cache_bytes=cache_bytes)
    values = sort_by_mask(all_neurons(model))
    start = 0
    for threshold in [0.0, 0.0, 0.05, 0.1, 0.3, 0.3, 0.6, 0.9]:
        while start < len(values) and values[start][2] <= threshold:
            prune_neuron(model, values[start][0], values[start][1])
            start += 1
        got = predictor.logits()
        for name, x in sets.items():
            assert torch.allclose(got[name], predict_plain(model, x, normalize), atol=1e-4), (threshold, name)
    assert predictor.recomputed_from[1] == -1  # nothing changed: nothing evaluated


def test_a_change_late_in_the_network_recomputes_only_from_there():
    model = trained_looking("resnet18")
    predictor = IncrementalPredictor(model, {"x": images(40)}, normalize, batch_size=16)
    predictor.logits()
    prune_neuron(model, "layer4.1.bn2", 3)
    predictor.logits()
    prune_neuron(model, "layer1.0.bn1", 0)
    predictor.logits()
    prune_neuron(model, "bn1", 0)
    predictor.logits()
    steps = len(predictor.steps)
    first, late, early, stem = predictor.recomputed_from
    assert first == 0 and steps * 3 // 4 < late < steps and 0 < early < steps // 4 and stem == 0
    with torch.no_grad():  # any parameter counts, not only BatchNorm weights
        model.linear.bias += 1.0
    after = predictor.logits()["x"]
    assert predictor.recomputed_from[-1] > late
    assert torch.allclose(after, predict_plain(model, images(40), normalize), atol=1e-4)


def test_cuts_are_kept_from_the_last_backwards_within_the_budget():
    model = trained_looking("resnet18")
    x = images(20)
    everything = IncrementalPredictor(model, {"x": x}, normalize, cache_bytes=1 << 30)
    everything.logits()
    sizes = everything._cut_sizes()
    last_two = sorted(sizes)[-2:]
    budget = sum(sizes[p] for p in last_two) * len(x)
    some = IncrementalPredictor(model, {"x": x}, normalize, cache_bytes=budget)
    some.logits()
    assert some.cached_cuts == set(last_two) and everything.cached_cuts == set(sizes)
    nothing = IncrementalPredictor(model, {"x": x}, normalize, cache_bytes=0)
    nothing.logits()
    assert nothing.cached_cuts == set()


def test_sweep_rows_equal_the_plain_sweep_to_four_decimals():
    model = trained_looking("resnet18", channels=3, width=8)
    clean, labels = images(120, 3), torch.randint(0, 10, (120,))
    poison = clean.clone()
    poison[:, -4:, -4:] = 255
    sets = EvalSets(clean, labels, poison, torch.zeros_like(labels), labels)
    values = all_neurons(model, seed=3)
    plain = prune_sweep(trained_looking("resnet18", 3, 8), values, "threshold", 0.9, 0.05,
                        lambda m: backdoor_metrics(m, sets, normalize))
    swept = trained_looking("resnet18", 3, 8)
    predictor = IncrementalPredictor(swept, {"clean": clean, "poison": poison}, normalize)

    def measure(_):
        logits = predictor.logits()
        return metrics_from_logits(logits["clean"], logits["poison"], sets)
    fast = prune_sweep(swept, values, "threshold", 0.9, 0.05, measure)
    assert [r.pruned for r in fast] == [r.pruned for r in plain]
    for a, b in zip(fast, plain):
        assert a.line("threshold") == b.line("threshold")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.linear = nn.Linear(4, 10)

    def forward(self, x):
        out = self.conv(x)
        if out.mean() > 0:  # control flow on values: torch.fx cannot trace it
            out = -out
        return self.linear(out.mean((2, 3)))


def test_an_untraceable_model_is_evaluated_plainly():
    model = DataDependent().eval()
    with pytest.raises(NotTraceable):
        IncrementalPredictor(model, {"x": images(4)}, normalize)
    assert torch.equal(predict(model, images(4), normalize), predict_plain(model, images(4), normalize))


def test_one_shot_predictor_refuses_a_second_call():
    model = trained_looking("resnet18")
    predictor = IncrementalPredictor(model, {"x": images(4)}, normalize, remember=False)
    predictor.logits()
    assert predictor.snapshot == {}
    with pytest.raises(RuntimeError):
        predictor.logits()


def test_host_allocator_is_tuned_on_glibc():
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_host_memory() is True


@pytest.mark.parametrize("perturbed", [False, True])
def test_batchnorms_with_neuron_masks_fold_too(perturbed):
    from models import reset_perturbation, set_perturbation

    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1, 8, masked=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "neuron_mask" in name:
                p.uniform_(0, 1)
    reset_perturbation(model, rand_init=True, eps=0.4)
    set_perturbation(model, perturbed)
    x = images(40)
    predictor = IncrementalPredictor(model, {"x": x}, normalize, remember=False)
    assert any(step.fold for step in predictor.steps)
    assert torch.allclose(predictor.logits()["x"], predict_plain(model, x, normalize), atol=1e-4)
