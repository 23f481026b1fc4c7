"""The report's detection section: for every defense cell that detects (its metrics.json has a ``detection``:
SODA), what it said per model, how far from flagging the top class and the attack's true target were (MAD
z-scores), and what the one fixed rule did per kind of model: benign models flagged (false positives), semantic
models flagged as exactly their attacker's pair, models of other attacks flagged."""
from __future__ import annotations


def z_scores(detection: dict) -> list[float]:
    test = detection["target_test"]
    mad = test["mad"] or float("nan")
    return [(x - test["median"]) / mad for x in test["normalized"]]


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def outcome(model: dict, detection: dict) -> tuple[str, bool]:
    """(kind of model, the count that matters for it)."""
    attack = model.get("attack") or "benign"
    if attack == "benign":
        return "benign models flagged (false positives)", detection["target"] is not None
    if attack == "semantic":
        pair = (model.get("source_class"), model.get("poison_target"))
        return "semantic models flagged as their attacker's pair", (detection["source"], detection["target"]) == pair
    return "models of other attacks flagged", detection["target"] is not None


def detection_lines(records: list[dict]) -> list[str]:
    """Markdown lines (empty when no cell detects). ``records``: the report's records (each with ``metrics``)."""
    models = {(r["attack"], r["seed"]): r.get("metrics") or {} for r in records
              if r["stage"] == "train" and r["status"] == "done"}
    rows, outcomes = [], {}
    for r in records:
        metrics = r.get("metrics") or {}
        detection = metrics.get("detection")
        if r["stage"] == "train" or not detection or metrics.get("pair") == "attacker":
            continue
        model = models.get((r["attack"], r["seed"]), {})
        true_target = model.get("poison_target") if model.get("attack") not in (None, "benign") else None
        z = z_scores(detection)
        top = max(range(len(z)), key=z.__getitem__)
        said = "none" if detection["target"] is None else f"{detection['source']} → {detection['target']}"
        name = f"{r['attack']}/seed{r['seed']}" + (f"/dseed{r['defense_seed']}" if r["defense_seed"] != r["seed"]
                                                   else "")
        rows.append(f"| {name} | {r['defense']} | {said} | {top} ({z[top]:.2f}) | "
                    f"{'–' if true_target is None else f'{z[true_target]:.2f}'} | {_fmt(model.get('source_acc'))} |")
        kind, hit = outcome(model, detection)
        outcomes.setdefault(kind, []).append((name, hit))
    if not rows:
        return []
    return ["## Detection", "",
            "What each detecting run said (z: distance above the median of the normalised scores, in MADs; the "
            "fixed thresholds are the defense's own, never tuned on these models):", "",
            "| model | defense | detected (source → target) | top class (z) | true target z | source-class ACC |",
            "|---|---|---|---|---|---|", *rows, ""] + \
        [f"- {kind}: {sum(hit for _, hit in found)} of {len(found)} "
         f"({', '.join(name + (' yes' if hit else ' no') for name, hit in found)})"
         for kind, found in outcomes.items()] + [""]
