"""Run a grid: choose the cells to run (missing, corrupt, stale, or downstream of one that reruns), hand
them to an executor wave by wave (models, then masks and the other defenses, then the operating rules),
print a progress line per cell and a summary. A failing cell blocks only the cells that need its output."""
from __future__ import annotations

import fnmatch
import time

from utils.errors import UserError
from utils.run_log import RunLog

from .cells import CELL_LOG, Cell, status


def _matches(cell: Cell, pattern: str) -> bool:
    parts = cell.id.split("/")
    return fnmatch.fnmatch(cell.id, pattern) or any(fnmatch.fnmatch(p, pattern) for p in parts)


def select(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """The cells every ``--only`` option matches (an option: comma-separated alternatives, each a glob on the
    cell id ``attack/seedS/defense/dseedD/masks|RULE|soda`` or on one of its parts), with the cells they depend on."""
    if not only:
        return list(cells)
    by_id = {c.id: c for c in cells}
    chosen = {c.id for c in cells
              if all(any(_matches(c, alt.strip()) for alt in option.split(",") if alt.strip()) for option in only)}
    if not chosen:
        raise UserError(f"--only {' --only '.join(only)}: no cell matches (cell ids look like {cells[0].id})")
    stack = list(chosen)
    while stack:
        for dep in by_id[stack.pop()].deps:
            if dep not in chosen:
                chosen.add(dep)
                stack.append(dep)
    return [c for c in cells if c.id in chosen]


def plan_states(cells: list[Cell]) -> dict[str, tuple[str, str]]:
    """Each cell's state: done, todo, corrupt, stale, or ``rerun`` (done, but an input of it reruns)."""
    states = {}
    for cell in cells:  # dependencies come first
        state, why = status(cell)
        if state == "done":
            rerun = [d for d in cell.deps if states.get(d, ("done",))[0] != "done"]
            if rerun:
                state, why = "rerun", f"its input {rerun[0]} reruns"
        states[cell.id] = (state, why)
    return states


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_grid(cells: list[Cell], executor, log: RunLog) -> dict:
    """Run what is not done; returns ``{"ran", "ok", "failed", "blocked", "skipped", "seconds", "failures"}``."""
    states = plan_states(cells)
    todo = [c for c in cells if states[c.id][0] != "done"]
    skipped = len(cells) - len(todo)
    for cell in todo:
        state, why = states[cell.id]
        if state in ("corrupt", "stale", "rerun"):
            log(f"cell {cell.id}: {why}; rerunning it")
    log(f"{len(cells)} cells: {skipped} already done, {len(todo)} to run on {executor.describe()}")
    start = time.perf_counter()
    failed: dict[str, str] = {}
    blocked: list[str] = []
    finished: dict[str, float] = {}
    stage_of = {c.id: c.stage for c in cells}
    remaining = {c.id: c for c in todo}

    def estimate() -> str:
        if not finished:
            return "estimate after the first cell"
        overall = sum(finished.values()) / len(finished)
        by_stage = {}
        for cell_id, seconds in finished.items():
            by_stage.setdefault(stage_of[cell_id], []).append(seconds)
        left = sum(sum(by_stage[c.stage]) / len(by_stage[c.stage]) if c.stage in by_stage else overall
                   for c in remaining.values())
        return f"about {_duration(left / max(1, executor.parallel))} left"

    def on_done(result: dict) -> None:
        cell = remaining.pop(result["id"])
        finished[cell.id] = result["seconds"]
        done = len(todo) - len(remaining)
        if result["ok"]:
            what = f"done {cell.id} ({_duration(result['seconds'])})"
        else:
            failed[cell.id] = result["error"]
            what = f"FAILED {cell.id}: {result['error']} (see {cell.directory}/{CELL_LOG})"
        log(f"[{done}/{len(todo)}] {what}; elapsed {_duration(time.perf_counter() - start)}, {estimate()}")

    for wave in sorted({c.wave for c in todo}):
        batch = []
        for cell in (c for c in todo if c.wave == wave):
            lost = [d for d in cell.deps if d in failed or d in blocked]
            if lost:
                blocked.append(cell.id)
                remaining.pop(cell.id)
                log(f"blocked {cell.id}: its input {lost[0]} did not finish")
            else:
                batch.append(cell)
        if batch:
            executor.run([c.to_dict() for c in batch], on_done)
    seconds = time.perf_counter() - start
    ok = len(todo) - len(failed) - len(blocked)
    log(f"summary: {len(cells)} cells, {skipped} already done, {ok} ran, {len(failed)} failed, {len(blocked)} "
        f"blocked; {_duration(seconds)}")
    for cell_id, error in failed.items():
        log(f"  failed {cell_id}: {error}")
    return {"ran": len(todo), "ok": ok, "failed": len(failed), "blocked": len(blocked), "skipped": skipped,
            "seconds": seconds, "failures": failed}
