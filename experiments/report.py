"""Aggregate a grid's cells: ``results.csv`` (one row per cell), ``table.md`` (mean ± std, n, min–max per
attack × defense × rule, the papers' numbers beside ours), plots.

Only what the cells wrote is read. The oracle row (the sweep row with the lowest poisoned-test ASR
among those keeping clean test ACC within a stated limit, BackdoorBench's choice) is computed here, for
comparison with published toolkit numbers only, and labelled so: no cell and no operating point ever
sees it.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict

from defenses.registry import get_defense
from utils.checkpoint import atomic_write_text
from utils.plots import pyplot, save_figure

from .cells import Cell, read_metrics
from .config import GridConfig
from .detection_report import detection_lines

CSV_COLUMNS = ("cell", "stage", "attack", "poison_type", "seed", "defense", "defense_seed", "rule", "status",
               "acc_before", "asr_before", "ra_before", "acc", "asr", "ra", "source_acc", "threshold",
               "neurons_pruned", "seconds", "code_version", "directory")
ORACLE = "oracle"
TABLE_HEADER = ["| defense | operating rule | n | ACC | ASR | RA | ACC min–max | ASR min–max | removed | pruned | "
                "time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]


def oracle_point(metrics: dict, max_acc_drop: float) -> dict:
    """The sweep row with the lowest poisoned-test ASR among those whose clean test ACC stays within
    ``max_acc_drop`` of the unpruned model's (ties: the fewest neurons pruned); the unpruned model when no row
    does. Reads the poisoned test set: a reporting device, never an operating point."""
    before = metrics["before"]
    best = {**{k: before[k] for k in ("clean_acc", "asr", "ra") if k in before}, "threshold": None,
            "neurons_pruned": 0}
    for row in metrics.get("rows", []):
        if row["clean_acc"] >= before["clean_acc"] - max_acc_drop and row["asr"] < best["asr"]:
            best = {"clean_acc": row["clean_acc"], "asr": row["asr"], "ra": row["ra"], "threshold": row["value"],
                    "neurons_pruned": row["pruned"]}
    return best


def _seconds(metrics: dict) -> float | None:
    timings = metrics.get("timings") or {}
    if "total_seconds" in timings:
        return timings["total_seconds"]
    values = [v for v in timings.values() if isinstance(v, (int, float))]
    return sum(values) if values else None


def collect(config: GridConfig, cells: list[Cell]) -> list[dict]:
    """One record per planned cell (``status`` missing when it has no readable metrics.json), plus one
    oracle record per pruning-defense run."""
    kinds = {a.label: a.kind for a in config.attacks}
    defense_kinds = {d.label: d.kind for d in config.defenses}
    records, sweeps_seen = [], set()
    for cell in cells:
        metrics = read_metrics(cell)
        record = {"cell": cell.id, "stage": cell.stage, "attack": cell.attack, "poison_type": kinds[cell.attack],
                  "seed": cell.seed, "defense": cell.defense, "defense_kind": defense_kinds.get(cell.defense),
                  "defense_seed": cell.defense_seed, "rule": cell.rule, "directory": cell.directory,
                  "status": "done" if metrics is not None else "missing", "metrics": metrics}
        records.append(record)
        if metrics is None:
            continue
        record["seconds"] = _seconds(metrics)
        record["code_version"] = metrics.get("code_version")
        if cell.stage == "train":
            record.update(acc=metrics["clean_acc"], asr=metrics["asr"], ra=metrics["ra"],
                          source_acc=metrics.get("source_acc"))
        else:
            before = metrics.get("before") or {}
            after = metrics.get("operating_point") or metrics.get("after") or before
            record.update(acc_before=before.get("clean_acc"), asr_before=before.get("asr"), ra_before=before.get("ra"),
                          acc=after.get("clean_acc"), asr=after.get("asr"), ra=after.get("ra"),
                          source_acc=after.get("source_acc"), threshold=after.get("threshold"),
                          neurons_pruned=after.get("neurons_pruned"))
            run = (cell.attack, cell.seed, cell.defense, cell.defense_seed)
            if get_defense(cell.kind).prunes and metrics.get("rows") and run not in sweeps_seen:
                sweeps_seen.add(run)  # every rule of a run prunes along the same sweep: one oracle per run
                point = oracle_point(metrics, config.oracle_max_acc_drop)
                records.append({**{k: record[k] for k in ("attack", "poison_type", "seed", "defense", "defense_kind",
                                                           "defense_seed", "acc_before", "asr_before", "ra_before",
                                                           "directory", "code_version")},
                                "cell": f"{cell.attack}/seed{cell.seed}/{cell.defense}/dseed{cell.defense_seed}/"
                                        f"{ORACLE}", "stage": ORACLE, "rule": ORACLE, "status": "done",
                                "acc": point["clean_acc"], "asr": point["asr"], "ra": point["ra"],
                                "threshold": point["threshold"], "neurons_pruned": point["neurons_pruned"],
                                "metrics": None})
    return records


def write_csv(records: list[dict], path: str) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in CSV_COLUMNS})
    atomic_write_text(buffer.getvalue(), path)


def summarize(values: list[float]) -> dict:
    """mean, sample std (0 for one value), n, min, max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "min": min(values), "max": max(values)}


def _pct(stats: dict | None) -> str:
    return "–" if stats is None else f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _range(stats: dict | None) -> str:
    return "–" if stats is None else f"{100 * stats['min']:.1f}–{100 * stats['max']:.1f}"


def _stats(records: list[dict], key: str) -> dict | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return summarize(values) if values else None


def group_rows(config: GridConfig, records: list[dict]) -> dict:
    """``{attack: [(defense label, rule label, [records])]}`` in config order, the backdoored models first and
    the oracle rows last."""
    done = [r for r in records if r["status"] == "done"]
    groups = {}
    for attack in config.attacks:
        mine = [r for r in done if r["attack"] == attack.label]
        rows = [("no defense", "backdoored model", [r for r in mine if r["stage"] == "train"])]
        for defense in config.defenses:
            rules = [rule.label for rule in config.rules] if get_defense(defense.kind).prunes else [None]
            for rule in rules:
                rows.append((defense.label, rule, [r for r in mine if r["defense"] == defense.label and
                                                   r["stage"] not in (ORACLE, "masks") and
                                                   (r["rule"] == rule or rule is None) and r.get("acc") is not None]))
        for defense in config.defenses:
            if get_defense(defense.kind).prunes:
                rows.append((defense.label, ORACLE, [r for r in mine if r["defense"] == defense.label and
                                                     r["stage"] == ORACLE]))
        groups[attack.label] = rows
    return groups


def _removed(config: GridConfig, records: list[dict], before_acc: dict) -> str:
    """How many runs removed the backdoor ("k/n"); "–" for models without one (benign: no ASR to judge)."""
    records = [r for r in records if r.get("asr") is not None]
    if not records:
        return "–"
    ok = 0
    for r in records:
        reference = r.get("acc_before") if r.get("acc_before") is not None else before_acc.get(r["seed"])
        if reference is not None and r["asr"] <= config.removed_asr and r["acc"] >= reference - config.removed_acc_drop:
            ok += 1
    return f"{ok}/{len(records)}"


def _stage_seconds(records: list[dict], defense: str | None, all_records: list[dict], kinds: dict) -> str:
    """Mean seconds per stage of this row's runs: training, or the defense's stages (the registry's ``timings``;
    its masks cell's, and each rule's own pruning)."""
    def mean_of(rs, keys):
        values = []
        for r in rs:
            timings = (r.get("metrics") or {}).get("timings") or {}
            picked = [timings[k] for k in keys if isinstance(timings.get(k), (int, float))]
            if picked:
                values.append(sum(picked))
        return sum(values) / len(values) if values else None

    if defense is None:
        value = mean_of(records, ("total_seconds",))
        return "–" if value is None else f"train {value:.0f}"
    runs = {(r["seed"], r["defense_seed"]) for r in records}
    firsts = [r for r in all_records if r["defense"] == defense and r["status"] == "done" and
              (r["seed"], r["defense_seed"]) in runs and r["stage"] in ("masks", "defense")]
    parts = []
    for name, keys in get_defense(kinds[defense]).timings.items():
        value = mean_of(records if name == "prune" else firsts, keys)
        if value is not None:
            parts.append(f"{name} {value:.0f}")
    return " + ".join(parts) or "–"


def load_published(path: str | None) -> list[dict]:
    if not path:
        return []
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return list(data.get("entries") or [])


def _published_attack(attack) -> str:
    if attack.options.get("target_type") == "all2all":
        return f"{attack.kind}-all2all"
    return attack.kind


def _published_triple(m: dict | None) -> str:
    return " / ".join(f"{m[k]:g}" for k in ("acc", "asr", "ra") if k in (m or {})) or "–"


def table_markdown(config: GridConfig, records: list[dict], published: list[dict], groups: dict) -> str:
    """``groups``: :func:`group_rows` of ``records``."""
    references: dict = {}
    total = sum(1 for r in records if r["stage"] != ORACLE)
    missing = sum(1 for r in records if r["status"] == "missing")
    c = config.common
    lines = [f"# {config.name}", "",
             f"{c['dataset']}, {c['arch']} width {c['width']}, model seeds {config.seeds}, defense seeds "
             f"{config.defense_seeds if config.defense_seeds is not None else 'the model seed'}; config "
             f"`{config.path}`. {total - missing} of {total} cells done.", "",
             "ACC (clean test), ASR (poisoned test), RA (poisoned test images given their true class), in %: "
             "mean ± sample std over the runs (n), min–max. *removed*: runs with ASR ≤ "
             f"{100 * config.removed_asr:.0f} % and ACC within {100 * config.removed_acc_drop:.0f} points of the "
             "model before the defense. Time: mean seconds per stage.", ""]
    oracles = {d.label for d in config.defenses if get_defense(d.kind).oracle(d.config)}
    rule_text = {r.label: (f"fixed {r.options['save_threshold']:g}" if r.kind == "fixed" else
                           f"clean-data (defense-acc, drop ≤ {r.options['max_acc_drop']:g})") for r in config.rules}
    for attack in config.attacks:
        rows = groups[attack.label]
        models = rows[0][2]
        before_acc = {r["seed"]: r["acc"] for r in models}
        lines += [f"## {attack.label}" + (f" ({attack.kind})" if attack.kind != attack.label else ""), ""] + \
            TABLE_HEADER
        oracle_lines = []
        for defense, rule, rs in rows:
            n = len(rs)
            pruned = _stats(rs, "neurons_pruned")
            cells = [defense, "oracle: lowest test ASR, test ACC drop ≤ "
                     f"{config.oracle_max_acc_drop:g} (poisoned test set; not a defense)" if rule == ORACLE else
                     rule_text.get(rule, rule or ("oracle: the attacker's own pair, from the trigger info (not a "
                                                  "defense)" if defense in oracles else "its own")),
                     str(n), _pct(_stats(rs, "acc")),
                     _pct(_stats(rs, "asr")), _pct(_stats(rs, "ra")), _range(_stats(rs, "acc")),
                     _range(_stats(rs, "asr")), "–" if defense == "no defense" or not n else
                     _removed(config, rs, before_acc), "–" if pruned is None else f"{pruned['mean']:.0f}",
                     "–" if rule == ORACLE else
                     _stage_seconds(rs, None if defense == "no defense" else defense, records,
                                   {d.label: d.kind for d in config.defenses})]
            (oracle_lines if rule == ORACLE else lines).append("| " + " | ".join(cells) + " |")
        if oracle_lines:
            lines += ["", "Oracle rows (threshold chosen on the poisoned test set, as BackdoorBench does; for "
                          "comparison with published toolkit numbers only, never an operating point):", ""] + \
                TABLE_HEADER + oracle_lines
        kinds = {d.kind for d in config.defenses}
        theirs = [p for p in published if p.get("attack") == _published_attack(attack) and p.get("defense") in kinds]
        if theirs:
            lines += ["", "Published (ACC / ASR (/ RA) in %; setting and source under *References*):", "",
                      "| defense | rule | dataset, model | before | after | ref |", "|---|---|---|---|---|---|"]
            for p in theirs:
                rule = p.get("rule", "")
                if p.get("threshold") is not None:
                    rule += f" {p['threshold']:g}"
                key = (p.get("source", "").rstrip("."), p.get("setting", "").rstrip("."))
                ref = references.setdefault(key, len(references) + 1)
                lines.append(f"| {p['defense']} | {rule} | {p.get('dataset', '')}, {p.get('arch', '')} | "
                             f"{_published_triple(p.get('before'))} | {_published_triple(p.get('after'))} | [{ref}] |")
        lines.append("")
    lines += detection_lines(records)
    if references:
        lines += ["## References", ""] + [f"[{n}] {source}. Setting: {setting}." for (source, setting), n in
                                          references.items()] + [""]
    return "\n".join(lines)


def plot_attack(config: GridConfig, attack: str, rows, path: str) -> None:
    """ACC, ASR and RA after each defense and rule (error bars: sample std; dots: the runs)."""
    plt = pyplot()
    rows = [(d, r, rs) for d, r, rs in rows if rs]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4))
    width = 0.27
    for k, (key, label) in enumerate((("acc", "ACC"), ("asr", "ASR"), ("ra", "RA"))):
        xs, means, stds, hatches = [], [], [], []
        for i, (_, rule, rs) in enumerate(rows):
            values = [r[key] for r in rs if r.get(key) is not None]
            if not values:
                continue
            s = summarize(values)
            xs.append(i + (k - 1) * width)
            means.append(s["mean"])
            stds.append(s["std"])
            hatches.append("//" if rule == ORACLE else "")
            ax.plot([i + (k - 1) * width] * len(values), values, ".", color="k", ms=3, alpha=0.6)
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, alpha=0.8, color=f"C{k}")
        for bar, hatch in zip(bars, hatches):  # the oracle rows: hatched, they are not a defense
            bar.set_hatch(hatch)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([d if d == "no defense" else f"{d}\n{r}" + (" (test set)" if r == ORACLE else "")
                        for d, r, _ in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title(f"{config.name}: {attack} (n per bar: {', '.join(str(len(rs)) for _, _, rs in rows)})")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_sweeps(attack: str, defense: str, records: list[dict], path: str) -> None:
    """The pruning curves of every run of one defense on one attack, overlaid."""
    runs = {}
    for r in records:
        metrics = r.get("metrics") or {}
        key = (r["seed"], r["defense_seed"])
        if r["attack"] == attack and r["defense"] == defense and metrics.get("rows") and key not in runs:
            runs[key] = metrics["rows"]
    if not runs:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, ((seed, dseed), rows) in enumerate(sorted(runs.items())):
        xs = [row["value"] for row in rows]
        ax.plot(xs, [row["clean_acc"] for row in rows], "-", color="C0", alpha=0.6, lw=1,
                label="ACC (clean test)" if i == 0 else None)
        ax.plot(xs, [row["asr"] for row in rows], "-", color="C1", alpha=0.6, lw=1,
                label="ASR (poisoned test)" if i == 0 else None)
    ax.set_xlabel("pruning threshold (mask value)")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{defense} on {attack}: {len(runs)} runs")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(config: GridConfig, cells: list[Cell]) -> str:
    """results.csv, table.md and plots/ in the grid's output_dir; returns the table's text."""
    os.makedirs(os.path.join(config.output_dir, "plots"), exist_ok=True)
    records = collect(config, cells)
    write_csv(records, os.path.join(config.output_dir, "results.csv"))
    groups = group_rows(config, records)
    text = table_markdown(config, records, load_published(config.published), groups)
    atomic_write_text(text + "\n", os.path.join(config.output_dir, "table.md"))
    by_attack = defaultdict(list)
    for r in records:
        by_attack[r["attack"]].append(r)
    for attack, rows in groups.items():
        plot_attack(config, attack, rows, os.path.join(config.output_dir, "plots", f"{attack}.png"))
        for defense in config.defenses:
            if get_defense(defense.kind).prunes:
                plot_sweeps(attack, defense.label, by_attack[attack],
                            os.path.join(config.output_dir, "plots", f"pruning_{attack}_{defense.label}.png"))
    return text
