import pytest
import torch

import models
from models import ARCHITECTURES, create_model
from utils.errors import UserError


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 28)])
def test_every_architecture_runs_masked_and_plain(arch, in_channels, size):
    for masked in (False, True):
        model = create_model(arch, num_classes=7, in_channels=in_channels, width=8, masked=masked)
        out = model(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()


def test_original_call_signature_and_parameter_names():
    model = models.resnet18(num_classes=10, norm_layer=models.NoisyBatchNorm2d)
    names = set(model.state_dict())
    for key in ["conv1.weight", "bn1.weight", "bn1.neuron_mask", "bn1.neuron_noise", "bn1.neuron_noise_bias",
                "layer1.0.conv1.weight", "layer1.1.bn2.running_var", "layer2.0.shortcut.0.weight",
                "layer2.0.shortcut.1.weight", "layer4.1.bn2.bias", "linear.weight", "linear.bias"]:
        assert key in names
    assert model.state_dict()["linear.weight"].shape == (10, 512)
    plain = models.resnet18(num_classes=10)
    masked_keys = {k for k in names if not models.is_mask_parameter(k)}
    assert masked_keys == set(plain.state_dict())
    # 4800 BatchNorm channels in the paper's ResNet-18, as in the original mask files.
    assert sum(m.num_features for _, m in models.masked_layers(model)) == 4800


def test_width_scales_channels():
    model = create_model("resnet18", width=16)
    assert model.conv1.out_channels == 16 and model.linear.in_features == 128


def test_unknown_architecture_message():
    with pytest.raises(UserError, match="^--arch: unknown architecture 'resnet7'"):
        create_model("resnet7")

