"""The one place that decides device, seeding, autocast, channels_last, cudnn.benchmark, the evaluation batch
size and the host allocator's settings."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import OptionError


@dataclass
class Runtime:
    device: torch.device
    amp: bool  # bf16 autocast (CUDA only; CPU runs plain fp32)
    channels_last: bool

    def autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def pick_device(name: str = "auto") -> torch.device:
    """``--device``: ``auto`` takes CUDA when available; a one-line error for anything else unusable."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise OptionError("device", f"expected auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device", f"CUDA is not available on this machine for {name!r} (use cpu or auto)")
    return torch.device(name)


def make_runtime(name: str = "auto", amp: bool = True) -> Runtime:
    """``auto`` takes CUDA when available. bf16 autocast and channels_last only on CUDA: the CPU computes
    in fp32 and NCHW, so a seeded CPU run gives the numbers it gave before. (On this project's 2-core CPU
    channels_last makes a width-16 ResNet-18 training step 1.25x faster, but it changes the rounding, and
    ANP's masks on a width-4 model after 60 iterations move (one from 0.37 to 0.96); evaluation, where the
    rounding moves the metrics by less than 1e-4, runs channels_last everywhere: :mod:`utils.incremental`.)"""
    device = pick_device(name)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    else:
        keep_freed_host_memory()
    return Runtime(device=device, amp=on_cuda and amp, channels_last=on_cuda)


# glibc's malloc serves blocks above its mmap threshold with fresh pages and gives freed memory at the top of
# the heap back to the OS beyond its trim threshold. A CPU forward or backward pass allocates activations of
# several MB per layer, so with the defaults every step page-faults its memory in again. Serving blocks up
# to 32 MiB (glibc's maximum) from the heap and keeping up to 1 GiB of freed memory makes a width-16
# ResNet-18 training step 13 % faster on this project's 2-core CPU, with bitwise the same numbers.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 32 << 20, 1 << 30


@functools.lru_cache(maxsize=None)
def keep_freed_host_memory() -> bool:
    """Set glibc's malloc to reuse freed memory instead of returning it to the OS (once per process);
    False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD_BYTES))


@contextlib.contextmanager
def no_autotune(active: bool = True):
    """cudnn's heuristics instead of its autotuning (``cudnn.benchmark``) for the work inside, when
    ``active``: for a shape met once or twice, e.g. an epoch's last partial batch, benchmarking every
    convolution's algorithms costs more than it saves (on an H200, RNP's first unlearning epoch took 7.8 s
    for 600 images, later ones 0.1 s). Full batches keep the tuned algorithms. Nothing changes on the CPU."""
    if not (active and torch.backends.cudnn.benchmark):
        yield
        return
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = True


# Evaluation batch sizes. On the CPU, batches of 128 (the original tools' size) evaluate both Fashion-MNIST
# test sets with a width-8 ResNet-18 in 4.1 s against 4.8 s in batches of 1000 with one thread (equal with
# two), with the same logits: each image's forward is independent in eval mode. On CUDA large batches fill
# the GPU.
CPU_EVAL_BATCH = 128
CUDA_EVAL_BATCH = 1024


def eval_batch_size(device) -> int:
    """Images per evaluation forward on ``device`` (:mod:`utils.evaluation`, :mod:`utils.incremental`)."""
    return CUDA_EVAL_BATCH if torch.device(device).type == "cuda" else CPU_EVAL_BATCH


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
