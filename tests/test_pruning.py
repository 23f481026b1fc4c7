import pytest
import torch

from defenses.anp import mask_values
from defenses.pruning import (MASK_HEADER, PRUNING_HEADER, format_mask_values, prune_sweep, prune_to_threshold,
                              read_mask_values, read_pruning_file, threshold_grid, write_mask_values,
                              write_pruning_file)
from models import create_model
from utils.errors import UserError


def _masked_model():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 3, 8, masked=True)
    with torch.no_grad():
        for _, layer in [(n, m) for n, m in model.named_modules() if hasattr(m, "neuron_mask")]:
            layer.neuron_mask.uniform_(0, 1)
    return model


def test_mask_file_original_layout_and_round_trip(tmp_path):
    values = mask_values(_masked_model())
    path = tmp_path / "mask_values.txt"
    write_mask_values(values, str(path))
    text = path.read_text()
    lines = text.split("\n")
    assert lines[0] + "\n" == MASK_HEADER == "No \t Layer Name \t Neuron Idx \t Mask Score \n"
    layer, idx, value = values[0]
    assert lines[1] == f"0 \t bn1 \t 0 \t {value:.4f} "
    assert lines[len(values)].startswith(f"{len(values) - 1} \t layer4.1.bn2 \t 63 \t ")
    back = read_mask_values(str(path))
    assert [(a, b) for a, b, _ in back] == [(a, b) for a, b, _ in values]
    assert all(abs(v - round(w, 4)) < 1e-9 for (_, _, v), (_, _, w) in zip(back, values))
    assert format_mask_values(back) == text


@pytest.mark.parametrize("content", ["", "header only\n", "h\n0 bn1 x 0.5\n", "h\n0 bn1 1\n", "h\n0 bn1 1 abc\n"])
def test_malformed_mask_file(tmp_path, content):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(UserError, match="--mask-file"):
        read_mask_values(str(path))


def test_pruning_zeroes_exactly_the_chosen_gammas():
    model = create_model("resnet18", 10, 3, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = [("bn1", 0, 0.1), ("layer1.0.bn2", 3, 0.05), ("layer2.0.shortcut.1", 1, 0.3), ("bn1", 5, 0.2)]
    assert prune_to_threshold(model, values, 0.2) == 3
    after = model.state_dict()
    zeroed = {("bn1.weight", 0), ("layer1.0.bn2.weight", 3), ("bn1.weight", 5)}
    for key, tensor in after.items():
        for i in range(tensor.numel() if tensor.dim() == 1 and key.endswith("weight") else 0):
            if (key, i) in zeroed:
                assert tensor[i] == 0
            else:
                assert tensor[i] == before[key][i]
        if not key.endswith("weight") or tensor.dim() != 1:
            assert torch.equal(tensor, before[key])  # biases, convs, running stats untouched


def test_sweep_is_cumulative_and_file_layout(tmp_path):
    model = create_model("resnet18", 10, 3, 8)
    values = [("bn1", i, v) for i, v in enumerate([0.0, 0.02, 0.3, 0.31, 0.9, 1.0, 0.07])]
    fake = {"clean_loss": 0.5, "clean_acc": 0.9, "poison_loss": 2.0, "asr": 0.1, "ra": 0.8}
    calls = []
    rows = prune_sweep(model, values, "threshold", 0.9, 0.05, lambda m: calls.append(1) or dict(fake))
    assert [r.value for r in rows] == threshold_grid(0.9, 0.05) and len(rows) == 19
    # A threshold that prunes nothing new is not evaluated again: its row repeats the previous metrics.
    assert len(calls) == len({r.pruned for r in rows}) < len(rows)
    assert all(a.metrics == b.metrics for a, b in zip(rows, rows[1:]) if a.pruned == b.pruned)
    assert rows[0].pruned == 1 and rows[1].pruned == 2 and rows[2].pruned == 3 and rows[-1].pruned == 6
    assert (model.bn1.weight[[0, 1, 2, 3, 4, 6]] == 0).all() and model.bn1.weight[5] != 0
    path = tmp_path / "pruning_by_threshold.txt"
    write_pruning_file(rows, "threshold", str(path))
    lines = path.read_text().splitlines()
    assert lines[0] == PRUNING_HEADER
    assert lines[1] == "1.00 \t bn1 \t 1 \t 0.0 \t 2.0000 \t 0.1000 \t 0.5000 \t 0.9000"
    assert "0.15000000000000002" in lines[4]
    assert len(read_pruning_file(str(path))) == 19


def test_sweep_by_number():
    model = create_model("resnet18", 10, 3, 8)
    values = [("bn1", i, i / 10) for i in range(8)]
    rows = prune_sweep(model, values, "number", 5, 2, lambda m: {"clean_loss": 0, "clean_acc": 0, "poison_loss": 0,
                                                                  "asr": 0, "ra": 0})
    assert [r.pruned for r in rows] == [2, 4, 6] and rows[-1].idx == 5
    assert (model.bn1.weight[:6] == 0).all() and (model.bn1.weight[6:8] != 0).all()


def _report(tmp_path, values, operating_point, max_acc_drop=0.05, defense=None):
    from defenses.pruning import prune_and_report

    torch.manual_seed(0)
    original = create_model("resnet18", 10, 3, 8).state_dict()

    def load():
        model = create_model("resnet18", 10, 3, 8)
        model.load_state_dict(original)
        return model

    def zeros(m):
        return int((m.bn1.weight == 0).sum())

    test = lambda m: {"clean_loss": 0.0, "clean_acc": 0.9, "poison_loss": 0.0, "asr": 1.0 - 0.1 * zeros(m), "ra": 0.0}
    defense = defense or (lambda m: 0.9 - 0.02 * zeros(m))
    logs = []
    result = prune_and_report(load, values, mode="threshold", pruning_max=0.9, pruning_step=0.05, save_threshold=0.2,
                              evaluate=test, output_dir=str(tmp_path), log=logs.append, defense_accuracy=defense,
                              operating_point=operating_point, max_acc_drop=max_acc_drop)
    pruned = torch.load(tmp_path / "pruned_model.th", weights_only=True)
    return result, int((pruned["bn1.weight"] == 0).sum()), logs


def test_operating_point_by_defense_accuracy(tmp_path):
    values = [("bn1", i, v) for i, v in enumerate([0.0, 0.12, 0.33, 0.41, 0.6, 0.95])]
    # Fixed: the papers' threshold 0.2 prunes the two neurons under it.
    fixed, zeroed, _ = _report(tmp_path, values, "fixed")
    assert fixed["operating_point"]["threshold"] == 0.2 and fixed["operating_point"]["neurons_pruned"] == 2 == zeroed
    assert fixed["before"]["defense_acc"] == pytest.approx(0.9) and "defense_acc" in fixed["rows"][0]
    # defense-acc with 0.05: 3 pruned keeps 0.84 >= 0.85? no -> stop at the last row with 2 pruned (threshold 0.3).
    rule, zeroed, _ = _report(tmp_path, values, "defense-acc")
    point = rule["operating_point"]
    assert (point["threshold"], point["neurons_pruned"], zeroed, point["rule"]) == (pytest.approx(0.3), 2, 2,
                                                                                   "defense-acc")
    # A looser budget goes further along the sweep: 0.1 allows 5 pruned (0.80), not 6 (0.78).
    loose, zeroed, _ = _report(tmp_path, values, "defense-acc", max_acc_drop=0.1)
    assert loose["operating_point"]["neurons_pruned"] == 5 == zeroed
    assert loose["operating_point"]["threshold"] == pytest.approx(0.9)


def test_operating_point_stops_at_the_first_drop_and_may_prune_nothing(tmp_path):
    values = [("bn1", i, v) for i, v in enumerate([0.0, 0.12, 0.33, 0.41])]
    # Accuracy dips when the third neuron goes and recovers later: the rule stops at the dip.
    dip = lambda m: {0: 0.9, 1: 0.9, 2: 0.89, 3: 0.7, 4: 0.9}[int((m.bn1.weight == 0).sum())]  # noqa: E731
    result, zeroed, _ = _report(tmp_path, values, "defense-acc", defense=dip)
    assert result["operating_point"]["neurons_pruned"] == 2 == zeroed
    # Even the first row loses too much: nothing is pruned, and the log says so.
    bad = lambda m: 0.9 if int((m.bn1.weight == 0).sum()) == 0 else 0.5  # noqa: E731
    result, zeroed, logs = _report(tmp_path, values, "defense-acc", defense=bad)
    assert result["operating_point"]["neurons_pruned"] == 0 == zeroed and result["operating_point"]["threshold"] is None
    assert result["operating_point"]["asr"] == result["before"]["asr"]
    assert any("warning" in line for line in logs)
