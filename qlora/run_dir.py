"""What `qlora train` does with the run folder it is given: start, resume, restart or refuse.

No state a crash can leave behind is a dead end:

- a folder with a complete checkpoint is resumed with `--resume`, or replaced with
  `--overwrite`; starting over without asking is refused, so no run is lost by a typo;
- a folder whose run stopped before its first checkpoint (a kill or crash while loading or
  in the first steps) holds only logs: `qlora train RECIPE` and `--resume` both start it
  over, after moving the old folder aside as `NAME.stopped-TIMESTAMP`;
- a damaged newest checkpoint (a truncated file) is skipped for the newest intact one.

Every process of a multi-process run decides from the same files (`plan_run_dir`, read
only), then the main process alone acts on the decision (`prepare`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from .errors import QloraError

# Files that say a folder is a qlora run (and so may be moved aside or replaced).
_RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "trainer_state.json", "adapter")


@dataclass(frozen=True)
class RunDirPlan:
    """The decision for one run folder."""
    action: str  # "new", "resume", "restart" (move the stopped run aside) or "overwrite"
    run_dir: Path
    checkpoint: Path | None = None  # resume: the newest intact checkpoint
    notes: tuple[str, ...] = ()  # lines to print (damaged checkpoints skipped, restarts)


def _is_run(run_dir: Path) -> bool:
    return any((run_dir / m).exists() for m in _RUN_MARKERS) or bool(ckpt.list_checkpoints(run_dir))


def plan_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> RunDirPlan:
    """Decide what to do with `run_dir`; raises QloraError (one line) when nothing safe is."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise QloraError(f"train.output_dir: {run_dir} is a file, not a folder")
    above = next((p for p in run_dir.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise QloraError(f"train.output_dir: {run_dir} lies under {above}, which is a file")
    busy = run_dir.is_dir() and any(run_dir.iterdir())
    if not busy:
        if resume:
            raise QloraError(f"{run_dir}: nothing to resume (the folder is empty or absent)")
        return RunDirPlan("new", run_dir)
    if overwrite:
        if resume:
            raise QloraError("give either --resume or --overwrite, not both")
        if not _is_run(run_dir):
            raise QloraError(f"train.output_dir: {run_dir} holds files that are not a qlora run; "
                             "--overwrite only replaces runs: choose another folder")
        return RunDirPlan("overwrite", run_dir, notes=(f"--overwrite: replacing the run in {run_dir}",))
    notes: list[str] = []
    intact = ckpt.resumable_checkpoint(run_dir, warn=notes.append)
    if resume and intact is not None:
        return RunDirPlan("resume", run_dir, intact, tuple(notes))
    if resume and intact is None and (run_dir / "adapter").exists():
        raise QloraError(f"{run_dir}: the run finished (adapter in {run_dir / 'adapter'}) and kept no "
                         "checkpoint to continue from; start over with --overwrite")
    if intact is not None or (run_dir / "adapter").exists():
        what = intact.name if intact is not None else "a final adapter"
        raise QloraError(f"train.output_dir: {run_dir} already holds a run ({what}); resume it with "
                         f"`qlora train --resume {run_dir}`, start over with --overwrite, "
                         "or choose another train.output_dir")
    if ckpt.list_checkpoints(run_dir):
        raise QloraError(f"{run_dir}: every checkpoint is damaged ({notes[-1]}); "
                         "start over with --overwrite")
    if not _is_run(run_dir):
        raise QloraError(f"train.output_dir: {run_dir} holds files that are not a qlora run; "
                         "choose another folder")
    aside = _aside_name(run_dir)
    return RunDirPlan("restart", run_dir, notes=(
        f"{run_dir} stopped before its first checkpoint, so there is nothing to resume; starting "
        f"it over (its files are kept in {aside})",))


def prepare(plan: RunDirPlan) -> None:
    """Act on the plan (main process only): move a stopped run aside, remove an overwritten one."""
    if plan.action == "restart":
        plan.run_dir.rename(_aside_name(plan.run_dir))
    elif plan.action == "overwrite":
        # Renamed first, so a kill during the removal leaves a hidden leftover, never a half run.
        doomed = plan.run_dir.with_name(f".{plan.run_dir.name}.removing-{os.getpid()}")
        plan.run_dir.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in plan.run_dir.parent.glob(f".{plan.run_dir.name}.removing-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # what a killed --overwrite left


def _aside_name(run_dir: Path) -> Path:
    # the folder's own modification time: every process computes the same name
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(run_dir.stat().st_mtime))
    aside, n = run_dir.with_name(f"{run_dir.name}.stopped-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.stopped-{stamp}-{n}")
    return aside
