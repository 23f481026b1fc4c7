"""Introduce each known regression by hand, run the tests that should catch it, report which did.

Every mutation is one exact text replacement in one source file. For each: check that the original
text is still there (otherwise the mutation is reported *stale*: the code moved, update the list),
apply it, run pytest on the named tests, restore the file (also on Ctrl-C), and record the failing
tests. A mutation that no test catches is a hole in the suite. Not part of CI (it runs the suite
once per mutation); run it after refactoring the algorithms:

    python scripts/check_mutations.py            # all, about 10-15 minutes on 2 cores
    python scripts/check_mutations.py anp-sign   # one by name
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
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
OUTCOME = ("tests/test_scripts.py::test_anp_saved_operating_point", "tests/test_scripts.py::test_rnp_one_command")

MUTATIONS = [
    Mutation("anp-weights-swapped", "ANP: natural and robust loss weights swapped", "defenses/anp.py",
             "loss = config.anp_alpha * loss_nat + (1 - config.anp_alpha) * loss_rob",
             "loss = (1 - config.anp_alpha) * loss_nat + config.anp_alpha * loss_rob", STEPS_ANP),
    Mutation("anp-descent", "ANP: descent step on the perturbation instead of ascent", "defenses/anp.py",
             "loss_noise = -F.cross_entropy(model(x), y)", "loss_noise = F.cross_entropy(model(x), y)", STEPS_ANP),
    Mutation("anp-raw-gradient", "ANP: raw gradient instead of its sign", "defenses/anp.py",
             "p.grad = torch.sign(p.grad)", "p.grad = p.grad", STEPS_ANP),
    Mutation("anp-robust-unperturbed", "ANP: robust loss computed without the perturbation", "defenses/anp.py",
             "            set_perturbation(model, True)\n            loss_rob",
             "            set_perturbation(model, False)\n            loss_rob", STEPS_ANP),
    Mutation("anp-noise-bias-not-optimised", "ANP: neuron_noise_bias never moving (not optimised)",
             "models/masked_batchnorm.py", "for p in (m.neuron_noise, m.neuron_noise_bias)]",
             "for p in (m.neuron_noise,)]", STEPS_ANP),
    Mutation("anp-noise-bias-not-used", "ANP: neuron_noise_bias never moving (not in the forward)",
             "models/masked_batchnorm.py", "bias = self.bias * (1.0 + self.neuron_noise_bias)", "bias = self.bias",
             STEPS_ANP),
    Mutation("anp-bn-mode-ignored", "ANP: --bn-mode has no effect (step always in train mode)", "defenses/anp.py",
             "    model.train(config.bn_mode == \"train\")\n    if config.anp_eps",
             "    model.train(True)\n    if config.anp_eps", STEPS_ANP),
    Mutation("anp-bn-mode-flag-dropped", "ANP: --bn-mode not passed from the command line", "optimize_mask_cifar.py",
             "bn_mode=args.bn_mode", "bn_mode=\"train\"", GOLDEN),
    Mutation("anp-one-step-only", "ANP: anp_steps > 1 takes one step", "defenses/anp.py",
             "for _ in range(config.anp_steps):", "for _ in range(1):", STEPS_ANP),
    Mutation("anp-step-size", "ANP: perturbation lr eps instead of eps/steps", "defenses/anp.py",
             "lr=config.anp_eps / max(config.anp_steps, 1))", "lr=config.anp_eps)", STEPS_ANP),
    Mutation("anp-eps-zero-perturbed-term", "ANP: eps = 0 still adds the (unperturbed) robust term", "defenses/anp.py",
             "        if config.anp_eps > 0.0:\n            set_perturbation(model, True)",
             "        if True:\n            set_perturbation(model, True)", STEPS_ANP),
    Mutation("rnp-stop-extra-step", "RNP: per-batch stop takes one more ascent step", "defenses/rnp.py",
             "                result.stopped, result.train_acc = True, batch_correct / len(y)\n                break",
             "                result.stopped, result.train_acc = True, batch_correct / len(y)\n"
             "                optimizer.zero_grad(); (-loss).backward(); optimizer.step()\n                break",
             STEPS_RNP),
    Mutation("rnp-stop-finishes-epoch", "RNP: per-batch stop finishes the epoch", "defenses/rnp.py",
             "batch_correct / len(y)\n                break", "batch_correct / len(y)", STEPS_RNP),
    Mutation("rnp-clip-before-backward", "RNP: gradient clipped before the backward pass", "defenses/rnp.py",
             "            (-loss).backward()\n"
             "            # Clip after the backward pass (the original clips before it, where it has no effect).\n"
             "            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=config.clip_grad_norm)",
             "            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=config.clip_grad_norm)\n"
             "            (-loss).backward()", STEPS_RNP),
    Mutation("rnp-no-schedule", "RNP: MultiStepLR milestones ignored", "defenses/rnp.py",
             "milestones=list(config.schedule)", "milestones=[]", STEPS_RNP),
    Mutation("rnp-schedule-per-batch", "RNP: scheduler stepped per batch", "defenses/rnp.py",
             "            optimizer.step()\n        result.epochs_run = epoch",
             "            optimizer.step()\n            scheduler.step()\n        result.epochs_run = epoch",
             STEPS_RNP),
    Mutation("rnp-recovery-sign", "RNP: recovery ascends instead of descending", "defenses/rnp.py",
             "loss = config.alpha * F.cross_entropy(logits, y)", "loss = -config.alpha * F.cross_entropy(logits, y)",
             STEPS_RNP),
    Mutation("rnp-recovery-weight", "RNP: recovery loss without alpha", "defenses/rnp.py",
             "loss = config.alpha * F.cross_entropy(logits, y)", "loss = F.cross_entropy(logits, y)", STEPS_RNP),
    Mutation("rnp-tar-accuracies", "RNP: clean_acc / bad_acc swapped in unlearned_model_last.tar", "rnp_main.py",
             "\"clean_acc\": last[\"clean_acc\"], \"bad_acc\": last[\"asr\"]",
             "\"clean_acc\": last[\"asr\"], \"bad_acc\": last[\"clean_acc\"]", RNP_E2E),
    Mutation("rnp-tar-backdoored-accuracies", "RNP: tar accuracies of the backdoored model", "rnp_main.py",
             "            last = final_eval(model, unlearning)",
             "            last = evaluate(run.load(args.backdoor_model_path, False, \"--backdoor_model_path\"))", RNP_E2E),
    Mutation("rnp-resume-unlearned-ignored", "RNP: --unlearned_model_path resume recovers on the backdoored model",
             "rnp_main.py", "model = run.load(unlearned_path, True, \"--unlearned_model_path\")",
             "model = run.load(args.backdoor_model_path, True, \"--unlearned_model_path\")", RNP_E2E),
    Mutation("rnp-resume-mask-ignored", "RNP: --mask_file resume ignores the file", "rnp_main.py",
             "    mask_file = args.mask_file\n", "    mask_file = None\n", RNP_E2E),
    Mutation("seed-not-used", "Stage 1: poison choice and shuffling not seeded", "train_backdoor_cifar.py",
             "generator = torch.Generator().manual_seed(args.seed + 1)",
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
             "logits = split.forward_masked(x, mask).float()", "logits = split.model(x).float()", SODA),
    Mutation("soda-recon-labelled-0", "SODA: reconstructed samples saved with label 0 (the released code's slip)",
             "soda_main.py", '"labels": torch.full((len(recon.images),), source)',
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


def run_tests(tests: tuple[str, ...]) -> tuple[bool, list[str], float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.M)))
    return result.returncode == 0, failed, time.perf_counter() - start


def check(mutation: Mutation) -> tuple[str, list[str], float]:
    path = os.path.join(ROOT, mutation.path)
    with open(path) as f:
        source = f.read()
    if source.count(mutation.old) != 1:
        return "stale", [], 0.0
    try:
        with open(path, "w") as f:
            f.write(source.replace(mutation.old, mutation.new))
        passed, failed, seconds = run_tests(mutation.tests)
    finally:
        with open(path, "w") as f:
            f.write(source)
    return ("MISSED" if passed else "caught"), failed, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    missed = 0
    for mutation in chosen:
        status, failed, seconds = check(mutation)
        missed += status != "caught"
        caught_by = ", ".join(f.split("::", 1)[-1] for f in failed[:4]) + (" …" if len(failed) > 4 else "")
        print(f"{status:7s} {mutation.name:32s} {seconds:6.1f} s  {mutation.what}" +
              (f"\n        caught by: {caught_by}" if failed else ""), flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
