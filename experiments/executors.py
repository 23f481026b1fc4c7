"""Where cells run: this process (or a pool of local subprocesses), one worker per visible GPU, or Slurm.

Every executor takes a list of independent cells (one wave of the grid) and calls ``on_done(result)``
as each finishes; the results themselves are the cells' directories, so a grid can be resubmitted
after failures. No scheduler of our own: a process pool from the standard library, or submitit.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from utils.errors import UserError

from .cells import run_cell

EXECUTORS = ("local", "local-gpus", "slurm")
SUBMITIT_PIN = "submitit==1.5.4"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker_signals() -> None:
    """A worker leaves Ctrl-C to the grid (which stops it) and dies with the grid on Linux, so an interrupted
    grid never leaves workers behind that go on writing into cell folders."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _init_cpu_worker(threads: int) -> None:
    import torch

    _worker_signals()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _init_gpu_worker(gpu_ids) -> None:
    _worker_signals()
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get())  # before this worker touches CUDA


def _failed(cell: dict, error: str) -> dict:
    return {"id": cell["id"], "ok": False, "seconds": 0.0, "error": error}


def _run_pool(cells: list[dict], on_done: Callable[[dict], None], workers: int, initializer, initargs) -> None:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: safe with CUDA
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer,
                               initargs=initargs(context))
    try:
        futures = {pool.submit(run_cell, cell): cell for cell in cells}
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                result = _failed(futures[future], "its worker process died (killed, out of memory?)")
            except Exception as err:  # noqa: BLE001 - e.g. the cell could not be sent to the worker
                result = _failed(futures[future], f"{type(err).__name__}: {err}")
            on_done(result)
    except BaseException:  # Ctrl-C or an error of the grid itself: stop the running cells now
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class LocalExecutor:
    """Cells one after another in this process (``jobs`` 1), or ``jobs`` subprocesses, the CPU's cores
    shared out between them (on 2 cores two jobs of one thread each beat one job of two threads)."""

    def __init__(self, jobs: int = 1, threads: int | None = None):
        self.jobs = jobs
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)

    def describe(self) -> str:
        return "this process" if self.jobs == 1 else f"{self.jobs} local processes, {self.threads} thread(s) each"

    @property
    def parallel(self) -> int:
        return self.jobs

    def run(self, cells: list[dict], on_done: Callable[[dict], None]) -> None:
        if self.jobs == 1:
            for cell in cells:
                on_done(run_cell(cell))
        else:
            _run_pool(cells, on_done, self.jobs, _init_cpu_worker, lambda _: (self.threads,))


class LocalGPUExecutor:
    """One worker per visible GPU (``CUDA_VISIBLE_DEVICES``, else every GPU torch sees)."""

    def __init__(self):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            self.gpus = [g.strip() for g in visible.split(",") if g.strip()]
        else:
            import torch

            self.gpus = [str(i) for i in range(torch.cuda.device_count())]
        if not self.gpus:
            raise UserError("--executor local-gpus: no GPU is visible (CUDA_VISIBLE_DEVICES / torch.cuda)")

    def describe(self) -> str:
        return f"one worker per GPU ({', '.join(self.gpus)})"

    @property
    def parallel(self) -> int:
        return len(self.gpus)

    def run(self, cells: list[dict], on_done: Callable[[dict], None]) -> None:
        def initargs(context):
            queue = context.SimpleQueue()
            for gpu in self.gpus:
                queue.put(gpu)
            return (queue,)

        _run_pool(cells, on_done, len(self.gpus), _init_gpu_worker, initargs)


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(f"--executor slurm needs submitit: pip install {SUBMITIT_PIN}") from None
    return submitit


class SlurmExecutor:
    """A Slurm job array per wave through submitit (``cluster: local`` runs the same path as local
    subprocesses, for tests and for trying a grid before submitting it)."""

    def __init__(self, folder: str, options: dict, name: str):
        self.submitit = import_submitit()
        self.options, self.folder = options, folder
        cluster = options.get("cluster") or "slurm"
        self.executor = self.submitit.AutoExecutor(folder=folder, cluster=cluster)
        parameters = {"timeout_min": int(options["time_min"]), "name": name}
        if cluster == "slurm":
            parameters.update(slurm_array_parallelism=int(options["array_parallelism"]),
                              gpus_per_node=int(options["gpus_per_task"]),
                              cpus_per_task=int(options["cpus_per_task"]))
            if options.get("partition"):
                parameters["slurm_partition"] = options["partition"]
            if options.get("mem_gb"):
                parameters["mem_gb"] = options["mem_gb"]
            if options.get("additional_parameters"):
                parameters["slurm_additional_parameters"] = options["additional_parameters"]
        self.executor.update_parameters(**parameters)
        # A job's torch threads: its CPUs on Slurm; one each locally, where a wave's jobs all run at once.
        self.threads = int(options["cpus_per_task"]) if cluster == "slurm" else 1
        # The jobs import this repository's modules (the stage scripts, experiments.cells).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

    def describe(self) -> str:
        return f"submitit ({self.options.get('cluster') or 'slurm'}), logs in {self.folder}"

    @property
    def parallel(self) -> int:
        return int(self.options.get("array_parallelism") or 1)

    def run(self, cells: list[dict], on_done: Callable[[dict], None]) -> None:
        jobs = self.executor.map_array(functools.partial(run_cell, threads=self.threads), cells)
        by_job = {job.job_id: cell for job, cell in zip(jobs, cells)}
        try:
            for job in self.submitit.helpers.as_completed(jobs):
                try:
                    result = job.result()
                except Exception as err:  # noqa: BLE001 - the job died (time limit, node failure): others go on
                    first = str(err).strip().splitlines()
                    result = _failed(by_job[job.job_id], f"submitit job {job.job_id} failed: "
                                     f"{first[-1] if first else err}")
                on_done(result)
        except KeyboardInterrupt:  # a resubmission must not race jobs still writing into the same folders
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)
            raise


def make_executor(name: str, config, jobs: int | None = None):
    if name == "local":
        return LocalExecutor(jobs or config.jobs)
    if name == "local-gpus":
        return LocalGPUExecutor()
    if name == "slurm":
        return SlurmExecutor(os.path.join(config.output_dir, "submitit"), config.slurm, config.name)
    raise UserError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {name!r}")
