"""The one training loop (``utils.training.run_batches``) and its parts, and the errors that name an option.

The loops of ANP, RNP, SODA and stage 1 are checked against replays in their own tests (test_anp_steps,
test_rnp_steps, test_soda, test_gpu_speed) and end to end by test_golden; here the helper's own contract.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from data.attacks import AttackError
from defenses.pruning import read_mask_values
from models import create_model, mask_parameters, noise_parameters, train_only
from utils.checkpoint import argument_error
from utils.device import pick_device
from utils.errors import OptionError, UserError
from utils.training import DeviceTotals, augmented, descent_step, epoch_order, run_batches, sampled_order


@pytest.mark.parametrize("chunk", [500, 3])
def test_sampled_order_draws_in_chunks_what_one_draw_per_batch_gives(chunk):
    got = [b.tolist() for b in sampled_order(20, 4, 7, "cpu", torch.Generator().manual_seed(2), chunk=chunk)]
    generator = torch.Generator().manual_seed(2)
    assert got == [torch.randint(0, 20, (4,), generator=generator).tolist() for _ in range(7)]


def test_sampled_order_without_a_generator_draws_from_the_global_rng_when_asked():
    """Lazily: a global draw between two batches (ANP's perturbation) comes between them, as in a plain loop."""
    torch.manual_seed(0)
    got = []
    for idx in sampled_order(20, 4, 3, "cpu"):
        got.append((idx.tolist(), torch.rand(()).item()))
    torch.manual_seed(0)
    assert got == [(torch.randint(0, 20, (4,)).tolist(), torch.rand(()).item()) for _ in range(3)]


def test_device_totals_mean_over_samples_or_batches():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    for mean_over, expected_loss in (("samples", (2.0 * 2 + 5.0 * 1) / 3), ("batches", (2.0 + 5.0) / 2)):
        totals = DeviceTotals("cpu", torch.float64, mean_over=mean_over)
        totals.add(torch.tensor(2.0), logits[:2], torch.tensor([0, 0]))
        totals.add(torch.tensor(5.0), logits[2:], torch.tensor([0]))
        loss, accuracy = totals.means()
        assert loss == pytest.approx(expected_loss) and accuracy == pytest.approx(2 / 3)
    assert DeviceTotals("cpu").means() == (0.0, 0.0)
    with pytest.raises(ValueError, match="mean_over"):
        DeviceTotals("cpu", mean_over="images")


def test_run_batches_counts_what_the_step_returns_and_stops_when_asked():
    images = torch.arange(10).view(10, 1)
    labels = torch.zeros(10, dtype=torch.long)
    seen = []

    def step(x, y):
        seen.append(x.flatten().tolist())
        if len(seen) == 2:
            return None  # this batch does not count
        return torch.tensor(1.0), torch.tensor([[1.0, 0.0]]).repeat(len(y), 1)

    order = epoch_order(10, 3, "cpu", torch.Generator().manual_seed(0))
    totals = run_batches(order, augmented(images, labels, lambda x: x * 10), step, DeviceTotals("cpu"), batch_size=3,
                         until=lambda: len(seen) == 3)
    assert seen == [(b * 10).tolist() for b in order[:3]]  # gathered, augmented; stopped after the third
    assert totals.seen == 6 and totals.batches == 2 and totals.means() == (1.0, 1.0)


def test_descent_step_runs_the_forward_under_autocast_then_steps_and_calls_after_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    entered, after = [], []

    class Recording:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    step = descent_step(model, torch.optim.SGD(model.parameters(), lr=0.1), Recording,
                        after_step=lambda: after.append(True))
    loss, logits = step(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    assert entered == [True] and after == [True] and logits.shape == (4, 2) and loss.dim() == 0
    assert not torch.equal(model.weight, before)


def test_train_only_leaves_gradients_to_the_given_parameters():
    model = create_model("resnet18", 3, 3, 2, masked=True)
    keep = mask_parameters(model) + noise_parameters(model)
    train_only(model, keep)
    ids = {id(p) for p in keep}
    assert all(p.requires_grad == (id(p) in ids) for p in model.parameters())
    train_only(model, mask_parameters(model))
    assert sum(p.requires_grad for p in model.parameters()) == len(mask_parameters(model))


def test_library_errors_name_the_option_by_its_canonical_flag():
    with pytest.raises(OptionError) as err:
        pick_device("tpu")
    assert err.value.option == "device" and str(err.value).startswith("--device: expected auto")
    assert err.value.naming("runtime.device").startswith("runtime.device: expected auto")


def test_a_file_argument_is_an_option_name_or_kept_as_written(tmp_path):
    named = argument_error("mask_file", "gone")
    assert isinstance(named, OptionError) and str(named) == "--mask-file: gone"
    for label in ("--backdoor_model_path", "MODEL", "--option remove"):
        error = argument_error(label, "gone")
        assert not isinstance(error, OptionError) and isinstance(error, UserError) and str(error) == f"{label}: gone"
    with pytest.raises(OptionError, match="^--mask-file: mask file .* does not exist"):
        read_mask_values(str(tmp_path / "none.txt"))


def test_attack_errors_are_option_errors_and_take_a_flag_as_its_option():
    for given in ("poison_rate", "--poison-rate"):
        error = AttackError(given, "too high")
        assert isinstance(error, OptionError) and isinstance(error, ValueError)
        assert error.option == "poison_rate" and error.flag == "--poison-rate"
        assert str(error) == "--poison-rate: too high"
