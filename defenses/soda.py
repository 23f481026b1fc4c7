"""SODA — semantic backdoor detection and mitigation (Sun, Sun, Koh, Shi; USENIX Security 2024).

Four steps, each a function ``soda_main.py`` calls (spec: ``shared/spec/soda.md``):

1. :func:`causality_matrices` — for every class c, the mean |Δ logit_k| when hidden neuron i at the
   split point gets +1, over clean samples of c: ``A[c, i, k]``. At the input of the last linear layer
   this is ``|W[k, i]|`` for every c (:func:`closed_form_matrix`); deeper splits run the intervention,
   batched over neurons on the device.
2. :func:`detect` — target: 1 − (Pearson correlation of column t of A_c with the mean of the other
   columns, averaged over c, 0 for c = t), MAD outlier test at ``confidence``; source: the mean target
   logit of each class's clean samples, MAD test at ``confidence2``.
3. :func:`reconstruct_until` — clean source-class images, in shuffled order, optimised towards the target
   logit with an L2 penalty (SGD with the released pixel weight decay 5e-4), each stopping at target
   softmax ≥ 0.99, until ``needed`` of them reach the target (the released ``gen_trigger``: only successes
   count); they are the reconstructed infected samples (labelled with the source class).
4. :func:`remove` — fine-tune all parameters with the top ``top`` neurons of ``A[source][:, target]``
   active through a fixed 0/1 mask for ``epochs`` passes: each batch the first B − 20 of a shuffled
   clean batch of B (unaugmented by default, as released) plus 20 reconstructed samples; loss =
   CE(batch) − reg · CE(reconstructed, target); the mask is dropped afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.split import SplitModel, head_of
from utils.errors import OptionError
from utils.training import DeviceTotals, descent_step, epoch_order, run_batches

MAD_SCALE = 1.4826  # MAD of a normal distribution's sample -> its standard deviation
# Floats per batched intervention forward (neurons × samples × neuron count). On the CPU the work is
# compute-bound and large chunks only add cache misses (benchmarks/bench_soda.py: 2^20 about matches the
# per-neuron loop, 2^22 and up are slower); on CUDA large chunks replace thousands of small launches.
INTERVENTION_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


# --- 1. causality analysis ----------------------------------------------------------------------
def closed_form_matrix(split: SplitModel) -> torch.Tensor:
    """``|W[k, i]|`` as a D×C matrix: the intervention's result when the back is the head alone."""
    return head_of(split.model).weight.detach().float().abs().t().contiguous()


@torch.no_grad()
def intervention_matrix(split: SplitModel, inputs: torch.Tensor, autocast=None,
                        chunk: int | None = None) -> torch.Tensor:
    """Mean over ``inputs`` (normalised N×C×H×W) of |back(h + e_i) − back(h)| for every hidden neuron i: D×C."""
    autocast = autocast or (lambda: torch.autocast(inputs.device.type, enabled=False))
    with autocast():
        h = split.front(inputs).float()
    shape, n = h.shape[1:], len(h)
    flat = h.reshape(n, -1)
    neurons = flat.shape[1]
    with autocast():
        base = split.back(h).float()
    budget = INTERVENTION_ELEMENTS.get(flat.device.type, INTERVENTION_ELEMENTS["cpu"])
    chunk = chunk or max(1, budget // max(1, n * neurons))
    rows = []
    for start in range(0, neurons, chunk):
        idx = torch.arange(start, min(start + chunk, neurons), device=flat.device)
        shifted = flat.unsqueeze(0).repeat(len(idx), 1, 1)  # k × n × D
        shifted[torch.arange(len(idx), device=flat.device), :, idx] += 1.0
        with autocast():
            out = split.back(shifted.reshape(len(idx) * n, *shape)).float().reshape(len(idx), n, -1)
        rows.append((out - base.unsqueeze(0)).abs().mean(1))
    return torch.cat(rows)


def causality_matrices(split: SplitModel, class_inputs: list[torch.Tensor], closed_form: bool,
                       autocast=None, progress: bool = False) -> torch.Tensor:
    """``A`` (C × D × C): the matrix per class of ``class_inputs`` (normalised samples of each class)."""
    if closed_form:
        if not split.is_head:
            raise OptionError("split", f"the closed form holds only at the input of the last linear layer "
                                       f"(penultimate), not at {split.at!r}")
        return closed_form_matrix(split).unsqueeze(0).repeat(len(class_inputs), 1, 1)
    was_training = split.model.training
    split.model.eval()
    matrices = [intervention_matrix(split, x, autocast)
                for x in tqdm(class_inputs, desc="causality", leave=False, disable=not progress)]
    split.model.train(was_training)
    return torch.stack(matrices)


# --- 2. detection ------------------------------------------------------------------------------
def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last dimension."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def target_scores(matrices: torch.Tensor) -> torch.Tensor:
    """1 − PCC per class (C): for each c and i ≠ c, PCC(column i of A_c, mean of A_c's other columns);
    0 on the diagonal; averaged over c."""
    num_classes = matrices.shape[0]
    pcc = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for c in range(num_classes):
        a = matrices[c].double()  # D × C
        total = a.sum(1, keepdim=True)
        others = (total - a) / (num_classes - 1)  # column i: mean of the columns j ≠ i
        row = pearson(a.t(), others.t())
        row[c] = 0.0
        pcc[c] = row
    return 1.0 - pcc.mean(0)


@dataclass
class OutlierTest:
    values: list[float]  # the scores divided by their maximum
    median: float
    mad: float  # 1.4826 · median |x − median|
    confidence: float
    flagged: list[int]  # indices, largest deviation first

    @property
    def threshold(self) -> float:
        """Normalised score above which a value is flagged."""
        return self.median + self.confidence * self.mad

    def as_dict(self) -> dict:
        return {"normalized": self.values, "median": self.median, "mad": self.mad, "confidence": self.confidence,
                "threshold": self.threshold, "flagged": self.flagged}


def mad_outliers(scores: torch.Tensor, confidence: float) -> OutlierTest:
    """Values above the median by more than ``confidence`` MADs, after dividing by the maximum."""
    x = scores.double()
    peak = x.abs().max()
    x = x / peak if peak > 0 else x
    median = torch.quantile(x, 0.5)
    mad = MAD_SCALE * torch.quantile((x - median).abs(), 0.5)
    flagged = []
    if mad > 0:
        z = (x - median) / mad
        flagged = [int(i) for i in torch.argsort(z, descending=True) if x[i] > median and z[i] > confidence]
    return OutlierTest(x.tolist(), float(median), float(mad), float(confidence), flagged)


@torch.no_grad()
def mean_logits(model: torch.nn.Module, class_inputs: list[torch.Tensor], autocast=None) -> torch.Tensor:
    """C × C: row s = mean logits of the model over the samples of class s (eval mode)."""
    was_training = model.training
    model.eval()
    autocast = autocast or (lambda: torch.autocast("cpu", enabled=False))
    rows = []
    for x in class_inputs:
        with autocast():
            rows.append(model(x).float().mean(0))
    model.train(was_training)
    return torch.stack(rows).cpu()


def source_scores(logits: torch.Tensor, target: int) -> torch.Tensor:
    """Mean target logit per class (0 for the target itself)."""
    scores = logits[:, target].clone().double()
    scores[target] = 0.0
    return scores


def choose_source(logits: torch.Tensor, target: int, confidence2: float) -> tuple[int, OutlierTest]:
    """The source class for ``target``: the flagged class that target-class samples score lowest when several
    are flagged, else the class with the largest mean target logit."""
    scores = source_scores(logits, target)
    test = mad_outliers(scores, confidence2)
    if len(test.flagged) > 1:
        return min(test.flagged, key=lambda s: float(logits[target, s])), test
    return int(torch.argmax(scores)), test


def detect(matrices: torch.Tensor, logits: torch.Tensor, confidence: float, confidence2: float) -> dict:
    """``detection.json``'s content: the (source, target) pair (None, None when nothing is flagged), every
    class's target score and the tests' thresholds."""
    scores = target_scores(matrices)
    target_test = mad_outliers(scores, confidence)
    result = {"target": None, "source": None, "scores": scores.tolist(), "target_test": target_test.as_dict(),
              "candidates": []}
    for target in target_test.flagged:
        source, source_test = choose_source(logits, target, confidence2)
        result["candidates"].append({"target": target, "source": source,
                                     "source_scores": source_scores(logits, target).tolist(),
                                     "source_test": source_test.as_dict()})
    if result["candidates"]:  # the most outlying target
        result["target"], result["source"] = result["candidates"][0]["target"], result["candidates"][0]["source"]
    result["thresholds"] = {"confidence": confidence, "confidence2": confidence2,
                            "target_threshold_normalized": target_test.threshold}
    return result


# --- 3. reconstruction -------------------------------------------------------------------------
@dataclass
class Reconstruction:
    images: torch.Tensor  # normalised N×C×H×W, all reached the target
    indices: torch.Tensor  # which of the given inputs they started from
    steps: torch.Tensor  # optimisation steps each took
    tried: int
    target: int
    source: int


def reconstruct(model: torch.nn.Module, inputs: torch.Tensor, target: int, source: int, steps: int = 2000,
                lr: float = 0.1, reg: float = 0.9, stop_confidence: float = 0.99, progress: bool = False,
                autocast=None, weight_decay: float = 5e-4) -> Reconstruction:
    """Optimise normalised ``inputs`` (SGD, momentum 0.9, ``weight_decay`` on the pixels) to maximise the target
    logit with an L2 penalty ``reg · mean(x²)``, each sample independently (the released code optimises one
    image at a time; the batched sum of per-sample losses gives every sample the same steps). As released, a
    step is taken and then the target softmax of the logits *before* it is checked: a sample stops after the
    step in which it reached ``stop_confidence``. Keeps those predicted as the target at the end."""
    autocast = autocast or (lambda: torch.autocast(inputs.device.type, enabled=False))
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = inputs.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.SGD([x], lr=lr, momentum=0.9, weight_decay=weight_decay)
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    used = torch.zeros(len(x), dtype=torch.long, device=x.device)
    try:
        for step in tqdm(range(steps), desc="reconstruct", leave=False, disable=not progress):
            if step % 16 == 0 and bool(done.all()):  # a host sync: checked now and then (finished ones are frozen)
                break
            with autocast():
                logits = model(x).float()
            loss = (-logits[:, target] + reg * x.pow(2).flatten(1).mean(1))
            optimizer.zero_grad(set_to_none=True)
            (loss * (~done).float()).sum().backward()
            before = x.detach().clone()
            optimizer.step()
            with torch.no_grad():  # finished samples stay where they stopped (no boolean indexing: no sync)
                x.copy_(torch.where(done.view(-1, *[1] * (x.dim() - 1)), before, x))
                used += (~done).long()
                done |= logits.softmax(1)[:, target] >= stop_confidence
        with torch.no_grad(), autocast():
            reached = model(x).float().argmax(1) == target
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return Reconstruction(x.detach()[reached], reached.nonzero().flatten(), used[reached], len(x), target, source)


def reconstruct_until(model: torch.nn.Module, inputs: torch.Tensor, target: int, source: int, needed: int,
                      chunk: int | None = None, **options) -> Reconstruction:
    """:func:`reconstruct` over ``inputs`` (already in the order to try them: the released code shuffles the
    source class) chunk by chunk until ``needed`` reached the target; the first ``needed`` successes in that
    order. ``tried`` counts the images optimised (a whole chunk at a time, so possibly more than the released
    code would have tried; each image's result is the same)."""
    chunk = chunk or needed
    images, indices, steps, tried = [], [], [], 0
    for start in range(0, len(inputs), chunk):
        part = reconstruct(model, inputs[start:start + chunk], target, source, **options)
        images.append(part.images)
        indices.append(part.indices + start)
        steps.append(part.steps)
        tried += part.tried
        if sum(len(i) for i in indices) >= needed:
            break
    if not images:
        empty = inputs[:0]
        return Reconstruction(empty, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0,
                              target, source)
    return Reconstruction(torch.cat(images)[:needed], torch.cat(indices)[:needed], torch.cat(steps)[:needed], tried,
                          target, source)


# --- 4. removal --------------------------------------------------------------------------------
def neuron_mask(matrices: torch.Tensor, source: int, target: int, top: float) -> torch.Tensor:
    """0/1 per hidden neuron: 1 for the top ``top`` fraction of ``A[source][:, target]``."""
    column = matrices[source][:, target]
    keep = max(1, int(len(column) * top))
    mask = torch.zeros_like(column)
    mask[torch.argsort(column, descending=True)[:keep]] = 1.0
    return mask


def remove(split: SplitModel, mask: torch.Tensor, clean_images: torch.Tensor, clean_labels: torch.Tensor,
           transform: Callable, recon_train: torch.Tensor, source: int, target: int, *, epochs: int, lr: float,
           reg: float, batch_size: int = 64, recon_per_batch: int = 20, generator: torch.Generator | None = None,
           autocast=None, progress: bool = False, log=print, evaluate: Callable | None = None) -> list[dict]:
    """Fine-tune every parameter of ``split.model`` with the hidden neurons multiplied by the fixed ``mask``.

    ``epochs`` passes (the released loop's ``range(0, epoch)``) over a shuffled order of the clean images in
    batches of ``batch_size``; each step takes the first ``batch_size − recon_per_batch`` of the batch (as the
    released ``train_tune``: the rest of a clean batch is not used), turned into the model's input by
    ``transform`` (the defender's ``normalize``: not augmented, as released), and ``recon_per_batch``
    reconstructed samples picked without replacement (labelled ``source``); loss = CE(batch) − reg ·
    CE(reconstructed, target). Constant lr, SGD momentum 0.9, weight decay 5e-4. The model afterwards is the
    plain model (no mask). Returns one row per pass (``evaluate(model)`` merged in when given).
    """
    model = split.model
    device = clean_images.device
    autocast = autocast or (lambda: torch.autocast(device.type, enabled=False))
    mask = mask.to(device).detach()
    clean_per_batch = batch_size - recon_per_batch
    if clean_per_batch <= 0:
        raise OptionError("recon_per_batch", f"{recon_per_batch} leaves no clean images in a batch of {batch_size}")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    source_labels = torch.full((recon_per_batch,), source, dtype=torch.long, device=device)
    target_labels = torch.full((recon_per_batch,), target, dtype=torch.long, device=device)
    repeats = -(-recon_per_batch // len(recon_train))  # fewer reconstructed than a batch needs: several passes

    def loss_fn(logits, y):
        return F.cross_entropy(logits, y) - reg * F.cross_entropy(logits[-recon_per_batch:], target_labels)

    step = descent_step(model, optimizer, autocast, loss_fn, forward=lambda x: split.forward_masked(x, mask).float())
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        batches = epoch_order(len(clean_labels), batch_size, device, generator)
        # Every step's reconstructed picks drawn now, in the order the steps would draw them, and copied to the
        # device at once (one copy a pass, not one a step).
        picks = iter(torch.stack([torch.cat([torch.randperm(len(recon_train), generator=generator)
                                             for _ in range(repeats)])[:recon_per_batch] for _ in batches]).to(device))

        def make_batch(idx):
            idx, pick = idx[:clean_per_batch], next(picks)
            return (torch.cat([transform(clean_images[idx]), recon_train[pick].float()]),
                    torch.cat([clean_labels[idx], source_labels]))

        totals = run_batches(batches, make_batch, step, DeviceTotals(device), batch_size=batch_size, progress=progress,
                             desc=f"remove {epoch}")
        row = {"epoch": epoch, "lr": lr, "loss": totals.means()[0]}
        if evaluate is not None:
            row.update(evaluate(model))
        log(" \t ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
        history.append(row)
    return history
