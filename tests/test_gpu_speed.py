"""The GPU speed mechanisms, checked for correctness on the CPU against the eager path (no timing here):
static-shape batching, the training loop's numbers, the compiled model, ANP's batches drawn at once, the
cudnn autotuning guard, and fused SGD only where the parameters are on CUDA."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.anp import ANPConfig, anp_iteration, make_optimizers, optimize_masks
from models import create_model, mask_parameters, noise_parameters, reset_perturbation, set_perturbation, train_only
from utils.device import make_runtime, no_autotune
from utils.training import COMPILE_MODES, compile_model, epoch_order, sgd_with_schedule, train_epoch

AUTOCAST = make_runtime("cpu").autocast


def identity(images):
    return images.permute(0, 3, 1, 2).float() / 255


def tiny_data(n: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=g), torch.randint(0, 3, (n,), generator=g)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


@pytest.mark.parametrize("num, batch", [(10, 4), (8, 4), (3, 8), (1, 1)])
def test_epoch_order_modes(num, batch):
    def order(mode):
        return [b.tolist() for b in epoch_order(num, batch, "cpu", torch.Generator().manual_seed(1), mode)]
    keep, drop, pad = order("keep"), order("drop"), order("pad")
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(1)).tolist()
    assert sum(keep, []) == perm  # a DataLoader's pass: the permutation, the last batch possibly short
    assert all(len(b) == batch for b in pad) and sum(pad, [])[:num] == perm  # filled up from the pass's start
    assert set(sum(pad, [])) == set(perm)
    if num % batch and num > batch:
        assert drop == keep[:-1]
    else:
        assert drop == keep
    with pytest.raises(ValueError, match="last_batch"):
        order("wrap")


def old_train_epoch(model, images, labels, augment, optimizer, batch_size, generator):
    """The loop as it was before the static-shape and compile work (the numbers to keep)."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    total_loss, correct, seen = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
    for idx in order.split(batch_size):
        x, y = augment(images[idx]), labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return total_loss.item() / seen, correct.item() / seen


def test_train_epoch_keeps_the_numbers_of_the_eager_loop_and_static_modes_step_full_batches():
    images, labels = tiny_data(22)
    torch.manual_seed(0)
    net = TinyNet()
    ref = copy.deepcopy(net)
    opt, _ = sgd_with_schedule(net, 0.1, [])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for epoch in range(2):
        got = train_epoch(net, images, labels, identity, opt, 8, AUTOCAST, torch.Generator().manual_seed(epoch),
                          progress=False)
        want = old_train_epoch(ref, images, labels, identity, ref_opt, 8, torch.Generator().manual_seed(epoch))
        assert got == want
    for key, value in ref.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    sizes = []
    net.register_forward_pre_hook(lambda m, inputs: sizes.append(len(inputs[0])))
    for mode, expected in (("drop", [8, 8]), ("pad", [8, 8, 8])):
        sizes.clear()
        train_epoch(net, images, labels, identity, opt, 8, AUTOCAST, torch.Generator().manual_seed(0), progress=False,
                    last_batch=mode)
        assert sizes == expected


def test_sgd_is_fused_only_on_cuda_parameters():
    opt, _ = sgd_with_schedule(TinyNet(), 0.1, [1])
    assert not opt.defaults.get("fused")
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4


def test_no_autotune_switches_cudnn_benchmark_off_only_inside_and_only_when_asked():
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        with no_autotune(False):
            assert torch.backends.cudnn.benchmark
        with no_autotune():
            assert not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        with no_autotune():
            assert not torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("chunk", [500, 3])  # all 4 iterations at once; a chunk of 3, then 1
def test_anp_batches_drawn_at_once_are_the_per_iteration_draws(chunk, monkeypatch):
    """optimize_masks draws the batches of many iterations at once when it has a generator of its own; a
    replay drawing one batch per iteration from the same generator gives the same masks."""
    import defenses.anp

    monkeypatch.setattr(defenses.anp, "DRAW_CHUNK", chunk)
    torch.manual_seed(0)
    model = create_model("resnet18", 3, 3, 4, masked=True)
    images, labels = tiny_data(24)
    config = ANPConfig(nb_iter=4, batch_size=8, print_every=10 ** 6)
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    optimize_masks(model, images, labels, identity, config, AUTOCAST, generator=torch.Generator().manual_seed(3),
                   progress=False)
    torch.manual_seed(1)
    train_only(ref, mask_parameters(ref) + noise_parameters(ref))
    mask_opt, noise_opt = make_optimizers(ref, config)
    generator = torch.Generator().manual_seed(3)
    for _ in range(config.nb_iter):
        idx = torch.randint(0, len(labels), (config.batch_size,), generator=generator)
        anp_iteration(ref, identity(images[idx]), labels[idx], mask_opt, noise_opt, config, AUTOCAST)
    set_perturbation(ref, False)
    reset_perturbation(ref)
    for a, b in zip(mask_parameters(model), mask_parameters(ref)):
        assert torch.equal(a, b)


def test_compiled_model_trains_like_the_eager_one():
    """The compiled path (torch.compile's graph capture and AOT autograd; the aot_eager backend here, as
    inductor's C++ compilation takes about a minute on a 2-core CPU) trains to the eager numbers."""
    images, labels = tiny_data(16)
    torch.manual_seed(0)
    eager = TinyNet()
    compiled = compile_model(copy.deepcopy(eager), "default", backend="aot_eager")
    results = []
    for net in (eager, compiled):
        opt, _ = sgd_with_schedule(net, 0.05, [])
        results.append(train_epoch(net, images, labels, identity, opt, 8, AUTOCAST, torch.Generator().manual_seed(0),
                                   progress=False, last_batch="drop"))
    assert results[0] == pytest.approx(results[1], abs=1e-4)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert compile_model(TinyNet(), "off") is not None and "reduce-overhead" in COMPILE_MODES
    with pytest.raises(ValueError, match="compile mode"):
        compile_model(TinyNet(), "fast")


@pytest.mark.slow
def test_anp_on_a_compiled_model_learns_the_eager_masks():
    """ANP's loop through torch.compile (aot_eager here): the perturbed and the plain forward are two graphs
    (guarded on the layers' perturbation switch); the masks match the eager run's."""
    torch.manual_seed(0)
    eager = create_model("resnet18", 3, 3, 2, masked=True)
    compiled = compile_model(copy.deepcopy(eager), "default", backend="aot_eager")
    images, labels = tiny_data(16)
    config = ANPConfig(nb_iter=2, batch_size=8, print_every=10 ** 6)
    for net in (eager, compiled):
        torch.manual_seed(1)
        optimize_masks(net, images, labels, identity, config, AUTOCAST, generator=torch.Generator().manual_seed(3),
                       progress=False)
    for a, b in zip(mask_parameters(eager), mask_parameters(compiled)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any((m < 1).any() for m in mask_parameters(eager))  # the masks moved
