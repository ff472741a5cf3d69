"""The run folder's lifecycle around the jobs that train it: locking, interrupted runs, picking a run up again.

- ``RunLock`` / ``is_locked``: one process trains a run folder at a time (``flock``, released if the process dies).
- ``mark_interrupted`` / ``interrupted_runs``: after a server (re)start, runs whose run.json still says
  created/loading/running but that no process holds are "interrupted", and their owner may resume them.
- ``open_for_resume`` / ``find_resume_point`` / ``prepare_resume``: only run folders this app wrote are resumed
  (``run.json`` must parse with the app's format, and only the folder's own ``training_state/`` is read, never a
  path the user names). A damaged newest state or checkpoint is skipped with a warning and the previous one is
  used; temporary files, and files of steps after the one resumed from, are removed, since the resumed run
  rewrites them. The state files themselves are ``trainer.runs.state``.

Who writes run.json here (the rule is in ``trainer.runs.folder``): these are lifecycle operations on a run that no
job is writing. ``mark_interrupted`` only touches runs no process holds the lock of; ``prepare_resume`` runs at the
start of a resumed job, under its lock and before the job's ``RunRecorder`` records anything. Both write through
``RunFolder.save``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from trainer.errors import UserError
from trainer.model import weights
from trainer.runs.folder import MANIFEST, RunFolder
from trainer.runs.state import (STATE_DIR, STATE_NAME, DamagedState, TrainingState, load_state, read_json,
                                state_files)

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LIVE_STATUSES = ("created", "loading", "running")  # after a server restart these mean "its process died"
INTERRUPTED = "interrupted"
INTERRUPTED_MESSAGE = "The server stopped while this run was training. Resume continues from its last checkpoint."
_TMP_NAME = re.compile(r"^\..+\.tmp$")  # fsutil.atomic_write_bytes' temporary files


@dataclass
class ResumePoint:
    step: int  # 0: nothing was saved, start from the beginning
    state: TrainingState | None
    warnings: list[str] = field(default_factory=list)


# ---- choosing where to resume -------------------------------------------------------------------------------

def open_for_resume(path: Path) -> RunFolder:
    """The run folder at ``path``, if it is one this app wrote and it can still be continued."""
    path = Path(path)
    manifest = path / MANIFEST
    not_ours = UserError(f"'{path}' is not a run folder written by this app (no valid {MANIFEST}); only runs "
                         "this app started can be resumed.")
    if not path.is_dir() or manifest.is_symlink() or not manifest.is_file():
        raise not_ours
    data = read_json(manifest, MANIFEST, error=not_ours)
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("config"), dict):
        raise not_ours
    run = RunFolder.open(path)  # strict: a mistyped or unknown setting is a UserError
    if run.status == "finished":
        raise UserError(f"The run in '{path.name}' already finished all {run.config.steps} steps; there is nothing "
                        "to resume. Start a new run to train longer.")
    for entry in run.set_entries():
        if not (path / entry["image"]).is_file():
            raise UserError(f"The run in '{path.name}' has lost its training image ({entry['image']}); it can't be "
                            "resumed.")
    return run


def find_resume_point(run: RunFolder) -> ResumePoint:
    """The newest step whose training state and checkpoint are both intact."""
    steps = sorted(_saved_steps(run), reverse=True)
    warnings: list[str] = []
    for step in steps:
        try:
            state = load_state(run, step)
            _check_checkpoint(run, step)
        except UserError as err:
            message = f"Skipping the save of step {step}: {err}"
            log.warning(message)
            warnings.append(message + " Using an earlier one.")
            continue
        return ResumePoint(step=step, state=state, warnings=warnings)
    if steps:
        raise UserError("None of this run's saved training states can be used (" + "; ".join(warnings) +
                        "). It can't be resumed; start a new run.")
    return ResumePoint(step=0, state=None,
                       warnings=["No checkpoint had been saved before the run stopped; it starts again from step 0."])


def prepare_resume(run: RunFolder) -> ResumePoint:
    """Pick the resume point and tidy the folder: drop temp files and everything after that step."""
    point = find_resume_point(run)
    _remove_after(run, point.step)
    for folder in (run.path, run.path / STATE_DIR, run.path / "samples"):
        if folder.is_dir():
            for f in folder.iterdir():
                if _TMP_NAME.match(f.name) and f.is_file():
                    f.unlink(missing_ok=True)
    run.checkpoints = [c for c in run.checkpoints if c.get("step", 0) <= point.step]
    if point.step and not any(c["step"] == point.step for c in run.checkpoints):  # killed before run.json had it
        run.note_checkpoint(point.step, run.checkpoint_path(point.step))
    run.save()
    return point


def has_previews(run: RunFolder, step: int) -> bool:
    for c in run.checkpoints:
        if c["step"] == step:
            return bool(c.get("previews")) and all((run.path / p["path"]).is_file() for p in c["previews"])
    return False


def _saved_steps(run: RunFolder) -> set[int]:
    steps = set()
    folder = run.path / STATE_DIR
    if folder.is_dir():
        for f in folder.iterdir():
            m = STATE_NAME.match(f.name)
            if m:
                steps.add(int(m.group(1)))
        steps |= {int(f.stem.split("-")[1]) for f in folder.glob("state-*.safetensors") if f.stem.split("-")[1].isdigit()}
    prefix = f"{run.config.name}-"
    for f in run.path.glob(f"{glob_escape(prefix)}*.safetensors"):
        tail = f.stem[len(prefix):]
        if tail.isdigit() and len(tail) >= 6:
            steps.add(int(tail))
    return {s for s in steps if s > 0}


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


def _check_checkpoint(run: RunFolder, step: int) -> None:
    path = run.checkpoint_path(step)
    if path.is_symlink() or not path.is_file():
        raise DamagedState(f"its checkpoint '{path.name}' is missing.")
    weights.load_lora(path)  # header cap, LoRA keys, finite values


def _remove_after(run: RunFolder, step: int) -> None:
    for s in _saved_steps(run):
        if s > step:
            for f in (run.checkpoint_path(s), *state_files(run.path, s)):
                f.unlink(missing_ok=True)
    samples = run.path / "samples"
    if samples.is_dir():
        prefix = f"{run.config.name}-"
        for f in samples.glob(f"{glob_escape(prefix)}*.png"):
            parts = f.stem[len(prefix):].split("-")
            if parts and parts[0].isdigit() and int(parts[0]) > step:
                f.unlink(missing_ok=True)


# ---- server restarts and concurrent processes ---------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run folder while a process trains it (``flock``: released if the process dies)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"The run '{self.path.parent.name}' is being trained by another process right now. "
                            "Wait for it to finish, or stop it first.") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def is_locked(run_dir: Path) -> bool:
    if not (Path(run_dir) / LOCK_FILE).exists():
        return False
    try:
        RunLock(run_dir).acquire().release()
        return False
    except UserError:
        return True


def mark_interrupted(runs_root: Path, skip: Iterable[Path] = ()) -> list[Path]:
    """After a (re)start: runs whose run.json says created/loading/running but no process trains → "interrupted"."""
    runs_root = Path(runs_root)
    skip = {Path(p).resolve() for p in skip}
    marked = []
    if not runs_root.is_dir():
        return marked
    for manifest in [*runs_root.glob(f"*/{MANIFEST}"), *runs_root.glob(f"*/*/{MANIFEST}")]:
        folder = manifest.parent
        try:
            data = read_json(manifest, MANIFEST)
            if not isinstance(data, dict) or data.get("status") not in LIVE_STATUSES:
                continue
            if folder.resolve() in skip or is_locked(folder):
                continue
            run = RunFolder.open(folder)
            run.set_status(INTERRUPTED, INTERRUPTED_MESSAGE)  # a lifecycle write: no process holds this run
            marked.append(folder)
            log.info("marked run %s as interrupted", folder.name)
        except Exception:  # one broken folder must not stop the app from starting
            log.warning("could not check run folder %s", folder.name, exc_info=True)
    return marked


def interrupted_runs(owner_root: Path) -> list[Path]:
    """An owner's interrupted runs, newest first."""
    found = []
    owner_root = Path(owner_root)
    if owner_root.is_dir():
        for manifest in owner_root.glob(f"*/{MANIFEST}"):
            try:
                data = read_json(manifest, MANIFEST)
            except UserError:
                continue
            if isinstance(data, dict) and data.get("status") == INTERRUPTED:
                found.append(manifest.parent)
    return sorted(found, key=lambda p: p.name, reverse=True)
