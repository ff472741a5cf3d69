"""Where the app keeps its visitors' runs: one folder per owner, and the only ways in.

Runs live under ``root/<owner folder>/<run id>/``. An owner folder's name is a hash of the owner id (a browser id, or
``hf-user:<name>`` on a Space), so the folder name reveals nothing about the owner. Every lookup takes the owner and
stays inside that owner's folder: a name from the page that points elsewhere (``..``, a symlink, another owner's
run) is "not one of yours". The page asks only this store for runs; the CLI names its run folder itself.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from trainer.config import TrainingConfig
from trainer.errors import UserError
from trainer.dataset.imageset import SetImage
from trainer.runs.folder import MANIFEST, RunFolder


GROWN_DIR = "grown"  # the Grow tab's candidate folders, inside the owner's folder


@dataclass(frozen=True)
class RunListing:
    name: str  # the run folder's name (its id)
    label: str  # what the page shows: "<id> · <status> · N checkpoint(s)"


def owner_folder_name(owner: str) -> str:
    """A folder name for an owner that reveals nothing about the owner id itself."""
    return hashlib.sha256(owner.encode()).hexdigest()[:20]


class RunStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def owner_root(self, owner: str) -> Path:
        return self.root / owner_folder_name(owner)

    def create(self, owner: str, config: TrainingConfig, image: Image.Image, mask: Image.Image | None,
               backgrounds: Sequence[Image.Image] = (), gpus: int = 1) -> RunFolder:
        """A new run folder for ``owner`` (dataset and first run.json written); ``gpus``: the devices the job manager
        gives its job."""
        return RunFolder.create(self.owner_root(owner), config, image, mask, backgrounds=backgrounds, gpus=gpus)

    def create_set(self, owner: str, config: TrainingConfig, images: Sequence[SetImage],
                   backgrounds: Sequence[Image.Image] = (), gpus: int = 1, lineage: dict | None = None) -> RunFolder:
        """A new run of a set of images (``trainer.dataset.imageset.SetImage``: each with its mask and caption);
        ``lineage``: a grown set's round and parent run (``trainer.grow.lineage``)."""
        return RunFolder.create_set(self.owner_root(owner), config, images, backgrounds=backgrounds, gpus=gpus,
                                    lineage=lineage)

    def new_grown_folder(self, owner: str) -> Path:
        """A fresh folder for the owner's candidates of a next round (``trainer.grow``), beside their runs; it has no
        run.json, so it is never listed or opened as a run."""
        from trainer.runs.folder import new_run_id

        return self.owner_root(owner) / GROWN_DIR / new_run_id("candidates")

    def listing(self, owner: str) -> list[RunListing]:
        """The owner's runs, newest first (run ids start with a timestamp); a damaged run.json hides only its run."""
        folder = self.owner_root(owner)
        out = []
        if folder.is_dir():
            for path in sorted(folder.iterdir(), reverse=True):
                if not (path / MANIFEST).is_file():
                    continue
                try:
                    run = RunFolder.open(path)
                except Exception:
                    continue
                rounds = f"round {run.lineage['round']} · " if run.lineage.get("round") else ""  # a grown set's run
                out.append(RunListing(path.name, f"{path.name} · {rounds}{run.status} · "
                                                 f"{len(run.checkpoints)} checkpoint(s)"))
        return out

    def open(self, owner: str, name: str | None) -> RunFolder:
        """The owner's run called ``name``; a name that leads anywhere else is refused."""
        if not name:
            raise UserError("Pick a run first.")
        folder = self.owner_root(owner).resolve()
        path = (folder / str(name)).resolve()
        if path.parent != folder or not (path / MANIFEST).is_file():
            raise UserError("That run is not one of yours, or it was deleted. Refresh the list.")
        return RunFolder.open(path)

    def interrupted(self, owner: str) -> list[Path]:
        """The owner's runs that a server restart interrupted, newest first."""
        from trainer.runs.lifecycle import interrupted_runs

        return interrupted_runs(self.owner_root(owner))

    def mark_interrupted(self, skip: Iterable[Path] = ()) -> list[Path]:
        """After a (re)start: runs left "running" by a process that died become "interrupted" (offered for Resume)."""
        from trainer.runs.lifecycle import mark_interrupted

        return mark_interrupted(self.root, skip=skip)
