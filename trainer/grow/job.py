"""One "grow" request, the same for the page and the CLI: what renders, with what, into which folder.

``plan_grow`` checks everything that can be wrong before a model loads (the run, its checkpoint, the reference model's
family, the count, the size) and says it in a sentence; ``grow`` loads nothing itself: it is given the engine
(``review.inference.LoraPipeline``, which the page shares with Compare and Try it) and streams candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image

from trainer.dataset.imageset import SetImage
from trainer.dataset.prepare import training_size
from trainer.errors import UserError
from trainer.families import family_of_folder, family_of_spec
from trainer.grow import lineage
from trainer.grow.candidates import Candidate, Source, render_candidates, start_folder
from trainer.grow.variations import MAX_CANDIDATES, Variation, plan_variations
from trainer.review.inference import LoraPipeline, RenderSettings, base_model_folder
from trainer.runs.folder import RunFolder, open_run

REFERENCE_RESOLUTION = 512  # a reference render straight after upload: klein's training size here
REFERENCE_GRAY = (200, 200, 200)  # the subject is shown to the editing model on a plain background, as asked for


def default_reference_model() -> str:
    """FLUX.2 [klein] 4B, distilled: Apache-2.0, renders in 4 steps, takes reference images."""
    from trainer.families.flux2_klein import FLUX2_KLEIN

    return FLUX2_KLEIN.distilled_hub_id


@dataclass(frozen=True)
class GrowRequest:
    output: Path
    count: int = 12
    run: Path | None = None  # the source run (checkpoint source; for a reference source, its pictures)
    step: int | None = None  # a checkpoint source: the run's checkpoint at this step
    weight: float = 1.0
    reference_model: str = ""  # a reference source: this model (FLUX.2 [klein]) renders the pictures' subject
    pictures: tuple[SetImage, ...] = ()  # a reference source without a run: the uploaded pictures (mask, caption)
    caption: str = ""  # without a run: the pictures' caption, with [trigger]
    trigger: str = ""
    prompts: tuple[str, ...] = ()  # the user's own variations, first
    seed: int = 1000
    size: tuple[int, int] | None = None
    sample_steps: int | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class GrowPlan:
    source: Source
    originals: tuple[SetImage, ...]
    variations: tuple[Variation, ...]
    settings: RenderSettings
    model_folder: Path
    lora: Path | None
    round: int
    parent: dict
    trigger: str
    seed: int


def _checkpoint(run: RunFolder, step: int | None) -> Path:
    saved = {int(c["step"]): run.path / c["path"] for c in run.checkpoints}
    if not saved:
        raise UserError(f"The run '{run.path.name}' has no checkpoint yet: train it first, or grow from the picture "
                        "with reference editing.")
    if step is None or step not in saved:
        raise UserError(f"The run '{run.path.name}' has no checkpoint at step {step}; its checkpoints are at steps "
                        f"{', '.join(map(str, sorted(saved)))}.")
    if not saved[step].is_file():
        raise UserError(f"The checkpoint of step {step} ({saved[step].name}) was deleted; pick another.")
    return saved[step]


def on_plain_background(item: SetImage) -> Image.Image:
    """The picture as a reference-editing model is shown it: the masked subject on plain gray."""
    if item.mask is None:
        return item.image.convert("RGB")
    plain = Image.new("RGB", item.image.size, REFERENCE_GRAY)
    plain.paste(item.image.convert("RGB"), mask=item.mask.convert("L").resize(item.image.size))
    return plain


def plan_grow(request: GrowRequest, token: str | None = None) -> GrowPlan:
    from trainer.model.loading import resolve_model

    run = open_run(request.run) if request.run else None
    reference = bool(request.reference_model.strip())
    if run is None and not (reference and request.pictures):
        raise UserError("Grow from a run's checkpoint (give the run), or from pictures with reference editing "
                        "(give a FLUX.2 [klein] model and the pictures).")
    originals = tuple(run.load_set()) if run is not None else tuple(request.pictures)
    caption = run.config.caption if run is not None else request.caption
    trigger = run.config.trigger if run is not None else request.trigger
    captions = [o.caption or caption for o in originals]
    variations = tuple(plan_variations(caption, captions, request.prompts, request.count))
    first = originals[0].image
    if reference:
        folder = resolve_model(request.reference_model.strip(), token)
        family = family_of_folder(folder)
        if not family.takes_reference_images:
            raise UserError(f"'{folder.name}' is {family.label}, which takes no reference images; reference editing "
                            "needs a FLUX.2 [klein] model.")
        steps, guidance = (family.distilled_render if request.reference_model.strip() == family.distilled_hub_id
                           else (family.preview_steps, family.preview_guidance))
        size = training_size(first.width, first.height, REFERENCE_RESOLUTION)
        source = Source(kind="reference", run=str(run.path) if run else "", model=request.reference_model.strip())
        lora = None
    else:
        lora = _checkpoint(run, request.step)
        folder = base_model_folder(run, token)
        steps, guidance = run.config.preview_steps, run.config.preview_guidance
        size = run.train_size or training_size(first.width, first.height, run.config.resolution)
        source = Source(kind="checkpoint", run=str(run.path), step=int(request.step), weight=float(request.weight))
    width, height = request.size or size
    settings = RenderSettings(width=width, height=height, steps=request.sample_steps or steps,
                              guidance=guidance if request.guidance is None else request.guidance,
                              max_text_tokens=run.config.max_text_tokens if run else family_of_spec(
                                  request.reference_model).max_text_tokens)
    parent = {"run": str(run.path), "name": run.config.name, "round": int(run.lineage.get("round", 1))} if run else {}
    return GrowPlan(source=source, originals=originals, variations=variations, settings=settings, model_folder=folder,
                    lora=lora, round=lineage.next_round(run.lineage if run else None), parent=parent,
                    trigger=trigger, seed=request.seed)


def _renderer(plan: GrowPlan, engine: LoraPipeline) -> Callable[[str, int], Image.Image]:
    references = [on_plain_background(o) for o in plan.originals] if plan.source.kind == "reference" else []

    def render(prompt: str, seed: int) -> Image.Image:
        return engine.render(prompt, seed, plan.settings, lora=plan.lora, weight=plan.source.weight or 1.0,
                             references=references)
    return render


def grow(plan: GrowPlan, engine: LoraPipeline, output: Path, mask_model: str | None = None,
         should_stop: Callable[[], bool] = lambda: False) -> Iterator[Candidate]:
    """Write the originals into ``output``, then render, mask, score and write each candidate, yielding it."""
    start_folder(output, plan.originals, plan.source, plan.round, plan.parent)
    yield from render_candidates(_renderer(plan, engine), plan.variations, plan.originals, output, plan.source,
                                 plan.seed, plan.trigger, mask_model=mask_model, should_stop=should_stop)


def redraw(plan: GrowPlan, engine: LoraPipeline, output: Path, indices: Sequence[int], attempt: int,
           mask_model: str | None = None, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Candidate]:
    """Draw the candidates numbered ``indices`` (1-based, as their files) again, asking for the same thing with other
    seeds (attempt ``attempt`` >= 1: seed + attempt x MAX_CANDIDATES + index, never a seed drawn before); their
    files and provenance are replaced, the rest of the folder is kept."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    render = _renderer(plan, engine)
    for index in indices:
        if not 1 <= index <= len(plan.variations):
            raise UserError(f"There is no candidate {index}: this round has {len(plan.variations)}.")
        yield from render_candidates(render, [plan.variations[index - 1]], plan.originals, output, plan.source,
                                     plan.seed + attempt * MAX_CANDIDATES, plan.trigger, mask_model=mask_model,
                                     should_stop=should_stop, first_index=index)
