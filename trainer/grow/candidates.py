"""Render candidates into a folder in the ``--dataset`` layout, with each one's provenance, for the next round.

The folder is what ``train --dataset DIR`` reads (``trainer.dataset.imageset.load_folder``): the source's own
pictures (``original-NN.png``, their captions and masks: the originals stay in), then each candidate
(``candidate-NNN.png``, its caption, its automatic mask in ``masks/``). Picking is deleting the bad ones (the CLI) or
ticking the good ones (the page). ``grow.json`` (``trainer.grow.lineage``) says where every picture came from and is
rewritten after each candidate, so a stopped render keeps what it rendered, provenance included.

Two sources: a checkpoint of a run of this project (``from_checkpoint``: the run's base model with that LoRA), or
reference editing with no training (``from_reference``: a FLUX.2 [klein] model given the pictures as references).
Each candidate is scored against the training pictures as the page shows it: the copy score against the nearest one
(``review.advisor``: a near copy adds nothing) and a colour likeness of the masked subjects (a heuristic, labelled
so: a candidate whose subject has other colours is probably another subject).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from trainer.dataset.imageset import MASKS_DIR, SetImage
from trainer.errors import UserError
from trainer.fsutil import atomic_write_bytes
from trainer.grow import lineage
from trainer.grow.variations import Variation
from trainer.review.advisor import nearest_copy

NEAR_COPY = 0.80  # copy score against the nearest training picture above which a candidate adds no new view
UNLIKE = 0.35  # colour likeness below which the candidate's subject probably is not the training subject
HUE_BINS, SAT_BINS = 18, 4


@dataclass(frozen=True)
class Source:
    """Where candidates come from. ``kind``: "checkpoint" (``run``'s LoRA at ``step`` and ``weight``) or "reference"
    (``model``, a reference-editing model, given the pictures)."""
    kind: str
    run: str = ""  # the source run's folder ("" for a reference render straight after upload)
    step: int | None = None
    weight: float | None = None  # a checkpoint source's LoRA weight
    model: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in ("", None)}


@dataclass(frozen=True)
class Candidate:
    name: str  # candidate-NNN.png in the folder
    path: Path
    caption: str  # with [trigger]: what the next round trains on
    prompt: str  # what the model was given
    seed: int
    kind: str  # what it varies (Variation.kind)
    copy_score: float
    nearest: str  # the training picture it is closest to
    likeness: float  # colour likeness of the masked subjects, 0..1 (a heuristic)
    mask: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def number(self) -> int:
        """Its place in the round, from 1 (candidate-NNN.png)."""
        return int(Path(self.name).stem.rsplit("-", 1)[1])

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.copy_score >= NEAR_COPY:
            out.append(f"a near copy of '{self.nearest}' (copy score {self.copy_score:.2f}): it adds no new view")
        if self.likeness < UNLIKE:
            out.append(f"its subject's colours differ from the training pictures' (likeness {self.likeness:.2f}, a "
                       "heuristic): check it is the same subject")
        return out

    def provenance(self, source: Source) -> dict:
        return {"source": source.to_dict(), "kind": self.kind, "prompt": self.prompt, "caption": self.caption,
                "seed": self.seed, "copy_score": round(self.copy_score, 3), "nearest": self.nearest,
                "likeness": round(self.likeness, 3)}


def subject_colours(image: Image.Image, mask: Image.Image | None) -> np.ndarray:
    """A normalised hue x saturation histogram of the subject (the mask's weight per pixel; all pixels without one).
    Grey pixels (low saturation) fall in the lowest saturation bins whatever their hue."""
    small = image.convert("RGB").resize((96, 96), Image.Resampling.BILINEAR)
    hsv = np.asarray(small.convert("HSV"), dtype=np.float64) / 256.0
    weight = (np.asarray(mask.convert("L").resize((96, 96), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
              if mask is not None else np.ones((96, 96)))
    hist, _, _ = np.histogram2d(hsv[..., 0].ravel(), hsv[..., 1].ravel(), bins=(HUE_BINS, SAT_BINS),
                                range=((0, 1), (0, 1)), weights=weight.ravel())
    total = hist.sum()
    return hist / total if total > 0 else hist


def likeness(candidate: Image.Image, candidate_mask: Image.Image | None, training: Sequence[SetImage]) -> float:
    """Histogram intersection (1 = the same colours in the same shares) with the closest training subject."""
    mine = subject_colours(candidate, candidate_mask)
    return max(float(np.minimum(mine, subject_colours(t.image, t.mask)).sum()) for t in training)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_picture(folder: Path, name: str, image: Image.Image, caption: str, mask: Image.Image | None) -> None:
    stem = Path(name).stem
    atomic_write_bytes(folder / name, _png(image.convert("RGB")))
    atomic_write_bytes(folder / f"{stem}.txt", (caption + "\n").encode("utf-8"))
    if mask is not None:
        atomic_write_bytes(folder / MASKS_DIR / f"{stem}.png", _png(mask.convert("L")))


def start_folder(output: Path, originals: Sequence[SetImage], source: Source, round_number: int,
                 parent: dict | None) -> Path:
    """A new (or empty) folder holding the originals and a first grow.json; refuses a folder with files in it."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"The output folder '{output}' already exists and is not empty. Choose a new folder.")
    output.mkdir(parents=True, exist_ok=True)
    images = {}
    for index, item in enumerate(originals, start=1):
        name = f"original-{index:02d}.png"
        _write_picture(output, name, item.image, item.caption, item.mask)
        images[name] = {"source": {"kind": "original", "name": item.name}}
    lineage.write(output, lineage.Lineage(round=round_number, parent=parent or {}, source=source.to_dict(),
                                          images=images))
    return output


def render_candidates(render: Callable[[str, int], Image.Image], variations: Sequence[Variation],
                      originals: Sequence[SetImage], output: Path, source: Source, seed: int, trigger: str,
                      mask_model: str | None = None, should_stop: Callable[[], bool] = lambda: False,
                      first_index: int = 1) -> Iterator[Candidate]:
    """Render one candidate per variation (seed ``seed + i``) with ``render(prompt, seed)``, mask it automatically,
    score it, write it into ``output`` (made by ``start_folder``) and record its provenance; yield each as it is done.
    A checkpoint source is given the caption with the trigger word; a reference source the instruction."""
    from trainer.dataset.choice import choose_mask

    if not originals:
        raise UserError("Candidates need the training picture(s) to compare with.")
    names = [o.name for o in originals]
    for offset, variation in enumerate(variations):
        if should_stop():
            return
        index = first_index + offset
        prompt = variation.instruction if source.kind == "reference" else \
            " ".join(variation.caption.replace("[trigger]", trigger.strip()).split())
        image = render(prompt, seed + index)
        mask = choose_mask(image, model=mask_model).mask
        copy, nearest = nearest_copy(image, [o.image for o in originals])
        candidate = Candidate(name=f"candidate-{index:03d}.png", path=Path(output) / f"candidate-{index:03d}.png",
                              caption=variation.caption, prompt=prompt, seed=seed + index, kind=variation.kind,
                              copy_score=copy, nearest=names[nearest], likeness=likeness(image, mask, originals),
                              mask=mask)
        _write_picture(Path(output), candidate.name, image, candidate.caption, mask)
        lineage.add_image(Path(output), candidate.name, candidate.provenance(source))
        yield candidate
