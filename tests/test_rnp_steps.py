"""RNP's unlearning and mask recovery, step by step, against a plain replay of ``rnp.md``.

The replay below is written from the spec, batch by batch (same shuffling generator, no
augmentation): SGD ascent with momentum and weight decay, the gradient norm clipped *after* the
backward pass, MultiStepLR per epoch, the stop rule; recovery descends alpha·CE on the masks only and
clips them to [0, 1]. The tests fail when clipping moves before the backward pass (it then does
nothing), the schedule or the loss's sign or weight changes, the default stop rule is not the paper's
per-epoch one, or either rule keeps another model than the one that met it (the per-epoch rule: the model
at the end of that epoch; the per-batch variant: the model before the step of the batch that met it).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.rnp import RNPConfig, recover_masks, unlearn
from models.masked_batchnorm import MaskedBatchNorm2d
from utils.device import make_runtime

AUTOCAST = make_runtime("cpu").autocast


class TinyNet(nn.Module):
    def __init__(self, masked: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = (MaskedBatchNorm2d if masked else nn.BatchNorm2d)(6)
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def identity(images):
    return images


def data(n: int = 24):
    """Three classes told apart by which colour channel is bright, so a trained net starts accurate."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 3, 6, 6, generator=generator) * 0.3
    images[torch.arange(n), labels] += 1.5
    return images, labels


def trained_net(masked: bool = False) -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet(masked)
    images, labels = data()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for _ in range(8):  # accurate but not saturated, so ascent has gradients to follow
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
    with torch.no_grad():
        assert (net(images).argmax(1) == labels).float().mean() == 1.0
    return net


def replay_unlearning(net, images, labels, config: RNPConfig, seed: int):
    """Per batch: accuracies seen by the stop rule and the state after each ascent step."""
    net = copy.deepcopy(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.unlearning_lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.schedule, gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    trace = []  # (epoch, batch accuracy before its step, state before the step)
    states_after_epoch, lrs = [], []
    for epoch in range(1, config.unlearning_epochs + 1):
        net.train()
        lrs.append(optimizer.param_groups[0]["lr"])
        for idx in torch.randperm(len(labels), generator=generator).split(config.batch_size):
            logits = net(images[idx])
            loss = F.cross_entropy(logits, labels[idx])
            accuracy = (logits.argmax(1) == labels[idx]).float().mean().item()
            trace.append((epoch, accuracy, copy.deepcopy(net.state_dict())))
            optimizer.zero_grad()
            (-loss).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad_norm)
            optimizer.step()
        states_after_epoch.append(copy.deepcopy(net.state_dict()))
        scheduler.step()
    return trace, states_after_epoch, lrs


def assert_same_state(net, state):
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-6, msg=key)


def test_unlearning_follows_ascent_clip_after_backward_and_schedule():
    images, labels = data()
    net = trained_net()
    # Clipping at 0.05 binds (the raw gradient norm is larger), and the lr drops at epochs 1 and 2.
    config = RNPConfig(batch_size=8, unlearning_lr=0.5, unlearning_epochs=3, schedule=[1, 2], clean_threshold=-1.0,
                       clip_grad_norm=0.05)
    _, states, lrs = replay_unlearning(net, images, labels, config, seed=5)
    probe = copy.deepcopy(net)
    F.cross_entropy(probe(images[:8]), labels[:8]).backward()
    assert torch.nn.utils.clip_grad_norm_(probe.parameters(), float("inf")) > 0.15  # clipping really binds
    seen_lrs = []
    result = unlearn(net, images, labels, identity, config, AUTOCAST, lambda e, lr, s: seen_lrs.append(lr),
                     torch.Generator().manual_seed(5), progress=False)
    assert not result.stopped and result.epochs_run == 3
    assert lrs == pytest.approx([0.5, 0.05, 0.005])  # MultiStepLR at epochs 1 and 2, factor 0.1
    assert seen_lrs == pytest.approx(lrs)
    assert_same_state(net, states[-1])


def test_unlearning_raises_the_clean_loss():
    images, labels = data()
    net = trained_net()
    before = F.cross_entropy(net.eval()(images), labels).item()
    unlearn(net, images, labels, identity, RNPConfig(batch_size=8, unlearning_lr=0.2, unlearning_epochs=2,
            clean_threshold=-1.0), AUTOCAST, generator=torch.Generator().manual_seed(0), progress=False)
    assert F.cross_entropy(net.eval()(images), labels).item() > before + 0.1


def test_the_default_stop_rule_is_the_papers_per_epoch_check():
    import rnp_main

    assert RNPConfig().stop_check == "epoch"
    assert rnp_main.parse_args(["--backdoor_model_path", "m.th"]).stop_check == "epoch"
    assert rnp_main.parse_args(["--backdoor_model_path", "m.th", "--stop_check", "batch"]).stop_check == "batch"


def test_default_rule_finishes_the_epoch_that_meets_it_and_keeps_that_model():
    images, labels = data()
    net = trained_net()
    # A threshold of 1.0 is met by the very first batch; the per-epoch rule still finishes epoch 1 (all its
    # ascent steps) and stops there, keeping the model at the end of epoch 1, not the one before it.
    config = RNPConfig(batch_size=8, unlearning_lr=0.2, unlearning_epochs=3, clean_threshold=1.0)
    _, states, _ = replay_unlearning(net, images, labels, config, seed=1)
    result = unlearn(net, images, labels, identity, config, AUTOCAST, generator=torch.Generator().manual_seed(1),
                     progress=False)
    assert result.stopped and result.epochs_run == 1 and result.train_acc == result.epoch_train_acc
    assert_same_state(net, states[0])


def test_batch_stop_on_the_first_batch_takes_no_step():
    images, labels = data()
    net = trained_net()
    state = copy.deepcopy(net.state_dict())
    result = unlearn(net, images, labels, identity, RNPConfig(batch_size=8, clean_threshold=1.0, unlearning_epochs=3,
                     stop_check="batch"), AUTOCAST, generator=torch.Generator().manual_seed(0), progress=False)
    assert result.stopped and result.epochs_run == 1 and result.train_acc == 1.0
    for key, value in net.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            # Running statistics move with the checking forward pass in train mode; weights must not.
            assert torch.equal(value, state[key]) or "running" in key, key


def test_batch_stop_keeps_exactly_the_model_that_met_the_rule():
    images, labels = data()
    net = trained_net()
    config = RNPConfig(batch_size=8, unlearning_lr=0.2, unlearning_epochs=4, schedule=[10, 20], clean_threshold=-1.0,
                       stop_check="batch")
    trace, _, _ = replay_unlearning(net, images, labels, config, seed=2)
    # The first batch (not the first of all, not the last of its epoch) whose accuracy is below every earlier one:
    # with that accuracy as the threshold, the rule is met there for the first time.
    per_epoch = len(trace) // config.unlearning_epochs
    stop = next(i for i, (_, acc, _) in enumerate(trace)
                if 0 < i and i % per_epoch != per_epoch - 1 and acc < min(a for _, a, _ in trace[:i]))
    config.clean_threshold = trace[stop][1]
    result = unlearn(net, images, labels, identity, config, AUTOCAST, generator=torch.Generator().manual_seed(2),
                     progress=False)
    assert result.stopped and result.epochs_run == trace[stop][0] and result.train_acc == pytest.approx(trace[stop][1])
    assert_same_state(net, trace[stop][2])


def test_epoch_stop_keeps_the_model_at_the_end_of_the_epoch():
    images, labels = data()
    net = trained_net()
    config = RNPConfig(batch_size=8, unlearning_lr=0.2, unlearning_epochs=4, clean_threshold=-1.0, stop_check="epoch")
    trace, states, _ = replay_unlearning(net, images, labels, config, seed=2)
    means = [sum(a for e, a, _ in trace if e == epoch) / sum(1 for e, _, _ in trace if e == epoch)
             for epoch in range(1, 5)]
    # Batches are equal-sized here, so the epoch's accuracy is the mean of its batches'.
    first = next(i for i in range(1, 4) if means[i] < min(means[:i]))
    config.clean_threshold = means[first]
    result = unlearn(net, images, labels, identity, config, AUTOCAST, generator=torch.Generator().manual_seed(2),
                     progress=False)
    assert result.stopped and result.epochs_run == first + 1
    assert_same_state(net, states[first])


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_recovery_descends_alpha_ce_on_the_masks_only(alpha):
    images, labels = data()
    net = trained_net(masked=True)
    with torch.no_grad():  # an "unlearned" model: damage the weights so the masks have something to recover
        net.conv.weight.mul_(-0.5)
    config = RNPConfig(batch_size=8, recovering_lr=0.2, recovering_epochs=2, alpha=alpha)
    ref = copy.deepcopy(net)
    optimizer = torch.optim.SGD([ref.bn.neuron_mask], lr=0.2, momentum=0.9)
    generator = torch.Generator().manual_seed(4)
    for _ in range(2):
        ref.train()
        for idx in torch.randperm(len(labels), generator=generator).split(8):
            optimizer.zero_grad()
            (alpha * F.cross_entropy(ref(images[idx]), labels[idx])).backward()
            optimizer.step()
            with torch.no_grad():
                ref.bn.neuron_mask.clamp_(0, 1)
    assert (ref.bn.neuron_mask < 1).any()
    weights = {k: v.clone() for k, v in net.named_parameters() if not k.endswith("neuron_mask")}
    recover_masks(net, images, labels, identity, config, AUTOCAST, generator=torch.Generator().manual_seed(4),
                  progress=False)
    torch.testing.assert_close(net.bn.neuron_mask.detach(), ref.bn.neuron_mask.detach(), rtol=0, atol=1e-6)
    for key, value in net.named_parameters():
        if key in weights:
            assert torch.equal(value, weights[key]), key


@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.5, 0.3, -1.0])  # stop at batch 1, 9, 10, 11, never
def test_deferred_batch_check_keeps_the_same_model_as_the_eager_check(threshold):
    """The GPU path reads each batch's verdict one step late and puts the model back: same model, same
    numbers as checking every batch before its step (forced here on the CPU)."""
    images, labels = data(30)  # batches of 8, 8, 8, 6: the last one is partial
    runs = []
    for defer in (False, True):
        net = trained_net()
        config = RNPConfig(batch_size=8, unlearning_lr=0.2, unlearning_epochs=3, clean_threshold=threshold,
                           stop_check="batch")
        rows = []
        result = unlearn(net, images, labels, identity, config, AUTOCAST, lambda e, lr, s: rows.append(s),
                         torch.Generator().manual_seed(2), progress=False, defer_check=defer)
        runs.append((net.state_dict(), result, rows))
    (eager, r_eager, rows_eager), (deferred, r_deferred, rows_deferred) = runs
    assert r_eager == r_deferred and rows_eager == rows_deferred
    assert r_eager.stopped == (threshold >= 0)
    for key, value in eager.items():
        assert torch.equal(value, deferred[key]), key
