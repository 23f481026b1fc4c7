"""Where cells run: this process (or a pool of local subprocesses), several workers per visible GPU, or Slurm
(optionally several cells per job sharing the job's GPU).

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
from .config import EXECUTOR_NAMES as EXECUTORS
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


def _init_gpu_worker(gpu_ids, threads: int | None = None) -> None:
    _worker_signals()
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get())  # before this worker touches CUDA
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# Several cells share one GPU: the stage loops are launch-bound (a ResNet-18 step at width 64 leaves an
# H200 mostly idle), so cells side by side do more work per second; on the H200, five cells at once did
# 3.3x the work of one. Default cells per GPU: its memory over PER_CELL_GIB (training a width-64 ResNet-18
# at batch 512 in bf16 peaked at 1.5 GiB there; with a cell's CUDA context, about 0.5 GiB, and its resident
# uint8 data, about 2 GiB; twice that as margin), at most one per CPU core of the GPU's share of the machine
# (a cell's Python thread launches its kernels), and at most MAX_CELLS_PER_GPU (a guess, not measured: past
# a few cells they mostly queue for the GPU).
PER_CELL_GIB = 4.0
MAX_CELLS_PER_GPU = 8


def default_cells_per_gpu(total_memory_bytes: int, cpus_per_gpu: int) -> int:
    """Cells that fit one GPU of ``total_memory_bytes`` with ``cpus_per_gpu`` CPU cores beside it (>= 1)."""
    by_memory = int(total_memory_bytes // int(PER_CELL_GIB * (1 << 30)))
    return max(1, min(by_memory, max(1, cpus_per_gpu), MAX_CELLS_PER_GPU))


def gpu_memory_bytes(index: int) -> int:
    """Total memory of the ``index``-th visible CUDA device (reads its properties; allocates nothing)."""
    import torch

    return int(torch.cuda.get_device_properties(index).total_memory)


def check_cells_per_gpu(value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise UserError(f"--cells-per-gpu: expected a positive number, got {value!r}")


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
    """``cells_per_gpu`` workers per visible GPU (``CUDA_VISIBLE_DEVICES``, else every GPU torch sees): each
    worker holds one GPU through ``CUDA_VISIBLE_DEVICES``, so that many cells share each card. Default per
    GPU: :func:`default_cells_per_gpu` of the smallest visible GPU's memory."""

    def __init__(self, cells_per_gpu: int | None = None):
        check_cells_per_gpu(cells_per_gpu)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            self.gpus = [g.strip() for g in visible.split(",") if g.strip()]
        else:
            import torch

            self.gpus = [str(i) for i in range(torch.cuda.device_count())]
        if not self.gpus:
            raise UserError("--executor local-gpus: no GPU is visible (CUDA_VISIBLE_DEVICES / torch.cuda)")
        cpus_per_gpu = max(1, (os.cpu_count() or 1) // len(self.gpus))
        if cells_per_gpu is None:
            smallest = min(gpu_memory_bytes(i) for i in range(len(self.gpus)))
            cells_per_gpu = default_cells_per_gpu(smallest, cpus_per_gpu)
            self.chosen = f"{cells_per_gpu} per GPU from its {smallest / (1 << 30):.0f} GiB"
        else:
            self.chosen = f"{cells_per_gpu} per GPU (--cells-per-gpu)"
        self.cells_per_gpu = cells_per_gpu
        # Each worker's CPU threads: its share of the cores (a GPU cell needs few).
        self.threads = max(1, cpus_per_gpu // cells_per_gpu)

    def describe(self) -> str:
        return f"{self.parallel} workers on GPU(s) {', '.join(self.gpus)}: {self.chosen}"

    @property
    def parallel(self) -> int:
        return len(self.gpus) * self.cells_per_gpu

    def slots(self) -> list[str]:
        """One GPU id per worker, the GPUs taken in turn (fewer workers than slots still spread out)."""
        return [gpu for _ in range(self.cells_per_gpu) for gpu in self.gpus]

    def run(self, cells: list[dict], on_done: Callable[[dict], None]) -> None:
        def initargs(context):
            queue = context.SimpleQueue()
            for gpu in self.slots():
                queue.put(gpu)
            return (queue, self.threads)

        _run_pool(cells, on_done, self.parallel, _init_gpu_worker, initargs)


def run_cell_group(cells: list[dict], threads: int | None = None) -> list[dict]:
    """Several cells at once inside one batch job that holds a whole GPU (they share it): one subprocess
    each, ``threads`` CPU threads each. One cell runs in this process. Never raises for a failing cell."""
    if len(cells) == 1:
        return [run_cell(cells[0], threads=threads)]
    results = []
    _run_pool(cells, results.append, len(cells), _init_cpu_worker, lambda _: (threads or 1,))
    return results


def groups(cells: list[dict], size: int) -> list[list[dict]]:
    """``cells`` in consecutive groups of at most ``size``."""
    return [cells[i:i + size] for i in range(0, len(cells), size)]


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(f"--executor slurm needs submitit: pip install {SUBMITIT_PIN}") from None
    return submitit


class SlurmExecutor:
    """A Slurm job array per wave through submitit (``cluster: local`` runs the same path as local
    subprocesses, for tests and for trying a grid before submitting it)."""

    def __init__(self, folder: str, options: dict, name: str, cells_per_gpu: int | None = None):
        check_cells_per_gpu(cells_per_gpu)
        self.submitit = import_submitit()
        self.options, self.folder = options, folder
        cluster = options.get("cluster") or "slurm"
        # Several cells per job only where a job holds a whole GPU of its own (gpus_per_task >= 1).
        self.cells_per_job = int(cells_per_gpu or 1)
        if self.cells_per_job > 1 and int(options.get("gpus_per_task") or 0) < 1:
            raise UserError("--cells-per-gpu: the config's slurm.gpus_per_task is 0; several cells per job share "
                            "the job's GPU, so give each job one")
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
        # A job's torch threads: its CPUs on Slurm (shared out between its cells); one each locally, where a
        # wave's jobs all run at once.
        self.threads = max(1, int(options["cpus_per_task"]) // self.cells_per_job) if cluster == "slurm" else 1
        # The jobs import this repository's modules (the stage scripts, experiments.cells).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

    def describe(self) -> str:
        per_job = f", {self.cells_per_job} cells per job sharing its GPU" if self.cells_per_job > 1 else ""
        return f"submitit ({self.options.get('cluster') or 'slurm'}){per_job}, logs in {self.folder}"

    @property
    def parallel(self) -> int:
        return int(self.options.get("array_parallelism") or 1) * self.cells_per_job

    def run(self, cells: list[dict], on_done: Callable[[dict], None]) -> None:
        if self.cells_per_job > 1:  # one array task per group of cells, which share the task's GPU
            work = groups(cells, self.cells_per_job)
            jobs = self.executor.map_array(functools.partial(run_cell_group, threads=self.threads), work)
        else:
            work = [[cell] for cell in cells]
            jobs = self.executor.map_array(functools.partial(run_cell, threads=self.threads), cells)
        by_job = {job.job_id: group for job, group in zip(jobs, work)}
        try:
            for job in self.submitit.helpers.as_completed(jobs):
                try:
                    result = job.result()
                    results = result if isinstance(result, list) else [result]
                except Exception as err:  # noqa: BLE001 - the job died (time limit, node failure): others go on
                    first = str(err).strip().splitlines()
                    results = [_failed(cell, f"submitit job {job.job_id} failed: {first[-1] if first else err}")
                               for cell in by_job[job.job_id]]
                for result in results:
                    on_done(result)
        except KeyboardInterrupt:  # a resubmission must not race jobs still writing into the same folders
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)
            raise


def make_executor(name: str, config, jobs: int | None = None, cells_per_gpu: int | None = None):
    cells_per_gpu = cells_per_gpu or getattr(config, "cells_per_gpu", None)
    if name == "local":
        return LocalExecutor(jobs or config.jobs)
    if name == "local-gpus":
        return LocalGPUExecutor(cells_per_gpu)
    if name == "slurm":
        return SlurmExecutor(os.path.join(config.output_dir, "submitit"), config.slurm, config.name, cells_per_gpu)
    raise UserError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {name!r}")
