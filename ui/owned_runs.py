"""The owner's runs as the review tabs list and open them (through ``trainer.api.RunStore``: only the owner's own)."""
from __future__ import annotations

from pathlib import Path

from trainer import api
from trainer.errors import UserError


def owner_runs(runs_root: Path, owner: str) -> list[tuple[str, str]]:
    """(label, folder name) of the owner's runs, newest first."""
    return [(r.label, r.name) for r in api.RunStore(runs_root).listing(owner)]


def open_owned_run(runs_root: Path, owner: str, name: str | None) -> api.RunFolder:
    return api.RunStore(runs_root).open(owner, name)


def checkpoint_choices(run: api.RunFolder) -> list[tuple[str, int]]:
    star = api.starred_step(run.path)
    return [(f"step {f.step}" + (" ★" if f.step == star else ""), f.step) for f in api.checkpoint_files(run)]


def checkpoint_path(run: api.RunFolder, step) -> Path:
    for f in api.checkpoint_files(run):
        if f.step == int(step):
            return f.path
    raise UserError(f"There is no checkpoint at step {step} in this run any more.")
