"""Run a table: a grid of attacks × defenses × operating rules × seeds from one config file.

    python3 reproduce.py --config configs/fmnist_cpu.yaml               # run (resumes), then report
    python3 reproduce.py --config configs/fmnist_cpu.yaml --dry-run     # list the cells and their state
    python3 reproduce.py --config configs/fmnist_cpu.yaml --report      # aggregate what is there
    python3 reproduce.py --config configs/anp_paper.yaml --executor slurm
    python3 reproduce.py --config configs/fmnist_gpu.yaml --executor local-gpus --cells-per-gpu 6
    python3 reproduce.py --config configs/anp_paper.yaml --dataset fashion-mnist --seeds 0 1 2 --only badnets,blend

Every cell is one stage (stage 1's training or a registered defense, called with its typed config, as the
scripts call it) in its own folder under the config's output_dir
(``attack/seedS/model``, ``attack/seedS/defense/dseedD/rule``); a cell whose metrics.json parses is
done, so an interrupted grid resumes where it stopped. The report writes results.csv, table.md and
plots/ there.
"""
from __future__ import annotations

import os
import signal
import sys

from experiments.config import load_config
from experiments.executors import EXECUTORS, make_executor
from experiments.grid import plan_states, run_grid, select
from experiments.plans import plan
from experiments.report import write_report
from utils.errors import ArgumentParser, UserError
from utils.run_log import RunLog


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Run a grid of attacks x defenses x seeds and report distributions.")
    p.add_argument("--config", required=True, help="the grid (configs/*.yaml)")
    p.add_argument("--executor", default=None, choices=EXECUTORS,
                   help="local: this machine (--jobs cells at once); local-gpus: --cells-per-gpu workers per "
                        "visible GPU; slurm: job arrays through submitit (the config's slurm: options) "
                        "(default: the config's executor, else local)")
    p.add_argument("--cells-per-gpu", type=int, default=None,
                   help="with --executor local-gpus: cells sharing each GPU (default: the config's cells_per_gpu, "
                        "else from the GPU's memory, about 4 GiB a cell, at most 8); with slurm: cells per job, "
                        "sharing the job's GPU (default 1)")
    p.add_argument("--jobs", type=int, default=None, help="with --executor local: cells at once (default: the "
                   "config's jobs, else 1); the CPU's cores are shared out between them")
    p.add_argument("--only", action="append", default=None, metavar="PATTERNS",
                   help="run only the cells matching these comma-separated globs on the cell id or its parts "
                        "(e.g. --only badnets --only anp,rnp); the cells they need run too")
    p.add_argument("--dry-run", action="store_true", help="list the cells, their state and command; run nothing")
    p.add_argument("--report", action="store_true", help="only aggregate the cells that are done")
    overrides = p.add_argument_group("overrides of the config's keys")
    overrides.add_argument("--dataset", default=None)
    overrides.add_argument("--data-dir", default=None)
    overrides.add_argument("--width", type=int, default=None)
    overrides.add_argument("--device", default=None)
    overrides.add_argument("--seeds", type=int, nargs="+", default=None)
    overrides.add_argument("--defense-seeds", type=int, nargs="+", default=None)
    overrides.add_argument("--output-dir", default=None)
    overrides.add_argument("--epoch", type=int, default=None,
                           help="stage 1's epochs for every attack (e.g. a short CPU check of a GPU config; give it "
                                "its own --output-dir)")
    overrides.add_argument("--schedule", type=int, nargs="+", default=None,
                           help="stage 1's lr drops for every attack (with --epoch)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(args) -> int:
    if args.jobs is not None and args.jobs <= 0:
        raise UserError(f"--jobs: expected a positive number, got {args.jobs}")
    if args.cells_per_gpu is not None and args.cells_per_gpu <= 0:
        raise UserError(f"--cells-per-gpu: expected a positive number, got {args.cells_per_gpu}")
    config = load_config(args.config, {"dataset": args.dataset, "data_dir": args.data_dir, "width": args.width,
                                       "device": args.device, "seeds": args.seeds,
                                       "defense_seeds": args.defense_seeds, "output_dir": args.output_dir},
                         train_overrides={"epoch": args.epoch, "schedule": args.schedule})
    executor_name = args.executor or config.executor or "local"
    if args.jobs is not None and executor_name != "local":
        raise UserError(f"--jobs: only with --executor local (--executor {executor_name} decides its own workers)")
    if args.cells_per_gpu is not None and executor_name == "local":
        raise UserError("--cells-per-gpu: only with --executor local-gpus or slurm (local runs --jobs cells at once)")
    cells = plan(config)
    if args.report:
        print(write_report(config, cells))
        print(f"\nwrote {os.path.join(config.output_dir, 'results.csv')}, table.md and plots/")
        return 0
    chosen = select(cells, args.only)
    if args.dry_run:
        states = plan_states(chosen)
        for cell in chosen:
            state, why = states[cell.id]
            print(f"{state:8} {cell.id}" + (f"  ({why})" if why else ""))
            print(f"         {cell.command()}")
        counts = {s: sum(1 for v in states.values() if v[0] == s)
                  for s in ("done", "todo", "corrupt", "stale", "rerun")}
        print(f"{len(chosen)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        return 0
    executor = make_executor(executor_name, config, args.jobs, args.cells_per_gpu)
    # Ctrl-C, kill -INT (even from a background shell, which ignores it by default) and kill -TERM (a batch
    # system's stop) all end the grid the same way: running cells stopped, finished ones kept.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    log = RunLog(config.output_dir, "grid.log")
    log(f"# {' '.join(['reproduce.py'] + sys.argv[1:])}")
    try:
        summary = run_grid(chosen, executor, log)
    except KeyboardInterrupt:
        log("interrupted: the running cells were stopped, finished ones are kept (each cell's metrics.json is "
            "written last); the same command runs the missing ones")
        return 130
    text = write_report(config, cells)
    log(f"report: {os.path.join(config.output_dir, 'table.md')}, results.csv, plots/")
    print("\n" + text)
    return 1 if summary["failed"] or summary["blocked"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except BrokenPipeError:  # e.g. --dry-run | head
        sys.stderr.close()
        os._exit(0)
