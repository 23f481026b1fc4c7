"""scripts/attack_table.py reads both operating points off one sweep, with the clean-data rule's choice."""
import json

from scripts import attack_table


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_table_rows(tmp_path, capsys):
    run = tmp_path / "sig"
    write(run / "backdoor" / "metrics.json", {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0,
                                              "timings": {"train_seconds": 10, "prepare_seconds": 0}})
    rows = [{"value": t, "pruned": n, "clean_acc": a, "asr": s, "ra": 0.5, "defense_acc": d}
            for t, n, a, s, d in [(0.0, 1, 0.9, 1.0, 0.90), (0.1, 5, 0.88, 0.5, 0.87), (0.2, 9, 0.8, 0.1, 0.80)]]
    write(run / "anp" / "metrics.json", {"before": {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0, "defense_acc": 0.9},
                                         "rows": rows})
    attack_table.main([str(tmp_path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("| sig | 0.900 / 1.000 / 0.000 | 10 s |")
    assert "0.800 / 0.100 / 0.500 (9)" in line  # fixed 0.2
    assert "0.1: 0.880 / 0.500 / 0.500 (5)" in line  # last row within 0.05 of the defense accuracy
    assert line.endswith("| not run | not run |")  # no RNP run
