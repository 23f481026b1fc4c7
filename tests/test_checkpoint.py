import os

import pytest
import torch

from models import create_model
from utils.checkpoint import atomic_save, load_model_checkpoint, plain_state_dict
from utils.errors import UserError


def _model(masked=False, width=8, classes=10):
    return create_model("resnet18", classes, 3, width, masked=masked)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "nested", "module", "rnp_tar"])
def test_checkpoint_wrappers_load(tmp_path, wrap):
    torch.manual_seed(1)
    source = _model()
    sd = source.state_dict()
    obj = {"bare": sd, "state_dict": {"state_dict": sd},
           "nested": {"state_dict": {"state_dict": sd}},
           "module": {"module." + k: v for k, v in sd.items()},
           "rnp_tar": {"epoch": 3, "state_dict": sd, "clean_acc": 0.5, "bad_acc": 0.1}}[wrap]
    path = tmp_path / "ckpt.tar"
    torch.save(obj, path)
    target = _model(masked=True)
    load_model_checkpoint(target, str(path), "resnet18")
    for k, v in sd.items():
        assert torch.equal(target.state_dict()[k], v)
    assert (target.bn1.neuron_mask == 1).all() and (target.bn1.neuron_noise == 0).all()


@pytest.mark.parametrize("other,names", [(dict(width=16), ["conv1.weight (8, 3, 3, 3) vs (16, 3, 3, 3)"]),
                                         (dict(classes=5), ["linear.weight (10, 64) vs (5, 64)"])])
def test_mismatch_is_one_line_user_error_naming_the_keys(tmp_path, other, names):
    path = tmp_path / "m.th"
    torch.save(_model().state_dict(), path)
    with pytest.raises(UserError) as err:
        load_model_checkpoint(_model(**other), str(path), "--arch resnet18 --width X")
    message = str(err.value)
    assert "\n" not in message and message.startswith("--checkpoint:") and "shape mismatch" in message
    assert all(name in message for name in names), message


def test_wrong_arch_and_missing_and_garbage(tmp_path):
    path = tmp_path / "m.th"
    torch.save(_model().state_dict(), path)
    with pytest.raises(UserError) as err:
        load_model_checkpoint(create_model("vgg19_bn", 10, 3, 8), str(path), "vgg19_bn")
    message = str(err.value)  # a few of the keys on each side, by name
    assert "missing features.0.weight" in message and "unexpected conv1.weight" in message, message
    with pytest.raises(UserError, match="does not exist"):
        load_model_checkpoint(_model(), str(tmp_path / "none.th"), "resnet18")
    (tmp_path / "junk.th").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_model_checkpoint(_model(), str(tmp_path / "junk.th"), "resnet18")


def test_last_model_and_model_last_stand_for_each_other(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "model_last.th")
    load_model_checkpoint(_model(), str(tmp_path / "last_model.th"), "resnet18")


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("interrupted")
    path = tmp_path / "out.th"
    atomic_save({"a": torch.ones(2)}, str(path))
    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, str(path))
    assert torch.load(path, weights_only=True)["a"].sum() == 2  # old file intact
    assert os.listdir(tmp_path) == ["out.th"]  # no temporary file left


def test_plain_state_dict_drops_mask_parameters():
    keys = plain_state_dict(_model(masked=True)).keys()
    assert not any("neuron_" in k for k in keys) and set(keys) == set(_model().state_dict())
