"""Console + ``output.log`` logging and the per-run ``metrics.json``."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

from .checkpoint import atomic_write_text
from .device import make_runtime, seed_everything


class RunLog:
    """Print a line and append it to ``output.log`` in the run directory."""

    def __init__(self, output_dir: str, filename: str = "output.log"):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, filename)
        self._file = open(self.path, "a", buffering=1)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


def start_run(args, output_dir: str):
    """Common start of every script: runtime, seeds, the run folder and its log (first line: the command)."""
    runtime = make_runtime(args.device, args.amp)
    seed_everything(args.seed)
    log = RunLog(output_dir)
    log(f"# {run_metadata(args, runtime)['command']}")
    return runtime, log


def run_metadata(args, runtime=None) -> dict:
    return {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seed": getattr(args, "seed", None),
        "device": str(runtime.device) if runtime is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_metrics(path: str, metrics: dict) -> None:
    atomic_write_text(json.dumps(metrics, indent=2, default=str) + "\n", path)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
