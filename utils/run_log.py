"""Console + ``output.log`` logging and the per-run ``metrics.json``."""
from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time

import torch

from .checkpoint import atomic_write_text
from .device import make_runtime, seed_everything


class RunLog:
    """Print a line and add it to ``output.log`` in the run directory.

    Every call rewrites the whole log atomically (temporary file, then rename), so an interrupted run
    never leaves a half-written line; logs are a few hundred lines, so this costs nothing. A log that
    is already there is kept and continued, as the original tools' append mode does (ANP's stages 2
    and 3 share one folder).
    """

    def __init__(self, output_dir: str, filename: str = "output.log"):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, filename)
        self._text = ""
        if os.path.isfile(self.path):
            with open(self.path, errors="replace") as f:
                self._text = f.read()
            if self._text and not self._text.endswith("\n"):
                self._text += "\n"

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self._text += line + "\n"
        atomic_write_text(self._text, self.path)

    def close(self) -> None:
        """Nothing is held open; kept so scripts can say where a run's log ends."""


def start_run(args, output_dir: str, runtime=None):
    """Common start of every stage: runtime, seeds, the run folder and its log (first line: the command).
    ``args``: the run's options as a mapping (or a namespace) with ``device``, ``amp`` and ``seed``."""
    values = _values(args)
    runtime = runtime or make_runtime(values["device"], values["amp"])
    seed_everything(values["seed"])
    log = RunLog(output_dir)
    log(f"# {run_metadata(args, runtime)['command']}")
    return runtime, log


def _values(args) -> dict:
    return dict(args) if isinstance(args, dict) else dict(vars(args))


def run_metadata(args, runtime=None) -> dict:
    """The command line, every option (``args``: a mapping or a namespace), versions, seed, device, memory."""
    values = _values(args)
    return {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "args": values,
        "versions": library_versions(),
        "code_version": code_version(),
        "seed": values.get("seed"),
        "device": str(runtime.device) if runtime is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "peak_memory_mib": peak_memory_mib(runtime),
    }


def library_versions() -> dict:
    import numpy
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__}


@functools.lru_cache(maxsize=None)
def code_version() -> str | None:
    """The checkout's git commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd):
        return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def peak_memory_mib(runtime=None) -> dict:
    """Peak memory of this process so far (one process per stage): host RSS, and CUDA allocations on a GPU."""
    import resource

    peak = {"host": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if runtime is not None and runtime.device.type == "cuda":
        peak["cuda"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2 ** 20, 1)
    return peak


def write_metrics(path: str, metrics: dict) -> None:
    atomic_write_text(json.dumps(metrics, indent=2, default=str) + "\n", path)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
