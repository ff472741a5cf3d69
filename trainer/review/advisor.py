"""Which checkpoint to use: scores for every checkpoint, a suggestion, the user's star, and disk use.

A heuristic, and presented as one. Practitioners pick "the checkpoint where the model has learned the subject
but still generalises" by eye (docs/PRACTICE.md §5-6); two failure signs can be measured:

* **copying**: samples of prompts that are *not* the caption come out close to a training image. The copy
  score is the mean of a structure term (SSIM of downscaled grayscale images) and a pixel term (correlation of
  downscaled colour images); 1 = the training image itself. No image-embedding model is used (none can be
  fetched offline); the score is pixel- and structure-based only, over the whole picture (the mask is not used).
  A set of images: each sample is compared with every training image and scores against the nearest one (the
  highest copy score); the advice names the image the samples come nearest to. One image: its one score.
* **artefacts**: the rough fabric/paper texture, fuzzy edges and ghosting of an overfit LoRA add high-frequency
  energy that the base model's image of the same prompt and seed does not have. The artefact score is
  ``log2(high-frequency energy of the sample / that of the base sample)``: 0 = as clean as the base model,
  1 = twice its fine-detail energy.

The suggestion is the checkpoint just before either score rises past its threshold, at weight 1.0; when even
the first checkpoint is past it, the first checkpoint at a lower weight (an overfit checkpoint is often usable
at 0.5). On tiny-demo (random weights, noise samples) the numbers mean nothing.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from trainer.dataset.imageset import SetImage
from trainer.errors import UserError
from trainer.fsutil import atomic_write_json
from trainer.runs.folder import RunFolder

COPY_SIZE = 64  # copy scores compare 64-pixel thumbnails: composition and colour, not texture
COPY_RISE = 0.15  # copy score above the base model's by this much = copying
ARTEFACT_LIMIT = 0.5  # log2 ratio: ~41 % more fine-detail energy than the base model
HF_FLOOR = 1e-4  # energy of faint (~2/255) grain: below it, a very smooth base image does not inflate the ratio
STAR_FILE = "starred.json"
ADVICE_FILE = "advice.json"  # the last scoring of a run: suggestion and per-checkpoint scores


# ---------------------------------------------------------------- image scores

def _gray(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0


def _box(x: np.ndarray, k: int = 7) -> np.ndarray:
    """Mean over k x k windows ('valid' region), via an integral image."""
    c = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two grayscale images in [0, 1] (7x7 uniform windows)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = _box(a), _box(b)
    var_a = _box(a * a) - mu_a ** 2
    var_b = _box(b * b) - mu_b ** 2
    cov = _box(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def _fit(reference: Image.Image, size: tuple[int, int]) -> Image.Image:
    return ImageOps.fit(reference.convert("RGB"), size, Image.Resampling.LANCZOS)


def copy_score(sample: Image.Image, training: Image.Image) -> float:
    """How much ``sample`` looks like the training image: 1 = identical, ~0 = unrelated."""
    training = _fit(training, sample.size)
    w, h = sample.size
    scale = COPY_SIZE / max(w, h)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    structure = ssim(_gray(sample, size), _gray(training, size))
    a = np.asarray(sample.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    b = np.asarray(training.resize(size, Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    pixel = 1.0 if np.array_equal(a, b) else float(np.corrcoef(a, b)[0, 1]) if a.std() and b.std() else 0.0
    return float(np.clip((max(structure, 0.0) + max(pixel, 0.0)) / 2, 0.0, 1.0))


def nearest_copy(sample: Image.Image, training: Sequence[Image.Image]) -> tuple[float, int]:
    """The copy score of ``sample`` against its nearest training image, and that image's index in ``training``
    (the first of equal scores)."""
    scores = [copy_score(sample, t) for t in training]
    best = int(np.argmax(scores))
    return scores[best], best


def high_frequency_energy(image: Image.Image) -> float:
    """Mean squared difference between the image and its blur: fine texture, noise, sharp edges."""
    gray = image.convert("L")
    a = np.asarray(gray, dtype=np.float64) / 255.0
    blurred = np.asarray(gray.filter(ImageFilter.GaussianBlur(radius=1.5)), dtype=np.float64) / 255.0
    return float(((a - blurred) ** 2).mean())


def artefact_score(sample: Image.Image, base_sample: Image.Image) -> float:
    """log2 of the sample's high-frequency energy over the base model's for the same prompt and seed."""
    if base_sample.size != sample.size:
        base_sample = base_sample.resize(sample.size, Image.Resampling.LANCZOS)
    return math.log2((high_frequency_energy(sample) + HF_FLOOR) / (high_frequency_energy(base_sample) + HF_FLOOR))


# ---------------------------------------------------------------- per checkpoint, and the suggestion

@dataclass(frozen=True)
class CheckpointScore:
    step: int
    copy: float  # mean copy score of the non-caption samples
    copy_rise: float  # copy minus the base model's copy score for the same prompts and seeds
    artefact: float  # mean artefact score
    nearest: str = ""  # a set: the training image most of the samples came nearest to ("" for one image)

    @property
    def copying(self) -> bool:
        return self.copy_rise > COPY_RISE

    @property
    def artefacted(self) -> bool:
        return self.artefact > ARTEFACT_LIMIT


@dataclass(frozen=True)
class Advice:
    scores: tuple[CheckpointScore, ...]
    step: int
    weight: float
    reason: str

    def markdown(self) -> str:
        text = (f"**Suggested: step {self.step} at LoRA weight {self.weight:g}** — a heuristic, not a verdict: "
                f"{self.reason} Compare the grid with your own eyes before choosing.")
        picked = next((s for s in self.scores if s.step == self.step), None)
        if picked is not None and picked.nearest:
            text += (f" The samples of step {picked.step} come nearest to training image '{picked.nearest}' "
                     f"(copy score {picked.copy:.2f}).")
        return text


def score_checkpoints(samples: dict[int, list[Image.Image]], base: list[Image.Image],
                      training: Image.Image | Sequence[SetImage]) -> list[CheckpointScore]:
    """``samples[step]`` and ``base`` hold images of the same (non-caption) prompts and seeds, in the same order.
    ``training``: the one training image, or the set's images (``SetImage``s, their names for the advice); every
    sample scores against its nearest training image, the base model's samples too."""
    if not base:
        raise UserError("Scoring needs at least one sample of a prompt other than the caption.")
    names, images = _references(training)
    base_copy = float(np.mean([nearest_copy(b, images)[0] for b in base]))
    out = []
    for step in sorted(samples):
        of_step = samples[step]
        if len(of_step) != len(base):
            raise ValueError("every checkpoint needs one sample per base sample")
        nearest = [nearest_copy(im, images) for im in of_step]
        copy = float(np.mean([score for score, _ in nearest]))
        artefact = float(np.mean([artefact_score(im, b) for im, b in zip(of_step, base)]))
        out.append(CheckpointScore(step=step, copy=copy, copy_rise=copy - base_copy, artefact=artefact,
                                   nearest=_most_often(names, [index for _, index in nearest])))
    return out


def _references(training) -> tuple[list[str], list[Image.Image]]:
    """(names, images) of the training images: one image has no name (the advice does not name it)."""
    if isinstance(training, Image.Image):
        return [""], [training]
    items = list(training)
    if not items:
        raise ValueError("no training images to compare with")
    if len(items) == 1:
        return [""], [items[0].image]
    return [item.name for item in items], [item.image for item in items]


def _most_often(names: list[str], indices: list[int]) -> str:
    """The name of the training image nearest for most samples; of equally often, the earliest in the set."""
    counts = np.bincount(indices, minlength=len(names))
    return names[int(np.argmax(counts))]


def suggest(scores: list[CheckpointScore]) -> Advice:
    if not scores:
        raise UserError("There are no checkpoints to score yet.")
    scores = sorted(scores, key=lambda s: s.step)
    for i, score in enumerate(scores):
        if score.copying or score.artefacted:
            copied = f"copying training image '{score.nearest}'" if score.nearest else "copying the training image"
            signs = " and ".join(n for n, flag in ((copied, score.copying),
                                                     ("artefacts", score.artefacted)) if flag)
            if i == 0:
                return Advice(tuple(scores), score.step, 0.6,
                              f"even the first checkpoint shows {signs}, so use it at a lower weight "
                              "(or train with fewer steps or a lower rank).")
            pick = scores[i - 1]
            return Advice(tuple(scores), pick.step, 1.0,
                          f"it is the last checkpoint before step {score.step}, where {signs} begin.")
    last = scores[-1]
    return Advice(tuple(scores), last.step, 1.0,
                  "no checkpoint shows copying or artefacts, so the most trained one is suggested.")


# ---------------------------------------------------------------- from a rendered grid

ADVICE_PROMPT_KINDS = ("flexibility (other hair and clothes)", "flexibility (another medium)")  # + the first view


def advice_spec(run: RunFolder, seeds: tuple[int, ...] = (1, 2), sample_steps: int | None = None):
    """The grid the advice is computed from: non-caption test prompts (the most extreme view the training images do
    not show, other hair and clothes, another medium), every checkpoint, weight 1.0."""
    from trainer.review.grid import GridSpec
    from trainer.review.prompts import NEW_VIEW, suggest_prompts

    suggested = suggest_prompts(run.config, run.captions())
    views = [s.text for s in suggested if s.kind.startswith(NEW_VIEW)][:1]
    prompts = tuple(views + [s.text for s in suggested if s.kind in ADVICE_PROMPT_KINDS])
    return GridSpec(prompts=prompts, seeds=seeds, weights=(1.0,), sample_steps=sample_steps)


def advice_from_grid(grids, training: Image.Image | Sequence[SetImage]) -> Advice:
    """Score a fully rendered ``GridImages`` (base column first) and suggest a checkpoint. ``training``: the one
    image, or the set's images (``RunFolder.load_set()``, from run.json's ``dataset.images``)."""
    plan = grids.plan
    base, samples = [], {c.step: [] for c in plan.columns[1:]}
    for prompt_cells in grids.cells:
        for row in prompt_cells:
            if any(im is None for im in row):
                raise UserError("The scoring samples are not all rendered yet.")
            base.append(row[0])
            for column, image in zip(plan.columns[1:], row[1:]):
                samples[column.step].append(image)
    return suggest(score_checkpoints(samples, base, training))


def save_advice(run_dir: Path, advice: Advice) -> None:
    atomic_write_json(Path(run_dir) / ADVICE_FILE, {
        "step": advice.step, "weight": advice.weight, "reason": advice.reason,
        "scores": [{"step": s.step, "copy": s.copy, "copy_rise": s.copy_rise, "artefact": s.artefact,
                    "nearest": s.nearest} for s in advice.scores]})


def load_advice(run_dir: Path) -> Advice | None:
    try:
        data = json.loads((Path(run_dir) / ADVICE_FILE).read_text())
        scores = tuple(CheckpointScore(int(s["step"]), float(s["copy"]), float(s["copy_rise"]), float(s["artefact"]),
                                       str(s.get("nearest") or "")) for s in data.get("scores", []))
        return Advice(scores, int(data["step"]), float(data["weight"]), str(data.get("reason", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- the user's star

def starred_step(run_dir: Path) -> int | None:
    try:
        return int(json.loads((Path(run_dir) / STAR_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def set_star(run_dir: Path, step: int | None) -> None:
    """Star the checkpoint at ``step`` (None removes the star). Kept beside run.json, not in it, so a running
    job rewriting run.json cannot lose it."""
    path = Path(run_dir) / STAR_FILE
    if step is None:
        path.unlink(missing_ok=True)
        return
    run = RunFolder.open(run_dir)
    if step not in {c["step"] for c in run.checkpoints}:
        raise UserError(f"There is no checkpoint at step {step} to star.")
    atomic_write_json(path, {"step": int(step)})


# ---------------------------------------------------------------- disk

@dataclass(frozen=True)
class CheckpointFile:
    step: int
    path: Path
    size_bytes: int
    starred: bool


def checkpoint_files(run: RunFolder) -> list[CheckpointFile]:
    star = starred_step(run.path)
    out = []
    for c in run.checkpoints:
        path = run.path / c["path"]
        if path.is_file():
            out.append(CheckpointFile(c["step"], path, path.stat().st_size, c["step"] == star))
    return out


def disk_summary(run: RunFolder) -> str:
    files = checkpoint_files(run)
    total = sum(f.size_bytes for f in files)
    return f"{len(files)} checkpoint(s), {_mb(total)} in all"


def keep_last(run_dir: Path, n: int) -> list[int]:
    """Delete all but the newest ``n`` checkpoints (and their previews), never the starred one.

    Returns the deleted steps. Refused while the run is training: its job's recorder owns run.json then; on a run
    no job is writing this is a lifecycle write through ``RunFolder.save`` (the rule: ``trainer.runs.folder``).
    """
    if n < 1:
        raise UserError("Keep at least 1 checkpoint.")
    run = RunFolder.open(run_dir)
    if run.status in ("running", "loading", "queued", "created"):
        raise UserError("This run is still training; delete checkpoints after it has finished or stopped.")
    star = starred_step(run.path)
    steps = sorted(c["step"] for c in run.checkpoints)
    keep = set(steps[-n:]) | ({star} if star is not None else set())
    deleted = []
    for c in list(run.checkpoints):
        if c["step"] in keep:
            continue
        for preview in c.get("previews", []):
            (run.path / preview["path"]).unlink(missing_ok=True)
        (run.path / c["path"]).unlink(missing_ok=True)
        run.checkpoints.remove(c)
        deleted.append(c["step"])
    if deleted:
        run.save()
    return sorted(deleted)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
