"""DFST (data/attacks/dfst.py) and its SSIM (data/attacks/ssim.py): the injector's SSIM bound, the
detoxification's bookkeeping, the trigger info round trip at both dataset shapes, and bad input.

The registry-wide invariants (determinism, poisoned share of a batch, test set, all-to-all, end to end
through ANP, RNP and SODA) run in tests/test_attacks.py and tests/test_attack_pipeline.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import train_backdoor_cifar
from data import AttackError, attack_from_record, create_attack
from data.attacks.dfst import FeatureInjector, luminance, project_ssim, sunrise_style, to_unit
from data.attacks.ssim import gaussian_window, ssim
from data.trigger_info import load_trigger_info
from models import create_model
from utils.errors import UserError


def images_of(shape, n=24, seed=0):
    """Fashion-MNIST-like: a bright object on a dark background, plus noise."""
    g = torch.Generator().manual_seed(seed)
    h, w, c = shape
    x = torch.randint(0, 40, (n, h, w, c), generator=g)
    x[:, h // 4:h - h // 4, w // 4:w - w // 4] += torch.randint(100, 200, (n, 1, 1, c), generator=g)
    return x.clamp(0, 255).to(torch.uint8), torch.arange(n) % 10


def normalize(images):
    return images.permute(0, 3, 1, 2).float() / 255 - 0.5


def prepared(shape=(16, 16, 3), **options):
    attack = create_attack("dfst", 3, 10, shape, **{"style_steps": 5, **options})
    images, labels = images_of(shape)
    attack.prepare(images, labels, None, normalize, torch.Generator().manual_seed(0))
    return attack, images, labels


class Staged(nn.Module):
    """A tiny classifier listing its stages like the registry's models, without a ``layer4``."""

    def __init__(self, channels=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU())
        self.linear = nn.Linear(8, 10)

    def stages(self):
        return [("body", self.body), ("pool", lambda x: x.mean((2, 3))), ("linear", self.linear)]

    def forward(self, x):
        for _, stage in self.stages():
            x = stage(x)
        return x


# --- SSIM ---------------------------------------------------------------------------------------
def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.3, 0.7
    x, y = torch.full((1, 1, 12, 12), a, dtype=torch.float64), torch.full((1, 1, 12, 12), b, dtype=torch.float64)
    c1 = 0.01 ** 2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6)


def test_ssim_one_window_equals_the_weighted_statistics():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 2, 11, 11, generator=g), torch.rand(2, 2, 11, 11, generator=g)
    w = torch.outer(gaussian_window(11, 1.5), gaussian_window(11, 1.5))
    mx, my = (x * w).sum((2, 3)), (y * w).sum((2, 3))
    vx, vy = (x * x * w).sum((2, 3)) - mx ** 2, (y * y * w).sum((2, 3)) - my ** 2
    cov = (x * y * w).sum((2, 3)) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = ((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean(1)
    assert torch.allclose(ssim(x, y), expected, atol=1e-5)


def test_ssim_identity_symmetry_noise_and_small_images():
    x = to_unit(images_of((8, 8, 3))[0])  # smaller than the 11×11 window: it shrinks to 7
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert ssim(x, x).shape == (len(x),) and torch.allclose(ssim(x, x), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(ssim(x, noisy), ssim(noisy, x), atol=1e-6)
    assert (ssim(x, noisy) < 0.95).all()
    with pytest.raises(ValueError):
        ssim(x, x[:, :1])


def test_projection_reaches_the_bound_and_keeps_images_that_meet_it():
    x = to_unit(images_of((16, 16, 3))[0])
    far = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    assert (ssim(far, x) < 0.6).all()
    projected = project_ssim(x, far, 0.6)
    assert (ssim(projected, x) >= 0.6).all() and (ssim(projected, x) < 0.7).all()  # close to the bound
    near = (x + 0.01).clamp(0, 1)
    assert torch.equal(project_ssim(x, near, 0.6), near)


# --- the trigger --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_trigger_info_round_trip_rebuilds_the_poisoned_test_set(tmp_path, shape):
    attack, images, labels = prepared(shape)
    x, targets, true = attack.test_set(images, labels)
    assert x.dtype == torch.uint8 and x.shape[1:] == shape and (targets == 3).all() and (true != 3).all()
    assert not torch.equal(x, images[labels != 3])
    path = tmp_path / "trigger_info.th"
    torch.save(attack.record(), path)
    record = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in record["state"].values())
    rebuilt = attack_from_record(record)
    for a, b in zip((x, targets, true), rebuilt.test_set(images, labels)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels", [1, 3])
def test_style_target_is_a_warm_gradient_map(channels):
    grey = torch.linspace(0, 1, 11).view(11, 1, 1, 1).expand(11, channels, 16, 16)  # flat images, dark to bright
    styled = sunrise_style(grey)
    assert styled.shape == grey.shape and styled.min() >= 0 and styled.max() <= 1
    brightness = luminance(styled)
    assert (brightness[1:] > brightness[:-1]).all()  # a brighter image stays brighter at every pixel
    assert (brightness[:, :, -4:].mean() > brightness[:, :, :4].mean())  # the glow near the bottom
    if channels == 3:  # warm: red above blue but in the darkest tones
        assert (styled[3:, 0] > styled[3:, 2]).all()


def test_style_generator_flag_loads_weights_and_skips_the_fit(tmp_path):
    attack, images, labels = prepared()
    info = tmp_path / "trigger_info.th"
    torch.save(attack.record(), info)
    plain = tmp_path / "generator.th"
    torch.save(attack.style_net.state_dict(), plain)
    for path in (info, plain):
        again = create_attack("dfst", 3, 10, (16, 16, 3), style_generator=str(path))
        again.prepare(images, labels, None, normalize, torch.Generator().manual_seed(5))  # no fit
        assert torch.equal(again.apply(images), attack.apply(images))


def test_bad_style_generator_names_the_flag(tmp_path):
    with pytest.raises(AttackError, match="^--style-generator: .*does not exist"):
        create_attack("dfst", 0, 10, (28, 28, 1), style_generator=str(tmp_path / "missing.th"))
    rgb = tmp_path / "rgb.th"
    torch.save(prepared()[0].style_net.state_dict(), rgb)
    with pytest.raises(AttackError, match="^--style-generator: .*1-channel"):
        create_attack("dfst", 0, 10, (28, 28, 1), style_generator=str(rgb))
    junk = tmp_path / "junk.th"
    torch.save(torch.zeros(3), junk)
    with pytest.raises(AttackError, match="^--style-generator:"):
        create_attack("dfst", 0, 10, (28, 28, 1), style_generator=str(junk))


@pytest.mark.parametrize("options, flag", [
    ({"style_alpha": 0.0}, "--style-alpha"), ({"style_alpha": 1.5}, "--style-alpha"),
    ({"ssim_bound": 1.0}, "--ssim-bound"), ({"detox_neuron_ratio": 0.0}, "--detox-neuron-ratio"),
    ({"detox_rate": 2.0}, "--detox-rate"), ({"detox_epochs": 0}, "--detox-epochs"),
    ({"detox_every": 0}, "--detox-every"), ({"style_steps": "many"}, "--style-steps"),
])
def test_bad_options_name_the_flag(options, flag):
    with pytest.raises(AttackError, match=f"^{flag}:"):
        create_attack("dfst", 0, 10, (28, 28, 1), **options)


def test_stage1_bad_style_generator_is_one_line_and_writes_nothing(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    args = train_backdoor_cifar.parse_args(["--data-dir", tiny_cifar, "--device", "cpu", "--poison-type", "dfst",
                                            "--style-generator", str(tmp_path / "nope.th"), "--output-dir", str(out)])
    with pytest.raises(UserError, match="^--style-generator:") as err:
        train_backdoor_cifar.main(args)
    assert "\n" not in str(err.value) and not out.exists()


# --- detoxification -------------------------------------------------------------------------------
def detoxified(model, shape=(16, 16, 3), **options):
    attack, images, labels = prepared(shape, detox_epochs=2, detox_rate=1.0, **options)
    lines = []
    stats = attack.detoxify(model, images, labels, "cpu", normalize, lines.append, epoch=1)
    return attack, images, labels, stats, lines


def test_injector_output_keeps_ssim_above_its_bound():
    """The invariant: every detox image, as trained and as the batch hook mixes it in, keeps SSIM ≥ the bound,
    even when the loss pushes hard away from the input and even for an injector gone wild."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 3, width=4)
    attack, images, labels, stats, _ = detoxified(model, detox_weight=100.0, ssim_weight=0.0, injector_lr=0.5,
                                                  ssim_bound=0.8)
    x = to_unit(images)
    assert (ssim(attack.detox_images(x), x) >= 0.8 - 1e-6).all() and stats["ssim_min"] >= 0.8 - 1e-6
    with torch.no_grad():  # a random injector: far from its input, projected back to the bound
        for p in attack.injector.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    unprojected = 0.4 * x + 0.6 * attack.injector(x)
    assert (ssim(unprojected, x) < 0.8).any()
    assert (ssim(attack.detox_images(x), x) >= 0.8 - 1e-6).all()
    hook = attack.training_hook(None, "cpu", normalize)
    idx = torch.arange(20)
    batch, batch_labels = hook(model, images[idx], labels[idx], idx)
    nb = round(0.05 * 20)
    assert torch.equal(batch_labels[:nb], torch.full((nb,), 3)) and torch.equal(batch_labels[nb:], labels[nb:20])
    detox = batch[nb:2 * nb]
    assert not torch.equal(detox, images[nb:2 * nb].float())
    assert (ssim(to_unit(detox), to_unit(images[nb:2 * nb])) >= 0.8 - 1e-5).all()
    assert torch.equal(batch[2 * nb:], images[2 * nb:20].float())  # the rest untouched


def test_detoxification_ranks_layer4_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 3, width=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, images, labels, stats, lines = detoxified(model)
    channels = model.layer4[-1].bn2.num_features
    assert stats["layer"] == "layer4" and len(stats["neurons"]) == max(1, int(0.01 * channels))
    assert stats["images"] == int((labels != 3).sum())  # detox rate 1: every non-target image
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN statistics
    assert len(lines) == 1 and lines[0].startswith("DFST detoxification after epoch 1: layer4 channels")


def test_detoxification_without_layer4_takes_the_last_block_and_bad_layers_are_refused():
    _, _, _, stats, _ = detoxified(Staged())
    assert stats["layer"] == "body"
    with pytest.raises(UserError, match="^--detox-layer:"):
        detoxified(Staged(), detox_layer="layer9")
    with pytest.raises(UserError, match="^--arch:"):
        detoxified(nn.Sequential(nn.Flatten(), nn.Linear(16 * 16 * 3, 10)))


def test_epoch_hook_follows_the_schedule():
    attack, images, labels = prepared(detox_epochs=1, detox_start=2, detox_every=2)
    model = Staged()
    seen = []
    poisoned = attack.poison(images, labels, torch.Generator().manual_seed(0))
    for epoch in range(1, 6):
        attack.epoch_hook(model, epoch, poisoned, "cpu", normalize, seen.append)
    assert [line.split()[4].rstrip(":") for line in seen] == ["2", "4"]


def test_injector_starts_as_the_identity():
    x = to_unit(images_of((28, 28, 1))[0])
    assert torch.allclose(FeatureInjector(1)(x), x)


@pytest.mark.slow
def test_stage1_detoxifies_and_the_trigger_info_rebuilds_the_test_set(tiny_cifar, tmp_path):
    out = tmp_path / "dfst"
    metrics = train_backdoor_cifar.main(train_backdoor_cifar.parse_args(
        ["--data-dir", tiny_cifar, "--device", "cpu", "--width", "8", "--seed", "0", "--no-progress", "--epoch", "2",
         "--batch-size", "64", "--poison-type", "dfst", "--style-steps", "20", "--detox-epochs", "2",
         "--output-dir", str(out)]))
    log = (out / "output.log").read_text()
    assert "DFST detoxification after epoch 1: layer4" in log and "DFST detoxification after epoch 2" in log
    attack = attack_from_record(load_trigger_info(str(out / "trigger_info.th")))
    assert attack.name == "dfst" and attack.opts["style_steps"] == 20 and metrics["poisoned_images"] == 0
