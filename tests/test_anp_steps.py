"""ANP's iteration, step by step, on a tiny network with hand-set values.

Each test computes what ``anp.md`` prescribes with autograd on a copy of the network (the expected
value) and compares it with what :mod:`defenses.anp` does. Together they fail when the perturbation
descends instead of ascending, uses the raw gradient instead of its sign, leaves ``neuron_noise_bias``
alone, takes the wrong number or size of steps, when the mask loss swaps its weights or computes the
robust term without the perturbation, when eps = 0 keeps a perturbed term, and when ``bn_mode`` has
no effect.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.anp import ANPConfig, anp_iteration, make_optimizers, mask_step, optimize_masks, perturb_neurons
from models import noise_parameters, reset_perturbation, set_perturbation
from models.masked_batchnorm import MaskedBatchNorm2d
from utils.device import make_runtime

AUTOCAST = make_runtime("cpu").autocast
GAMMA = [1.0, 0.5, 2.0, 1.5]
BETA = [0.1, -0.2, 0.3, -0.05]  # non-zero: with beta = 0 the bias perturbation has no gradient


class TinyNet(nn.Module):
    """conv -> masked BatchNorm (4 neurons) -> ReLU -> global pooling -> linear, 3 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = MaskedBatchNorm2d(4)
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor(GAMMA))
        net.bn.bias.copy_(torch.tensor(BETA))
        net.bn.running_mean.copy_(torch.tensor([0.3, -0.1, 0.2, 0.0]))
        net.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 3.0]))
        net.bn.neuron_mask.copy_(torch.tensor([1.0, 0.8, 0.5, 0.9]))
    return net


def batch(n: int = 8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 6, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def set_noise(net: TinyNet, noise, noise_bias) -> None:
    with torch.no_grad():
        net.bn.neuron_noise.copy_(torch.tensor(noise))
        net.bn.neuron_noise_bias.copy_(torch.tensor(noise_bias))


def perturbed_ce(net: TinyNet, x, y, train: bool = True) -> torch.Tensor:
    net.train(train)
    set_perturbation(net, True)
    loss = F.cross_entropy(net(x), y)
    set_perturbation(net, False)
    return loss


def expected_signed_ascent(net: TinyNet, x, y, lr: float, steps: int = 1, train: bool = True):
    """The perturbation after ``steps`` signed ascent steps of size ``lr`` on the perturbed CE."""
    ref = copy.deepcopy(net)
    for _ in range(steps):
        grads = torch.autograd.grad(perturbed_ce(ref, x, y, train), [ref.bn.neuron_noise, ref.bn.neuron_noise_bias])
        with torch.no_grad():
            ref.bn.neuron_noise += lr * grads[0].sign()
            ref.bn.neuron_noise_bias += lr * grads[1].sign()
    return ref.bn.neuron_noise.detach(), ref.bn.neuron_noise_bias.detach()


def test_perturbation_is_one_signed_ascent_step_on_both_noises():
    net, (x, y) = tiny_net(), batch()
    set_noise(net, [0.1, -0.2, 0.0, 0.3], [-0.1, 0.05, 0.2, 0.0])
    config = ANPConfig(anp_eps=0.4, anp_steps=1)
    noise, noise_bias = expected_signed_ascent(net, x, y, lr=0.4)
    assert (noise_bias != torch.tensor([-0.1, 0.05, 0.2, 0.0])).all()  # the bias perturbation must move too
    before = perturbed_ce(copy.deepcopy(net), x, y).item()
    _, noise_opt = make_optimizers(net, config)
    net.train()
    perturb_neurons(net, x, y, noise_opt, config, AUTOCAST)
    torch.testing.assert_close(net.bn.neuron_noise.detach(), noise, rtol=0, atol=1e-6)
    torch.testing.assert_close(net.bn.neuron_noise_bias.detach(), noise_bias, rtol=0, atol=1e-6)
    assert perturbed_ce(net, x, y).item() > before  # the adversary raises the loss
    assert net.bn.neuron_mask.tolist() == pytest.approx([1.0, 0.8, 0.5, 0.9])  # the masks do not move here


@pytest.mark.parametrize("project", [False, True])
def test_several_perturbation_steps_of_eps_over_steps(project):
    net, (x, y) = tiny_net(), batch()
    start = ([0.35, -0.2, 0.0, 0.3], [-0.38, 0.05, 0.2, 0.0])
    set_noise(net, *start)
    config = ANPConfig(anp_eps=0.4, anp_steps=2, project_noise=project)
    if project:  # with projection each step is clipped back to [-eps, eps]: replay step by step
        ref = copy.deepcopy(net)
        for _ in range(2):
            n1, b1 = expected_signed_ascent(ref, x, y, lr=0.2)
            set_noise(ref, n1.clamp(-0.4, 0.4).tolist(), b1.clamp(-0.4, 0.4).tolist())
        noise, noise_bias = ref.bn.neuron_noise.detach(), ref.bn.neuron_noise_bias.detach()
    else:
        noise, noise_bias = expected_signed_ascent(net, x, y, lr=0.2, steps=2)
        # Without projection the original can leave [-eps, eps].
        assert noise.abs().max() > 0.4 + 1e-6 or noise_bias.abs().max() > 0.4 + 1e-6
    _, noise_opt = make_optimizers(net, config)
    net.train()
    perturb_neurons(net, x, y, noise_opt, config, AUTOCAST)
    torch.testing.assert_close(net.bn.neuron_noise.detach(), noise, rtol=0, atol=1e-6)
    torch.testing.assert_close(net.bn.neuron_noise_bias.detach(), noise_bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.2, 0.7])
def test_mask_step_weights_natural_and_perturbed_losses(alpha):
    net, (x, y) = tiny_net(), batch()
    set_noise(net, [0.3, -0.4, 0.2, 0.1], [0.1, 0.4, -0.3, 0.2])
    ref = copy.deepcopy(net)
    ref.train()
    natural = F.cross_entropy(ref(x), y)
    robust = perturbed_ce(ref, x, y)
    (g_nat,) = torch.autograd.grad(natural, [ref.bn.neuron_mask])
    (g_rob,) = torch.autograd.grad(robust, [ref.bn.neuron_mask])
    assert (g_nat - g_rob).abs().max() > 1e-3  # the perturbation matters for the mask gradient
    config = ANPConfig(lr=0.2, anp_alpha=alpha, anp_eps=0.4)
    expected = (ref.bn.neuron_mask - 0.2 * (alpha * g_nat + (1 - alpha) * g_rob)).clamp(0, 1).detach()
    mask_opt, _ = make_optimizers(net, config)
    net.train()
    loss, _ = mask_step(net, x, y, mask_opt, config, AUTOCAST)
    assert loss.item() == pytest.approx(alpha * natural.item() + (1 - alpha) * robust.item(), abs=1e-6)
    torch.testing.assert_close(net.bn.neuron_mask.detach(), expected, rtol=0, atol=1e-6)
    assert not net.bn.is_perturbed  # the model is left unperturbed


def test_masks_are_clipped_to_unit_interval():
    net, (x, y) = tiny_net(), batch()
    config = ANPConfig(lr=1000.0, anp_eps=0.4)
    mask_opt, _ = make_optimizers(net, config)
    net.train()
    mask_step(net, x, y, mask_opt, config, AUTOCAST)
    mask = net.bn.neuron_mask.detach()
    assert mask.min() >= 0 and mask.max() <= 1 and ((mask == 0) | (mask == 1)).all()


def test_eps_zero_means_no_perturbation_and_only_the_natural_term():
    net, (x, y) = tiny_net(), batch()
    config = ANPConfig(lr=0.2, anp_alpha=0.2, anp_eps=0.0)
    ref = copy.deepcopy(net)
    ref.train()
    (g_nat,) = torch.autograd.grad(F.cross_entropy(ref(x), y), [ref.bn.neuron_mask])
    expected = (ref.bn.neuron_mask - 0.2 * 0.2 * g_nat).clamp(0, 1).detach()
    mask_opt, noise_opt = make_optimizers(net, config)
    anp_iteration(net, x, y, mask_opt, noise_opt, config, AUTOCAST)
    torch.testing.assert_close(net.bn.neuron_mask.detach(), expected, rtol=0, atol=1e-6)
    assert not net.bn.neuron_noise.any() and not net.bn.neuron_noise_bias.any()


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_iteration_draws_noise_in_eps_ball_and_respects_bn_mode(bn_mode):
    """One whole iteration: uniform start in [-eps, eps] from the global RNG, the signed step, the mask
    step, with BatchNorm in train mode (batch statistics, running statistics move) or eval mode
    (running statistics used and left alone)."""
    net, (x, y) = tiny_net(), batch()
    config = ANPConfig(lr=0.2, anp_alpha=0.2, anp_eps=0.4, bn_mode=bn_mode)
    train = bn_mode == "train"
    ref = copy.deepcopy(net)
    torch.manual_seed(7)
    reset_perturbation(ref, rand_init=True, eps=0.4)
    start = ref.bn.neuron_noise.detach().clone(), ref.bn.neuron_noise_bias.detach().clone()
    assert all(t.abs().max() <= 0.4 and t.abs().max() > 0 for t in start)
    n1, b1 = expected_signed_ascent(ref, x, y, lr=0.4, train=train)
    set_noise(ref, n1.tolist(), b1.tolist())
    ref.train(train)
    (g_nat,) = torch.autograd.grad(F.cross_entropy(ref(x), y), [ref.bn.neuron_mask])
    (g_rob,) = torch.autograd.grad(perturbed_ce(ref, x, y, train), [ref.bn.neuron_mask])
    expected = (ref.bn.neuron_mask - 0.2 * (0.2 * g_nat + 0.8 * g_rob)).clamp(0, 1).detach()

    running = net.bn.running_mean.clone(), net.bn.running_var.clone()
    mask_opt, noise_opt = make_optimizers(net, config)
    torch.manual_seed(7)
    anp_iteration(net, x, y, mask_opt, noise_opt, config, AUTOCAST)
    assert net.training == train
    torch.testing.assert_close(net.bn.neuron_noise.detach(), n1, rtol=0, atol=1e-6)
    torch.testing.assert_close(net.bn.neuron_mask.detach(), expected, rtol=0, atol=1e-6)
    moved = not torch.equal(net.bn.running_mean, running[0]) or not torch.equal(net.bn.running_var, running[1])
    assert moved == train


def test_bn_mode_changes_the_learnt_masks():
    """End of the chain: the same data and seed give other masks in eval mode than in train mode."""
    images = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    labels = torch.randint(0, 3, (16,))
    normalize = lambda u: u.permute(0, 3, 1, 2).float().div(255)  # noqa: E731
    masks = {}
    for mode in ("train", "eval"):
        net = tiny_net()
        torch.manual_seed(0)
        optimize_masks(net, images, labels, normalize, ANPConfig(nb_iter=3, batch_size=8, bn_mode=mode), AUTOCAST,
                       generator=torch.Generator().manual_seed(0), progress=False)
        masks[mode] = net.bn.neuron_mask.detach().clone()
        assert not any(p.any() for p in noise_parameters(net))  # perturbation reset at the end
    assert (masks["train"] - masks["eval"]).abs().max() > 1e-4
