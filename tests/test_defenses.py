"""ANP mask optimisation on a real (narrow) ResNet-18 and a handful of images.

Step-level checks of ANP and RNP against the spec are in test_anp_steps.py and test_rnp_steps.py."""
import pytest
import torch

from data import BatchTransform
from defenses.anp import ANPConfig, optimize_masks
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
    seen, current = {}, {}
    original = anp.clip_to_unit  # the masks' clip after the mask step: the noise as the step used it

    def spy(masks):
        model = current["model"]
        seen["max_noise"] = max(float(m.neuron_noise.detach().abs().max()) for m in model.modules() if hasattr(m, "neuron_noise"))
        original(masks)
    monkeypatch.setattr(anp, "clip_to_unit", spy)
    images, labels, t = _data()
    for project, check in [(False, lambda v: v > 0.4 + 1e-6), (True, lambda v: v <= 0.4 + 1e-6)]:
        model = current["model"] = create_model("resnet18", 4, 3, 8, masked=True)
        optimize_masks(model, images, labels, t.augment, ANPConfig(nb_iter=1, batch_size=16, project_noise=project),
                       RUNTIME.autocast, None, torch.Generator().manual_seed(0), progress=False)
        assert check(seen["max_noise"])
