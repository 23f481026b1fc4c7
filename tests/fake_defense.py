"""A stand-in defense for the executor tests: registered as ``fake`` when the registry imports this module
(``BACKDOOR_DEFENSES=fake_defense``, which grid workers inherit). Its run sleeps a moment and writes which GPU,
process and thread count its worker was given into ``metrics.json``, as a real defense writes its metrics."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from defenses.registry import DefenseInputs, register
from utils.options import option

NAME = "fake"


@dataclass
class FakeConfig:
    sleep: float = option(0.3, "seconds the run takes (long enough that a pool hands cells to different workers)")


@register(NAME, FakeConfig, steps=("run",), prunes=False, summary="writes where it ran (tests only)",
          timings={"run": ("run_seconds",)})
def run(config: FakeConfig, inputs: DefenseInputs) -> dict:
    time.sleep(config.sleep)
    metrics = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
               "threads": os.environ.get("OMP_NUM_THREADS"), "timings": {"run_seconds": config.sleep}}
    os.makedirs(inputs.output_dir, exist_ok=True)
    with open(os.path.join(inputs.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    return metrics
