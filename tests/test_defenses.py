"""ANP mask optimisation and RNP's unlearning / recovery on a handful of images."""
import pytest
import torch

from data import BatchTransform
from defenses.anp import ANPConfig, optimize_masks
from defenses.rnp import RNPConfig, recover_masks, unlearn
from models import create_model, is_mask_parameter, mask_parameters
from utils.device import make_runtime

RUNTIME = make_runtime("cpu")


def _data(n=32):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,))
    return images, labels, BatchTransform((0.5,) * 3, (0.25,) * 3, True, "cpu")


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("bn_mode,project", [("train", False), ("eval", True)])
def test_anp_changes_only_masks_and_keeps_them_in_range(bn_mode, project):
    images, labels, t = _data()
    model = create_model("resnet18", 4, 3, 8, masked=True)
    before = _params(model)
    config = ANPConfig(nb_iter=5, batch_size=16, print_every=2, bn_mode=bn_mode, project_noise=project)
    reports = []
    optimize_masks(model, images, labels, t.augment, config, RUNTIME.autocast, lambda i, s: reports.append(i),
                   torch.Generator().manual_seed(0), progress=False)
    assert reports == [2, 4, 5]
    masks = torch.cat([p.detach() for p in mask_parameters(model)])
    assert masks.min() >= 0 and masks.max() <= 1 and (masks < 1).any()
    for k, v in model.named_parameters():
        if not is_mask_parameter(k):
            assert torch.equal(v, before[k]), k
        elif k.endswith("neuron_noise"):
            assert (v == 0).all()  # perturbation is reset when done


def test_anp_perturbation_is_not_projected_by_default(monkeypatch):
    """The original lets eps·sign(grad) take the noise up to 2·eps; --project-noise clips it."""
    import defenses.anp as anp
    seen = {}
    original = anp.clip_masks

    def spy(model):
        seen["max_noise"] = max(float(m.neuron_noise.detach().abs().max()) for m in model.modules() if hasattr(m, "neuron_noise"))
        original(model)
    monkeypatch.setattr(anp, "clip_masks", spy)
    images, labels, t = _data()
    for project, check in [(False, lambda v: v > 0.4 + 1e-6), (True, lambda v: v <= 0.4 + 1e-6)]:
        model = create_model("resnet18", 4, 3, 8, masked=True)
        optimize_masks(model, images, labels, t.augment, ANPConfig(nb_iter=1, batch_size=16, project_noise=project),
                       RUNTIME.autocast, None, torch.Generator().manual_seed(0), progress=False)
        assert check(seen["max_noise"])


def test_unlearning_stop_rule_epoch_and_batch():
    images, labels, t = _data()
    # A threshold of 1.0 is always met: stop after the first epoch (or the first batch).
    model = create_model("resnet18", 4, 3, 8)
    epochs = []
    result = unlearn(model, images, labels, t.augment, RNPConfig(batch_size=8, clean_threshold=1.0,
                     unlearning_epochs=5), RUNTIME.autocast, lambda e, lr, s: epochs.append(e), progress=False)
    assert result.stopped and result.epochs_run == 1 and epochs == [1]
    result = unlearn(create_model("resnet18", 4, 3, 8), images, labels, t.augment,
                     RNPConfig(batch_size=8, clean_threshold=1.0, unlearning_epochs=5, stop_check="batch"),
                     RUNTIME.autocast, progress=False)
    assert result.stopped and result.epochs_run == 1
    # A threshold below 0 is never met: run every epoch, report not stopped.
    result = unlearn(create_model("resnet18", 4, 3, 8), images, labels, t.augment,
                     RNPConfig(batch_size=8, clean_threshold=-1.0, unlearning_epochs=3), RUNTIME.autocast,
                     progress=False)
    assert not result.stopped and result.epochs_run == 3


def test_unlearning_raises_the_clean_loss():
    images, labels, t = _data(64)
    model = create_model("resnet18", 4, 3, 8)
    losses = []
    unlearn(model, images, labels, t.augment, RNPConfig(batch_size=16, clean_threshold=-1, unlearning_epochs=4,
            unlearning_lr=0.05), RUNTIME.autocast, lambda e, lr, s: losses.append(s["train_loss"]), progress=False)
    assert losses[-1] > losses[0]


def test_recovery_changes_only_masks_in_range():
    images, labels, t = _data()
    model = create_model("resnet18", 4, 3, 8, masked=True)
    before = _params(model)
    recover_masks(model, images, labels, t.augment, RNPConfig(batch_size=16, recovering_epochs=3),
                  RUNTIME.autocast, progress=False)
    masks = torch.cat([p.detach() for p in mask_parameters(model)])
    assert masks.min() >= 0 and masks.max() <= 1 and (masks < 1).any()
    for k, v in model.named_parameters():
        if not k.endswith("neuron_mask"):
            assert torch.equal(v, before[k]), k
