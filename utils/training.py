"""Supervised training over in-memory uint8 images (batched augmentation on the device).

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

from typing import Callable

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
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0  # a hook may add images to a batch (semantic attacks)
    mark_step = uses_cuda_graphs(model, device)
    for idx in tqdm(epoch_order(len(labels), batch_size, device, generator, last_batch), desc=desc, leave=False,
                    disable=not progress):
        with no_autotune(len(idx) != batch_size):
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            x, y = images[idx], labels[idx]
            if batch_hook is not None:
                x, y = batch_hook(model, x, y, idx)
            x = augment(x)
            with autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return total_loss.item() / max(seen, 1), correct.item() / max(seen, 1)


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
