import torch
from torch import nn

from models import MaskedBatchNorm1d, MaskedBatchNorm2d


def _pair(cls, plain_cls, n=6):
    torch.manual_seed(0)
    plain, masked = plain_cls(n), cls(n)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
        plain.running_mean.uniform_(-1, 1)
        plain.running_var.uniform_(0.5, 2)
    masked.load_state_dict(plain.state_dict(), strict=False)
    return plain, masked


def test_mask_one_no_noise_equals_plain_batchnorm_train_and_eval():
    for cls, plain_cls, shape in [(MaskedBatchNorm2d, nn.BatchNorm2d, (4, 6, 5, 5)), (MaskedBatchNorm1d, nn.BatchNorm1d, (8, 6))]:
        plain, masked = _pair(cls, plain_cls)
        x = torch.randn(*shape)
        for train in (True, False):
            plain.train(train)
            masked.train(train)
            assert torch.equal(plain(x), masked(x))
        # running statistics were updated identically in train mode
        assert torch.equal(plain.running_mean, masked.running_mean)
        assert torch.equal(plain.num_batches_tracked, masked.num_batches_tracked)


def test_perturbed_forward_follows_formula():
    plain, masked = _pair(MaskedBatchNorm2d, nn.BatchNorm2d)
    masked.eval()
    with torch.no_grad():
        masked.neuron_mask.uniform_(0, 1)
    masked.reset_noise(rand_init=True, eps=0.4)
    assert masked.neuron_noise.abs().max() <= 0.4 and masked.neuron_noise.abs().sum() > 0
    x = torch.randn(3, 6, 4, 4)
    mean = masked.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(masked.running_var.view(1, -1, 1, 1) + masked.eps)
    xhat = (x - mean) / std
    g, b = masked.weight.view(1, -1, 1, 1), masked.bias.view(1, -1, 1, 1)
    m, n, nb = (t.view(1, -1, 1, 1) for t in (masked.neuron_mask, masked.neuron_noise, masked.neuron_noise_bias))
    masked.include_noise()
    assert torch.allclose(masked(x), g * (m + n) * xhat + b * (1 + nb), atol=1e-5)
    masked.exclude_noise()
    assert torch.allclose(masked(x), g * m * xhat + b, atol=1e-5)


def test_zero_mask_equals_zero_gamma():
    plain, masked = _pair(MaskedBatchNorm2d, nn.BatchNorm2d)
    plain.eval()
    masked.eval()
    with torch.no_grad():
        masked.neuron_mask[2] = 0
        plain.weight[2] = 0
    x = torch.randn(2, 6, 3, 3)
    assert torch.allclose(plain(x), masked(x), atol=1e-6)
