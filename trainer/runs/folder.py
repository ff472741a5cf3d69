"""A run folder on disk: the training images with their masks and captions, checkpoints, previews and ``run.json``.

``run.json`` is the run's record: the full config, the base model (the spec and the resolved local
folder), the training size, and every checkpoint with its previews and losses. It is rewritten atomically
after every change, so whatever kills the process, the file on disk is complete. Its format stays
``"format": 1``; keys added later are optional and read with defaults, so older run folders still open.

Who writes run.json, and when:

- ``RunFolder.save`` (through ``to_dict``) is the only code that serialises it. The ``note_*`` methods change
  the object in memory only; ``record_*`` / ``set_status`` are ``note_*`` + ``save``.
- Creating a run: ``RunFolder.create`` / ``create_at`` write the first run.json, with every creation-time fact
  (config, model spec, ``gpus``).
- While a job trains the run (it holds ``trainer.runs.lifecycle.RunLock``): only that job's
  ``trainer.runs.recorder.RunRecorder``, which folds the job's events into this object and saves. In a multi-GPU
  job that is the main process's ``run_training``; other ranks never write (``writable=False``), and the app
  side (``trainer.jobs.multigpu.run_on_gpus``) writes only when the processes died without a last word.
- With no job writing it: lifecycle operations (``lifecycle.prepare_resume`` at the start of a resumed job,
  before its first event; ``lifecycle.mark_interrupted`` on unlocked runs; ``review.advisor.keep_last``, refused
  while a run is live), through these methods.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from trainer.config import TrainingConfig
from trainer.dataset.imageset import SetImage
from trainer.errors import UserError
from trainer.fsutil import atomic_write_bytes, atomic_write_json

MANIFEST = "run.json"
IMAGE_FILE = "dataset/image.png"
MASK_FILE = "dataset/mask.png"
BACKGROUNDS_DIR = "dataset/backgrounds"  # the user's own photos for background augmentation (trainer.dataset.augment)


def new_run_id(name: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{secrets.token_hex(4)}"


@dataclass
class RunFolder:
    path: Path
    config: TrainingConfig
    model: str = ""
    model_path: str = ""
    status: str = "created"
    train_size: tuple[int, int] | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    base_previews: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    gpus: int = 1  # data-parallel processes that trained it (the learning rate was scaled by sqrt(gpus))
    memory_tier: str = ""  # the tier the job ran with (presets/memory/): config.memory_tier may say "auto"
    # the set: per image {"name", "image", "mask" (None: none), "caption"}, paths inside the folder, in training order
    dataset: list[dict[str, Any]] = field(default_factory=list)
    # how the steps were counted, from Started: images, batch_size, gpus, epochs, learning_rate (the one trained with)
    schedule: dict[str, Any] = field(default_factory=dict)
    # a run of a grown set: its round, the run the candidates came from, how (trainer.grow.lineage); {} = round 1
    lineage: dict[str, Any] = field(default_factory=dict)
    writable: bool = field(default=True, repr=False)  # False in the non-main processes of a multi-GPU run

    # ---- creating and opening
    @classmethod
    def create(cls, root: Path, config: TrainingConfig, image: Image.Image, mask: Image.Image | None,
               run_id: str | None = None, backgrounds: Sequence[Image.Image] = (), gpus: int = 1) -> "RunFolder":
        """A new run in a fresh folder under ``root``; ``gpus``: the data-parallel processes it will train on."""
        return cls.create_at(Path(root) / (run_id or new_run_id(config.name)), config, image, mask, backgrounds,
                             gpus=gpus)

    @classmethod
    def create_at(cls, path: Path, config: TrainingConfig, image: Image.Image,
                  mask: Image.Image | None, backgrounds: Sequence[Image.Image] = (), gpus: int = 1) -> "RunFolder":
        """Write the dataset (image + mask as PNG, the user's own backgrounds if any) and a first ``run.json`` into
        ``path`` (new or empty): a set of one image, captioned by ``config.caption``."""
        return cls.create_set_at(path, config, [SetImage("image.png", image, mask, "")], backgrounds, gpus)

    @classmethod
    def create_set(cls, root: Path, config: TrainingConfig, images: Sequence[SetImage], run_id: str | None = None,
                   backgrounds: Sequence[Image.Image] = (), gpus: int = 1,
                   lineage: dict[str, Any] | None = None) -> "RunFolder":
        return cls.create_set_at(Path(root) / (run_id or new_run_id(config.name)), config, images, backgrounds, gpus,
                                 lineage)

    @classmethod
    def create_set_at(cls, path: Path, config: TrainingConfig, images: Sequence[SetImage],
                      backgrounds: Sequence[Image.Image] = (), gpus: int = 1,
                      lineage: dict[str, Any] | None = None) -> "RunFolder":
        """A run of a set of images (``trainer.dataset.imageset``), each with its mask (or None) and caption ("": the
        config's caption). The first keeps the one-image names (dataset/image.png, dataset/mask.png), so a set of one
        is the same folder as before sets existed; the others are dataset/image-01.png, dataset/mask-01.png, ..."""
        path = Path(path)
        if not images:
            raise ValueError("a run needs at least one image")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path=path, config=config, model=config.model, gpus=int(gpus), lineage=dict(lineage or {}))
        for index, item in enumerate(images):
            image_file, mask_file = dataset_files(index)
            atomic_write_bytes(path / image_file, _png_bytes(item.image))
            if item.mask is not None:
                atomic_write_bytes(path / mask_file, _png_bytes(item.mask.convert("L")))
            entry = {"name": item.name, "image": image_file, "mask": mask_file if item.mask is not None else None,
                     "caption": item.caption or config.caption}
            if item.provenance:
                entry["provenance"] = item.provenance
            run.dataset.append(entry)
        for index, background in enumerate(backgrounds):
            atomic_write_bytes(path / BACKGROUNDS_DIR / f"{index:02d}.png", _png_bytes(background.convert("RGB")))
        run.save()
        return run

    @classmethod
    def open(cls, path: Path) -> "RunFolder":
        data = json.loads((Path(path) / MANIFEST).read_text())
        return cls(path=Path(path), config=TrainingConfig.from_dict(data["config"]), model=data.get("model", ""),
                   model_path=data.get("model_path", ""), status=data.get("status", ""),
                   train_size=tuple(data["train_size"]) if data.get("train_size") else None,
                   checkpoints=data.get("checkpoints", []), base_previews=data.get("base_previews", []),
                   message=data.get("message", ""), gpus=int(data.get("gpus", 1)),
                   memory_tier=str(data.get("memory_tier", "")), dataset=_dataset_entries(path, data),
                   schedule=dict(data.get("schedule") or {}), lineage=dict(data.get("lineage") or {}))

    # ---- the dataset
    def set_entries(self) -> list[dict[str, Any]]:
        """``dataset``, or for an object made without one, the one image of the one-image layout."""
        return self.dataset or _dataset_entries(self.path, {"config": {"caption": self.config.caption}})

    @property
    def image_count(self) -> int:
        return len(self.set_entries())

    def captions(self) -> list[str]:
        """Each image's caption, in order (before the trigger; the config's caption where an image has none)."""
        return [entry.get("caption") or self.config.caption for entry in self.set_entries()]

    def load_dataset(self) -> tuple[Image.Image, Image.Image | None]:
        """The first image of the set and its mask (the one image of a one-image run)."""
        first = self.load_set()[0]
        return first.image, first.mask

    def load_set(self) -> list[SetImage]:
        """Every image of the set, in order, with its mask (None: unmasked) and its caption (before the trigger)."""
        items = []
        for entry, caption in zip(self.set_entries(), self.captions()):
            image = Image.open(self.path / entry["image"])
            image.load()
            mask = None
            if entry.get("mask") and (self.path / entry["mask"]).is_file():
                mask = Image.open(self.path / entry["mask"])
                mask.load()
            items.append(SetImage(name=entry.get("name", ""), image=image, mask=mask,
                                  caption=caption))
        return items

    # ---- file names
    def checkpoint_path(self, step: int) -> Path:
        return self.path / f"{self.config.name}-{step:06d}.safetensors"

    def preview_path(self, step: int, index: int) -> Path:
        return self.path / "samples" / f"{self.config.name}-{step:06d}-{index:02d}.png"

    # ---- recording progress: ``note_*`` change this object only; ``save`` writes it
    def note_checkpoint(self, step: int, path: Path, losses: Sequence[tuple[int, float]] = (),
                        epoch: float | None = None) -> None:
        """A saved checkpoint; ``losses``: the (step, loss) of the steps trained since the previous one (a resume
        restores the loss curve from them); ``epoch``: the set's epochs trained by then. The same step and file again
        keep its previews."""
        name = Path(path).name
        old = next((c for c in self.checkpoints if c["step"] == step), None)
        previews = old.get("previews", []) if old is not None and old.get("path") == name else []
        self.checkpoints = [c for c in self.checkpoints if c["step"] != step]
        entry = {"step": step, "path": name, "previews": previews,
                 "losses": [[int(s), round(float(loss), 6)] for s, loss in losses]}
        if epoch is None and old is not None and "epoch" in old:
            epoch = old["epoch"]
        if epoch is not None:
            entry["epoch"] = round(float(epoch), 4)
        self.checkpoints.append(entry)
        self.checkpoints.sort(key=lambda c: c["step"])

    def note_previews(self, step: int, previews: Sequence[dict[str, Any]]) -> None:
        """The preview images of ``step`` (0: the base model), each ``{"path", "prompt", "seed"}`` inside the folder."""
        entries = [{"path": str(Path(p["path"]).relative_to(self.path)), "prompt": p["prompt"], "seed": p["seed"]}
                   for p in previews]
        if step == 0:
            self.base_previews = entries
        for c in self.checkpoints:
            if c["step"] == step:
                c["previews"] = entries

    def note_status(self, status: str, message: str = "") -> None:
        self.status, self.message = status, message

    def loss_history(self) -> tuple[tuple[int, float], ...]:
        """The (step, loss) recorded with the checkpoints, in order (older run folders have none)."""
        return tuple((int(s), float(loss)) for c in self.checkpoints for s, loss in c.get("losses", []))

    # ---- lifecycle writes (no job is writing this run; see the module docstring)
    def record_checkpoint(self, step: int, path: Path, losses: Sequence[tuple[int, float]] = ()) -> None:
        self.note_checkpoint(step, path, losses)
        self.save()

    def record_previews(self, step: int, previews: list[dict[str, Any]]) -> None:
        self.note_previews(step, previews)
        self.save()

    def set_status(self, status: str, message: str = "") -> None:
        self.note_status(status, message)
        self.save()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "status": self.status,
            "message": self.message,
            "config": self.config.to_dict(),
            "model": self.model,
            "model_path": self.model_path,
            "gpus": self.gpus,
            "memory_tier": self.memory_tier,
            "train_size": list(self.train_size) if self.train_size else None,
            # "image" / "mask": the first image's, as run.json had them before sets ("images" lists them all)
            "dataset": {"image": IMAGE_FILE, "mask": MASK_FILE if (self.path / MASK_FILE).is_file() else None,
                        "images": self.set_entries()},
            "schedule": self.schedule,
            "lineage": self.lineage,
            "base_previews": self.base_previews,
            "checkpoints": self.checkpoints,
        }

    def save(self) -> None:
        """Write run.json atomically: the one place it is serialised."""
        if self.writable:
            atomic_write_json(self.path / MANIFEST, self.to_dict())


def open_run(path: Path) -> RunFolder:
    """The run in ``path``, or a sentence saying why it is not one."""
    if not (Path(path) / MANIFEST).is_file():
        raise UserError(f"'{path}' is not a run folder: it has no {MANIFEST}.")
    try:
        return RunFolder.open(path)
    except (ValueError, KeyError) as err:
        raise UserError(f"The run's {MANIFEST} in '{path}' could not be read ({err}).") from None


def dataset_files(index: int) -> tuple[str, str]:
    """The image and mask file of the set's ``index``-th image, inside the run folder."""
    if index == 0:
        return IMAGE_FILE, MASK_FILE
    return f"dataset/image-{index:02d}.png", f"dataset/mask-{index:02d}.png"


def _dataset_entries(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The set from run.json; a run folder from before sets is its one image, captioned by its config."""
    entries = (data.get("dataset") or {}).get("images")
    if entries:
        return [dict(e) for e in entries]
    return [{"name": "image.png", "image": IMAGE_FILE,
             "mask": MASK_FILE if (Path(path) / MASK_FILE).is_file() else None,
             "caption": data["config"].get("caption", TrainingConfig.caption)}]


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
