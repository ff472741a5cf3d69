"""How rounds link: ``grow.json`` in a grown dataset folder, and the ``lineage`` a run made from it keeps.

A grown folder's ``grow.json``::

    {"format": 1, "round": 2,
     "parent": {"run": "/…/runs/20261204-…-lora", "round": 1, "name": "lora"},
     "source": {"kind": "checkpoint", "run": "/…", "step": 250, "weight": 1.0},
     "images": {"original-01.png": {"source": {"kind": "original", "name": "image.png"}},
                "candidate-003.png": {"source": {…}, "kind": "view: back", "prompt": "…", "seed": 45, …}}}

``train --dataset DIR`` reads it (``trainer.dataset.imageset.load_folder``): each picture's provenance goes into
run.json's ``dataset.images[i].provenance``, the round and parent into run.json's ``lineage``, so a round-2 run says
what was synthetic and how it was made, and the page can list the rounds as one project. A picture deleted from the
folder (the CLI's way of not picking it) simply is not there to be read; its entry is ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError
from trainer.fsutil import atomic_write_json

FILE = "grow.json"
MAX_BYTES = 1024 * 1024  # provenance of at most a few dozen pictures; a larger file is not ours


@dataclass
class Lineage:
    round: int
    parent: dict = field(default_factory=dict)  # the run the candidates came from (none: straight after upload)
    source: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)  # file name -> provenance

    def to_dict(self) -> dict:
        return {"format": 1, "round": self.round, "parent": self.parent, "source": self.source, "images": self.images}

    def for_run(self) -> dict:
        """What a run trained on this folder keeps in run.json's ``lineage`` (the per-picture part goes with the
        pictures)."""
        return {"round": self.round, "parent": self.parent, "source": self.source}


def read(folder: Path) -> Lineage | None:
    """The folder's grow.json, or None when it has none. A damaged one is a sentence, not a traceback."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError("too large")
        data = json.loads(path.read_text(encoding="utf-8"))
        return Lineage(round=int(data["round"]), parent=dict(data.get("parent") or {}),
                       source=dict(data.get("source") or {}), images=dict(data.get("images") or {}))
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise UserError(f"{path} is not a readable grow.json ({err}); delete it to train the folder without its "
                        "provenance.") from None


def write(folder: Path, lineage: Lineage) -> None:
    atomic_write_json(Path(folder) / FILE, lineage.to_dict())


def add_image(folder: Path, name: str, provenance: dict) -> None:
    """Record one more picture's provenance (rewritten whole, atomically: a stop keeps what was recorded)."""
    lineage = read(folder)
    if lineage is None:
        raise UserError(f"{folder} has no {FILE}; start the folder with the originals first.")
    lineage.images[name] = provenance
    write(folder, lineage)


def next_round(run_lineage: dict | None) -> int:
    """The round after a run's (a run with no lineage is round 1)."""
    return int((run_lineage or {}).get("round", 1)) + 1
