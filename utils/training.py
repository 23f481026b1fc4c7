"""Supervised training over in-memory uint8 images (batched augmentation on the device).

One loop serves every stage (:func:`run_batches`): stage 1 (:func:`train_epoch`), ANP's mask optimisation,
RNP's unlearning and recovery, SODA's removal. Each gives the batch order (:func:`epoch_order`, a shuffled
pass; :func:`sampled_order`, batches drawn with replacement), how a batch is made (:func:`augmented`: gather,
hook, augment) and its step (:func:`descent_step`, or its own); the loop adds every step's loss and accuracy
to :class:`DeviceTotals` on the device.

GPU speed levers, each off on the CPU unless asked for (the CPU path's numbers stay as they were):
- static shapes: ``last_batch="drop"`` or ``"pad"`` makes every step the same shape (a compiled model or a
  CUDA graph then never meets a second shape); the default ``"keep"`` trains on the last partial batch as
  a DataLoader does. Either way a batch of another size than ``batch_size`` runs without cudnn autotuning
  (:func:`utils.device.no_autotune`): tuning every convolution for a shape met once per epoch costs more
  than it saves.
- no host synchronisation per step: loss and accuracy accumulate on the device, read once per epoch.
- ``compile_model(model, mode)``: ``torch.compile`` with a selectable mode ("reduce-overhead" replays CUDA
  graphs); off by default everywhere until measured on a GPU (``benchmarks/gpu_check.sh`` measures it).
- ``sgd_with_schedule`` takes the fused SGD kernel when the parameters are on CUDA (one kernel for all
  parameters instead of several per tensor); on the CPU the plain loop, as before.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .device import no_autotune

LAST_BATCHES = ("keep", "drop", "pad")
# torch.compile modes by name; "off" runs eagerly. "default" fuses kernels; "reduce-overhead" also replays
# CUDA graphs (launch-bound steps gain most); the max-autotune modes search kernels (minutes of compilation).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def epoch_order(num: int, batch_size: int, device, generator: torch.Generator | None = None,
                last_batch: str = "keep") -> list[torch.Tensor]:
    """One shuffled pass over ``num`` items as index batches on ``device`` (one host-to-device copy).

    ``keep``: the last batch may be smaller (a DataLoader's default); ``drop``: a last partial batch is left
    out (when there is a full batch at all); ``pad``: it is filled up with the pass's first indices, so
    those few items are seen twice in this epoch. The permutation drawn is the same in every mode.
    """
    if last_batch not in LAST_BATCHES:
        raise ValueError(f"last_batch must be one of {LAST_BATCHES}, got {last_batch!r}")
    order = torch.randperm(num, generator=generator)
    short = num % batch_size
    if short and num > batch_size and last_batch == "drop":
        order = order[:num - short]
    elif short and last_batch == "pad":
        need = batch_size - short
        order = torch.cat([order, order.repeat(-(-need // num))[:need]])
    return list(order.to(device).split(batch_size))


def sampled_order(num: int, batch_size: int, count: int, device, generator: torch.Generator | None = None,
                  chunk: int = 500) -> Iterator[torch.Tensor]:
    """``count`` index batches drawn with replacement (ANP's ``RandomSampler(replacement=True)``), lazily.

    With a generator of its own, ``chunk`` batches are drawn at once and moved to the device in one copy: the
    same numbers as one draw per batch, without a host synchronisation per batch (a blocking copy to the GPU
    waits for the GPU to get there). Without one, each batch is drawn from the global RNG when it is asked
    for, as the draws of the step before it (perturbation, augmentation) come from that RNG too.
    """
    for start in range(0, count, chunk if generator is not None else 1):
        if generator is None:
            yield torch.randint(0, num, (batch_size,)).to(device)
            continue
        drawn = torch.randint(0, num, (min(chunk, count - start), batch_size), generator=generator).to(device)
        yield from drawn


class DeviceTotals:
    """Running loss and accuracy sums kept on the device: adding a batch queues two small kernels and never
    waits for the device; :meth:`means` reads both sums in one host synchronisation.

    ``mean_over="samples"``: each batch's (mean) loss weighs its size, the loss of a pass over the data;
    ``"batches"``: the mean of the batches' losses (ANP's report). ``dtype`` of the loss sum: float64 gives
    the sums Python floats would.
    """

    def __init__(self, device, dtype: torch.dtype = torch.float32, mean_over: str = "samples"):
        if mean_over not in ("samples", "batches"):
            raise ValueError(f"mean_over must be samples or batches, got {mean_over!r}")
        self.loss = torch.zeros((), device=device, dtype=dtype)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.per_sample = mean_over == "samples"
        self.seen = 0
        self.batches = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = loss.detach().to(self.loss.dtype)
        self.loss += loss * len(labels) if self.per_sample else loss
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)
        self.batches += 1

    def means(self) -> tuple[float, float]:
        """``(mean loss, accuracy)`` so far (one host synchronisation)."""
        loss, correct = torch.stack([self.loss.double(), self.correct.double()]).tolist()
        return loss / max(self.seen if self.per_sample else self.batches, 1), correct / max(self.seen, 1)


def augmented(images: torch.Tensor, labels: torch.Tensor, augment: Callable, batch_hook: Callable | None = None,
              model: torch.nn.Module | None = None) -> Callable:
    """The usual ``make_batch`` of :func:`run_batches`: ``images[idx]``, ``labels[idx]`` (both on the device),
    ``batch_hook(model, images, labels, idx) -> (images, labels)`` when given, then ``augment``."""
    def make_batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = images[idx], labels[idx]
        if batch_hook is not None:
            x, y = batch_hook(model, x, y, idx)
        return augment(x), y
    return make_batch


def descent_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, autocast,
                 loss_fn: Callable = F.cross_entropy, forward: Callable | None = None,
                 after_step: Callable[[], None] | None = None) -> Callable:
    """The usual ``step`` of :func:`run_batches`: ``loss_fn(forward(x), y)`` under autocast (``forward``:
    the model by default), a gradient step on it, then ``after_step()`` (e.g. clipping masks to [0, 1]).
    Returns ``(loss, logits)``."""
    forward = forward or model

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            logits = forward(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        return loss, logits
    return step


def run_batches(order: Iterable[torch.Tensor], make_batch: Callable, step: Callable, totals: DeviceTotals, *,
                batch_size: int | None = None, mark_steps: bool = False, until: Callable[[], bool] | None = None,
                progress: bool = False, desc: str = "") -> DeviceTotals:
    """The training loop of every stage: for each index batch ``idx`` of ``order``, ``x, y = make_batch(idx)``
    (gather and augment on the device), ``step(x, y) -> (loss, logits)`` (the update; None: the batch does not
    count), ``totals.add(loss, logits, y)``; stops early once ``until()`` is true after a batch. Returns
    ``totals`` (nothing read on the host here).

    ``order`` is consumed lazily (:func:`sampled_order` may draw from the global RNG between steps). A batch of
    another size than ``batch_size`` runs without cudnn autotuning (:func:`utils.device.no_autotune`);
    ``mark_steps`` marks each step as new for CUDA graphs (:func:`uses_cuda_graphs`).
    """
    for idx in tqdm(order, desc=desc, leave=False, disable=not progress):
        with no_autotune(batch_size is not None and len(idx) != batch_size):
            if mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            x, y = make_batch(idx)
            result = step(x, y)
        if result is not None:
            totals.add(*result, y)
        if until is not None and until():
            break
    return totals


def train_epoch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: Callable,
                optimizer: torch.optim.Optimizer, batch_size: int, autocast, generator: torch.Generator | None = None,
                progress: bool = True, desc: str = "train", batch_hook: Callable | None = None,
                last_batch: str = "keep") -> tuple[float, float]:
    """Shuffle, (hook,) augment, step. Returns mean loss and accuracy; accumulates on the device (one sync).

    ``batch_hook(model, images, labels, batch_index) -> (images, labels)`` may change a batch before
    augmentation (attacks that poison per batch or train a trigger generator with the classifier).
    ``last_batch``: see :func:`epoch_order` (``keep`` by default: the numbers of every earlier run).
    """
    model.train()
    device = images.device
    totals = run_batches(epoch_order(len(labels), batch_size, device, generator, last_batch),
                         augmented(images, labels, augment, batch_hook, model),
                         descent_step(model, optimizer, autocast), DeviceTotals(device), batch_size=batch_size,
                         mark_steps=uses_cuda_graphs(model, device), progress=progress, desc=desc)
    return totals.means()


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs through torch.compile (``model.compile()`` in place, or ``torch.compile(model)``)."""
    return getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_orig_mod")


def uses_cuda_graphs(model: torch.nn.Module, device) -> bool:
    """A compiled model on CUDA, whose CUDA graphs (``reduce-overhead``) need each step marked as new
    (``torch.compiler.cudagraph_mark_step_begin``; harmless for the other modes)."""
    return torch.device(device).type == "cuda" and is_compiled(model)


def compile_model(model: torch.nn.Module, mode: str = "off", backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` the model in place (same module, parameters and state_dict keys) with one of
    :data:`COMPILE_MODES`; ``off`` leaves it eager. Compilation happens at the first call (per new shape:
    see ``last_batch``). ``backend``: torch.compile's (tests use ``aot_eager``, which needs no compiler)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode != "off":
        model.compile(backend=backend, **({} if mode == "default" or backend != "inductor" else {"mode": mode}))
    return model


def sgd_with_schedule(model: torch.nn.Module, lr: float, milestones: list[int]):
    """The original tools' optimiser: SGD (momentum 0.9, weight decay 5e-4), lr ÷10 at ``milestones``.
    Fused into one kernel when every parameter is on CUDA; on the CPU the same loop as before."""
    params = list(model.parameters())
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, **({"fused": True} if fused else {}))
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
