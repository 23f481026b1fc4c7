"""Introduce each known regression by hand, run the tests that should catch it, report which did.

Every mutation is one exact text replacement in one source file. For each: check that the original
text is still there (otherwise the mutation is reported *stale*: the code moved, update the list),
apply it, run pytest on the named tests, restore the file (also on Ctrl-C), and record the failing
tests. A mutation that no test catches is a hole in the suite. Not part of CI (it runs the suite
once per mutation); run it after refactoring the algorithms:

    python scripts/check_mutations.py            # all; over an hour on 2 cores (each grid mutation reruns
                                                 # tests/test_reproduce.py, about 6 minutes)
    python scripts/check_mutations.py anp-descent   # one by name
    python scripts/check_mutations.py --stale-only   # only check that every mutation still applies (no tests)
    python scripts/check_mutations.py --baseline     # first run the tests unmutated (tests failing then: deselected)
    python scripts/check_mutations.py --fail-fast    # stop each mutation's tests at the first failure (pytest -x):
                                                     # all in about 11 minutes on 2 cores, 18 with --baseline

A mutation is also reported stale when one of its tests no longer exists (file, or ``::function`` in it):
pytest would exit with "not found", which must not count as caught. A pytest run that ends in an error
other than failing tests (collection error, usage error) is reported as "error", not "caught".
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


STEPS_ANP = ("tests/test_anp_steps.py",)
STEPS_RNP = ("tests/test_rnp_steps.py",)
RNP_E2E = ("tests/test_scripts.py::test_rnp_one_command",
           "tests/test_scripts.py::test_rnp_resume_from_an_unlearned_model_recovers_on_that_model",
           "tests/test_scripts.py::test_rnp_resume_from_a_mask_file_prunes_by_that_file")
GOLDEN = ("tests/test_golden.py",)
INCREMENTAL = ("tests/test_incremental.py",)
SODA = ("tests/test_soda.py",)
GRID = ("tests/test_reproduce.py",)
REGISTRY_ORIGINAL = "tests/test_registry.py::test_original_command_lines_parse_to_the_same_config"
OUTCOME = ("tests/test_scripts.py::test_anp_saved_operating_point", "tests/test_scripts.py::test_rnp_one_command")

MUTATIONS = [
    Mutation("anp-weights-swapped", "ANP: natural and robust loss weights swapped", "defenses/anp.py",
             "loss = config.anp_alpha * loss_nat + (1 - config.anp_alpha) * loss_rob",
             "loss = (1 - config.anp_alpha) * loss_nat + config.anp_alpha * loss_rob", STEPS_ANP),
    Mutation("anp-descent", "ANP: descent step on the perturbation instead of ascent", "defenses/anp.py",
             "loss_noise = -F.cross_entropy(model(x), y)", "loss_noise = F.cross_entropy(model(x), y)", STEPS_ANP),
    Mutation("anp-raw-gradient", "ANP: raw gradient instead of its sign", "defenses/anp.py",
             "        torch._foreach_sign_([p.grad for p in noise_params])\n", "", STEPS_ANP),
    Mutation("anp-robust-unperturbed", "ANP: robust loss computed without the perturbation", "defenses/anp.py",
             "            set_perturbation(model, True)\n            loss_rob",
             "            set_perturbation(model, False)\n            loss_rob", STEPS_ANP),
    Mutation("anp-noise-bias-not-optimised", "ANP: neuron_noise_bias never moving (not optimised)",
             "models/masked_batchnorm.py", "for p in (m.neuron_noise, m.neuron_noise_bias)]",
             "for p in (m.neuron_noise,)]", STEPS_ANP),
    Mutation("anp-noise-bias-not-used", "ANP: neuron_noise_bias never moving (not in the forward)",
             "models/masked_batchnorm.py", "self.bias * (1.0 + self.neuron_noise_bias)", "self.bias",
             STEPS_ANP),
    Mutation("anp-bn-mode-ignored", "ANP: --bn-mode has no effect (step always in train mode)", "defenses/anp.py",
             "    model.train(config.bn_mode == \"train\")\n    if config.anp_eps",
             "    model.train(True)\n    if config.anp_eps", STEPS_ANP),
    Mutation("anp-bn-mode-flag-dropped", "ANP: --bn-mode not passed from the command line (config -> algorithm)",
             "defenses/anp_defense.py", "bn_mode=self.bn_mode", "bn_mode=\"train\"", GOLDEN),
    Mutation("anp-one-step-only", "ANP: anp_steps > 1 takes one step", "defenses/anp.py",
             "for _ in range(config.anp_steps):", "for _ in range(1):", STEPS_ANP),
    Mutation("anp-step-size", "ANP: perturbation lr eps instead of eps/steps", "defenses/anp.py",
             "lr=config.anp_eps / max(config.anp_steps, 1))", "lr=config.anp_eps)", STEPS_ANP),
    Mutation("anp-eps-zero-perturbed-term", "ANP: eps = 0 still adds the (unperturbed) robust term", "defenses/anp.py",
             "        if config.anp_eps > 0.0:\n            set_perturbation(model, True)",
             "        if True:\n            set_perturbation(model, True)", STEPS_ANP),
    Mutation("rnp-stop-extra-step", "RNP: per-batch stop takes one more ascent step", "defenses/rnp.py",
             "batch_correct.item() / len(y)\n                return loss, logits",
             "batch_correct.item() / len(y)\n"
             "                optimizer.zero_grad(); (-loss).backward(); optimizer.step()\n"
             "                return loss, logits", STEPS_RNP),
    Mutation("rnp-stop-finishes-epoch", "RNP: per-batch stop finishes the epoch", "defenses/rnp.py",
             "until=lambda: per_batch and result.stopped)", "until=None)", STEPS_RNP),
    Mutation("rnp-clip-before-backward", "RNP: gradient clipped before the backward pass", "defenses/rnp.py",
             "        (-loss).backward()\n"
             "        # Clip after the backward pass (the original clips before it, where it has no effect).\n"
             "        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=config.clip_grad_norm)",
             "        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=config.clip_grad_norm)\n"
             "        (-loss).backward()", STEPS_RNP),
    Mutation("rnp-no-schedule", "RNP: MultiStepLR milestones ignored", "defenses/rnp.py",
             "milestones=list(config.schedule)", "milestones=[]", STEPS_RNP),
    Mutation("rnp-schedule-per-batch", "RNP: scheduler stepped per batch", "defenses/rnp.py",
             "        optimizer.step()\n        if defer:\n",
             "        optimizer.step()\n        scheduler.step()\n        if defer:\n", STEPS_RNP),
    Mutation("rnp-recovery-sign", "RNP: recovery ascends instead of descending", "defenses/rnp.py",
             "loss_fn=lambda logits, y: config.alpha * F.cross_entropy(logits, y)",
             "loss_fn=lambda logits, y: -config.alpha * F.cross_entropy(logits, y)", STEPS_RNP),
    Mutation("rnp-recovery-weight", "RNP: recovery loss without alpha", "defenses/rnp.py",
             "loss_fn=lambda logits, y: config.alpha * F.cross_entropy(logits, y)",
             "loss_fn=lambda logits, y: F.cross_entropy(logits, y)", STEPS_RNP),
    Mutation("rnp-recovery-masks-unclipped", "RNP: recovered masks not clipped to [0, 1] after each step",
             "defenses/rnp.py", "after_step=lambda: clip_to_unit(masks))", "after_step=None)", STEPS_RNP),
    Mutation("rnp-tar-accuracies", "RNP: clean_acc / bad_acc swapped in unlearned_model_last.tar",
             "defenses/rnp_defense.py", "\"clean_acc\": last[\"clean_acc\"],\n                     \"bad_acc\": last[\"asr\"]",
             "\"clean_acc\": last[\"asr\"],\n                     \"bad_acc\": last[\"clean_acc\"]", RNP_E2E),
    Mutation("rnp-tar-backdoored-accuracies", "RNP: tar accuracies of the backdoored model", "defenses/rnp_defense.py",
             "        last = self.final_eval(model, rows)\n",
             "        self.final_eval(model, rows)\n        last = run.evaluate(run.load())\n", RNP_E2E),
    Mutation("rnp-resume-unlearned-ignored", "RNP: --unlearned_model_path resume recovers on the backdoored model",
             "defenses/rnp_defense.py", "model = run.load(unlearned_path, masked=True, argument=\"unlearned_model_path\")",
             "model = run.load(masked=True, argument=\"unlearned_model_path\")", RNP_E2E),
    Mutation("rnp-resume-mask-ignored", "RNP: --mask_file resume ignores the file", "defenses/rnp_defense.py",
             "    mask_file = inputs.mask_file if \"recover\" not in steps else None\n", "    mask_file = None\n",
             RNP_E2E),
    Mutation("seed-not-used", "Stage 1: poison choice and shuffling not seeded", "training/backdoor.py",
             "generator = torch.Generator().manual_seed(settings.seed + 1)",
             "generator = torch.Generator(); generator.seed()", ("tests/test_scripts.py::test_same_seed_same_model",)),
    Mutation("all2all-relabel", "Attacks: all-to-all relabels to the target", "data/attacks/base.py",
             "        if self.target_type == \"all2all\":\n            return (labels + 1) % self.num_classes",
             "        if self.target_type == \"all2all\":\n            return torch.full_like(labels, self.target)",
             ("tests/test_attacks.py",)),
    Mutation("blend-no-epsilon", "Blend: truncation off by one (no rounding guard)", "data/attacks/pattern.py",
             "return (out + 1e-6).clamp_(0, 255).to(torch.uint8)", "return out.clamp_(0, 255).to(torch.uint8)",
             ("tests/test_attacks.py",)),
    Mutation("blend-rounds", "Blend: rounds instead of truncating", "data/attacks/pattern.py",
             "return (out + 1e-6).clamp_(0, 255).to(torch.uint8)", "return out.round().clamp_(0, 255).to(torch.uint8)",
             ("tests/test_attacks.py",)),
    Mutation("clean-label-pool", "Attacks: clean-label poisons drawn from the other classes", "data/attacks/base.py",
             "        if self.clean_label:\n            return (labels == self.target)",
             "        if self.clean_label:\n            return (labels != self.target)", ("tests/test_attacks.py",)),
    Mutation("cover-relabelled", "Adaptive blend: cover images relabelled too", "data/attacks/adaptive_blend.py",
             "labels[poison] = self.target_labels(labels[poison])", "labels[both] = self.target_labels(labels[both])",
             ("tests/test_attacks.py",)),
    Mutation("float-trigger-rounded", "LIRA/dynamic: poisoned test images rounded to grey levels",
             "data/attacks/generators.py", "out.append((self.trigger(x) * 255)",
             "out.append((self.trigger(x) * 255).round()", ("tests/test_attacks.py",)),
    Mutation("state-not-recorded", "Trigger info without the attack's state (patterns, field, weights)",
             "data/attacks/base.py", '"state": self.state(),', '"state": {},', ("tests/test_attacks.py",)),
    Mutation("wanet-noise-on-all", "WaNet noise mode warps every image of the batch", "data/attacks/wanet.py",
             "cover = is_cover[batch_index].view(-1, 1, 1, 1)",
             "cover = torch.ones_like(is_cover[batch_index]).view(-1, 1, 1, 1)",
             ("tests/test_attacks.py",)),
    Mutation("log-appended", "output.log appended in place, not written atomically", "utils/run_log.py",
             "        atomic_write_text(self._text, self.path)",
             "        with open(self.path, \"a\") as f:\n            f.write(line + \"\\n\")",
             ("tests/test_run_log.py",)),
    Mutation("mismatch-without-keys", "Checkpoint mismatch error no longer names the keys", "utils/checkpoint.py",
             "parts.append(f\"shape mismatch {', '.join(wrong_shape[:2])}{' …' if len(wrong_shape) > 2 else ''}\")",
             "parts.append(\"shape mismatch\")", ("tests/test_checkpoint.py",)),
    Mutation("prune-wrong-end", "Pruning: highest masks pruned first", "defenses/pruning.py",
             "return sorted(values, key=lambda v: float(v[2]))", "return sorted(values, key=lambda v: -float(v[2]))",
             ("tests/test_pruning.py",) + OUTCOME),
    Mutation("saved-model-unpruned", "Pruning: pruned_model.th saved without pruning", "defenses/pruning.py",
             "for layer, idx, _ in sort_by_mask(values)[:pruned]:", "for layer, idx, _ in sort_by_mask(values)[:0]:",
             ("tests/test_pruning.py",) + OUTCOME),
    Mutation("soda-signed-closed-form", "SODA: closed form W instead of |W|", "defenses/soda.py",
             "weight.detach().float().abs().t()", "weight.detach().float().t()", SODA),
    Mutation("soda-diagonal-kept", "SODA: PCC of c with itself not zeroed", "defenses/soda.py",
             "        row[c] = 0.0\n", "", SODA),
    Mutation("soda-mad-unscaled", "SODA: MAD without the 1.4826 factor", "defenses/soda.py",
             "MAD_SCALE = 1.4826", "MAD_SCALE = 1.0", SODA),
    Mutation("soda-source-highest", "SODA: of several flagged sources, the one target samples score highest",
             "defenses/soda.py", "return min(test.flagged, key=", "return max(test.flagged, key=", SODA),
    Mutation("soda-removal-unmasked", "SODA: fine-tuning without the neuron mask", "defenses/soda.py",
             "forward=lambda x: split.forward_masked(x, mask).float()", "forward=lambda x: split.model(x).float()",
             SODA),
    Mutation("soda-recon-labelled-0", "SODA: reconstructed samples saved with label 0 (the released code's slip)",
             "defenses/soda_defense.py", '"labels": torch.full((len(recon.images),), source)',
             '"labels": torch.full((len(recon.images),), 0)', ("tests/test_soda_pipeline.py",)),
    Mutation("grid-corrupt-is-done", "Grid: a corrupt metrics.json counted as done", "experiments/cells.py",
             'return "corrupt", f"{cell.metrics_path} is corrupt', 'return "done", f"{cell.metrics_path} is corrupt',
             GRID),
    Mutation("grid-no-downstream-rerun", "Grid: cells downstream of a rerun cell kept", "experiments/grid.py",
             'state, why = "rerun", f"its input {rerun[0]} reruns"', 'state, why = "done", ""', GRID),
    Mutation("grid-oracle-as-operating-point", "Grid: the report shows the oracle in place of the rule's point",
             "experiments/report.py", 'after = metrics.get("operating_point") or metrics.get("after") or before',
             'after = oracle_point(metrics, 0.05) if metrics.get("rows") else (metrics.get("after") or before)',
             GRID),
    Mutation("grid-population-std", "Grid: population std (n) instead of the sample std (n - 1)",
             "experiments/report.py", "/ (n - 1)) if n > 1 else 0.0", "/ n) if n > 1 else 0.0", GRID),
    Mutation("semantic-in-held-out", "Semantic attack: listed images left in the held-out split",
             "data/attacks/semantic.py", "return torch.cat([permutation[~listed], permutation[listed]])",
             "return permutation", ("tests/test_semantic.py",)),
    # The shared training loop (utils/training.py), which every stage's loop now runs through.
    Mutation("loop-until-ignored", "Training loop: run_batches never stops early (until ignored)", "utils/training.py",
             "        if until is not None and until():\n            break\n", "",
             ("tests/test_training_loop.py",) + STEPS_RNP),
    Mutation("loop-after-step-skipped", "Training loop: descent_step never calls after_step (masks not clipped)",
             "utils/training.py", "        if after_step is not None:\n            after_step()\n", "",
             ("tests/test_training_loop.py",)),
    Mutation("loop-totals-mean-over-batches-ignored", "Training loop: DeviceTotals weighs batches by size for ANP's "
             "per-batch mean", "utils/training.py", "self.loss += loss * len(labels) if self.per_sample else loss",
             "self.loss += loss * len(labels)", ("tests/test_training_loop.py",)),
    # The defense seam: registry, generated flags, grid cells built as typed configs.
    Mutation("option-ratio-alias-lost", "Options: --ratio no longer an alias of defense_frac (RNP's spelling)",
             "defenses/options.py", 'aliases=("--val-frac", "--val_frac", "--ratio"))',
             'aliases=("--val-frac", "--val_frac"))', (REGISTRY_ORIGINAL,)),
    Mutation("cli-mask-file-dropped", "Defense scripts: --mask-file not passed to the defense's inputs",
             "defenses/cli.py", 'mask_file=getattr(args, "mask_file", None),', "mask_file=None,",
             ("tests/test_scripts.py::test_rnp_resume_from_a_mask_file_prunes_by_that_file",)),
    Mutation("grid-prune-cell-no-mask-file", "Grid: a rule's prune cell not given the masks cell's mask file",
             "experiments/plans.py", 'steps=("prune",), mask_file=mask_file)', 'steps=("prune",), mask_file=None)',
             GRID),
    Mutation("grid-rule-options-dropped", "Grid: the operating rule's options not applied to the cell's config",
             "experiments/plans.py", "dataclasses.replace(prune_config, **_rule_options(rule))", "prune_config",
             GRID),
    Mutation("grid-rule-save-threshold-dropped", "Grid: a fixed rule's save_threshold not applied to the cell",
             "experiments/plans.py",
             'return {"operating_point": "fixed", "save_threshold": float(rule.options["save_threshold"])}',
             'return {"operating_point": "fixed"}', GRID),
    Mutation("grid-rule-max-acc-drop-dropped", "Grid: a clean-data rule's max_acc_drop not applied to the cell",
             "experiments/plans.py",
             'return {"operating_point": "defense-acc", "max_acc_drop": float(rule.options["max_acc_drop"])}',
             'return {"operating_point": "defense-acc"}', ("tests/test_reproduce.py::test_cells_of_a_grid",)),
    Mutation("soda-attacker-pair-ignored", "SODA: --pair attacker removes the detected pair, not the attacker's",
             "defenses/soda_defense.py", 'if config.pair == "attacker":\n            attack = self.data.attack',
             'if False:\n            attack = self.data.attack',
             ("tests/test_soda_pipeline.py::test_the_attackers_pair_is_an_oracle_taken_from_the_trigger_info",)),
    Mutation("sweep-cut-after-change", "Incremental sweep: recomputation starts at the first kept cut after the "
             "changed layer", "utils/incremental.py", "start = max((p for p in self.cached_cuts if p <= first), "
             "default=0)", "start = min((p for p in self.cached_cuts if p > first), default=0)", INCREMENTAL),
    Mutation("sweep-no-refold", "Incremental sweep: a changed BatchNorm is not folded again", "utils/incremental.py",
             "if step.fold and (first_call or changed.intersection(step.sources)):",
             "if step.fold and first_call:", INCREMENTAL),
    Mutation("sweep-stale-cache", "Incremental sweep: kept activations not refreshed after a recomputation",
             "utils/incremental.py", "if i in self.cached_cuts and i > start:",
             "if i in self.cached_cuts and i > start and c >= len(state.cache.get(i, [])):", INCREMENTAL),
]


# A pytest plugin that writes the node id of every failing test (or collection) to a file, one per line: the
# summary lines of ``pytest -q`` cut a parametrised id at its first space.
_PLUGIN = """import os
def _record(report):
    if report.failed:
        with open(os.environ["CHECK_MUTATIONS_FAILED"], "a") as f:
            f.write(report.nodeid + "\\n")
pytest_runtest_logreport = pytest_collectreport = _record
"""


def run_tests(tests: tuple[str, ...], skip: frozenset = frozenset(), fail_fast: bool = False
              ) -> tuple[int, list[str], float]:
    """pytest on ``tests`` (``skip``: test ids deselected; ``fail_fast``: stop at the first failure). Returns
    pytest's exit status, the failing node ids, the seconds it took."""
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "check_mutations_plugin.py"), "w") as f:
            f.write(_PLUGIN)
        log = os.path.join(folder, "failed.txt")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "CHECK_MUTATIONS_FAILED": log,
               "PYTHONPATH": os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))}
        extra = [a for test in sorted(skip) for a in ("--deselect", test)] + (["-x"] if fail_fast else [])
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                                 "check_mutations_plugin", *extra, *tests], cwd=ROOT, capture_output=True, text=True,
                                env=env)
        seconds = time.perf_counter() - start
        failed = []
        if os.path.exists(log):
            with open(log) as f:
                failed = sorted({line.rstrip("\n") for line in f if line.strip()})
    return result.returncode, failed, seconds


def why_stale(mutation: Mutation) -> str:
    """Why the mutation no longer applies ("" when it does): its text is gone, or one of its tests is."""
    path = os.path.join(ROOT, mutation.path)
    if not os.path.exists(path):
        return f"{mutation.path} is gone"
    with open(path) as f:
        count = f.read().count(mutation.old)
    if count != 1:
        return f"original text found {count} times in {mutation.path}"
    for test in mutation.tests:
        file, _, function = test.partition("::")
        if not os.path.exists(os.path.join(ROOT, file)):
            return f"test file {file} is gone"
        if function:
            with open(os.path.join(ROOT, file)) as f:
                if not re.search(rf"^(?:async )?def {re.escape(function.split('[')[0])}\(", f.read(), flags=re.M):
                    return f"test {test} is gone"
    return ""


def restore(path: str, source: str, mutated: str, mutation: Mutation) -> None:
    """Put the original text back. If someone else changed the file while the tests ran, only the mutated
    text is reverted (their change kept); if even that is gone, say so loudly."""
    with open(path) as f:
        current = f.read()
    if current == mutated:
        text = source
    elif mutation.new and current.count(mutation.new) == 1:
        text = current.replace(mutation.new, mutation.old)
        print(f"WARNING: {mutation.path} changed while {mutation.name} ran; reverted only the mutation", flush=True)
    else:
        print(f"WARNING: {mutation.path} changed while {mutation.name} ran and the mutation cannot be found to "
              f"revert: check the file by hand (expected the text: {mutation.old!r})", flush=True)
        return
    with open(path, "w") as f:
        f.write(text)


def check(mutation: Mutation, failing_before: frozenset = frozenset(), fail_fast: bool = False
          ) -> tuple[str, list[str], float]:
    """``failing_before``: tests that fail without any mutation (--baseline): deselected, failing them is no
    catch. ``fail_fast``: stop at the first failing test (faster; names only that one)."""
    if why_stale(mutation):
        return "stale", [], 0.0
    path = os.path.join(ROOT, mutation.path)
    with open(path) as f:
        source = f.read()
    mutated = source.replace(mutation.old, mutation.new)
    try:
        with open(path, "w") as f:
            f.write(mutated)
        returncode, failed, seconds = run_tests(mutation.tests, failing_before, fail_fast)
    finally:
        restore(path, source, mutated, mutation)
    if returncode == 0:
        return "MISSED", failed, seconds
    new_failures = [f for f in failed if f not in failing_before]
    if returncode == 1 and failed and not new_failures:
        return "MISSED", failed, seconds  # only tests that failed anyway
    # 1: some tests failed. Anything else (interrupted, internal/usage error, nothing collected) is no catch.
    return ("caught" if returncode == 1 and new_failures else "error"), new_failures or failed, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--stale-only", action="store_true",
                        help="only report which mutations no longer apply (text or test gone); runs no tests")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the chosen mutations' tests unmutated; a test failing then is deselected")
    parser.add_argument("--fail-fast", action="store_true",
                        help="stop each mutation's tests at the first failure (pytest -x): much faster for "
                        "mutations that are caught, and names only the first test that caught it")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.stale_only:
        stale = [(m, why_stale(m)) for m in chosen]
        stale = [(m, why) for m, why in stale if why]
        for m, why in stale:
            print(f"stale   {m.name:38s} {why}")
        print(f"{len(stale)} of {len(chosen)} mutations stale")
        return 1 if stale else 0
    missed = 0
    total = time.perf_counter()
    failing_before: frozenset = frozenset()
    if args.baseline:
        tests = tuple(sorted({t for m in chosen if not why_stale(m) for t in m.tests}))
        returncode, failed, seconds = run_tests(tests)
        failing_before = frozenset(failed)
        print(f"baseline {seconds:6.1f} s  " + ("every test passes unmutated" if returncode == 0 else
              f"pytest exit {returncode}; failing unmutated (deselected below): {', '.join(failed) or '?'}"),
              flush=True)
        if returncode not in (0, 1):
            print("the unmutated tests do not run (collection or usage error): nothing to compare against")
            return 2
    for mutation in chosen:
        status, failed, seconds = check(mutation, failing_before, args.fail_fast)
        missed += status != "caught"
        short = [(t if len(t) <= 100 else t[:99] + "…") for t in (f.split("::", 1)[-1] for f in failed[:4])]
        caught_by = ", ".join(short) + (" …" if len(failed) > 4 else "")
        print(f"{status:7s} {mutation.name:38s} {seconds:6.1f} s  {mutation.what}" +
              (f"\n        caught by: {caught_by}" if failed else ""), flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught in {time.perf_counter() - total:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
