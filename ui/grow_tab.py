"""The Grow tab: one picture → candidates in the views it lacks → tick the good ones → the next round's set.

Candidates come from a checkpoint of one of your runs (its LoRA on the run's base model) or, before any training,
from reference editing (a FLUX.2 [klein] model given your picture). They stream into the gallery as they render,
each with its warnings (a near copy of a training picture; another subject, by a colour heuristic); a click on a
candidate ticks or unticks it in the list below the gallery (which the keyboard reaches too). **Next round** puts the
original picture(s) and the ticked candidates into the Train tab's set, each with its automatic mask and its caption,
and the run that trains on it records the round and where each picture came from (``trainer.grow.lineage``).

The candidates' folder lives with the owner's runs (``RunStore.new_grown_folder``) and is known only to this
session's server-side state: no path from the browser is ever opened.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from trainer import api
from trainer.errors import UserError
from ui import image_set, set_step
from ui.owned_runs import open_owned_run, owner_runs
from ui.session import RENDER_QUEUE, owner_and_token_of, owner_of, user_errors
from ui.tryit_tab import checkpoint_choices_update

CHECKPOINT, REFERENCE = "checkpoint", "reference"
HELP = f"""## Grow the dataset
One picture shows one view. Render the subject in the views, poses and light it lacks, **tick the good ones**
(practitioners keep about one in fifty of a first model's images), and train the next round on the original plus
those. Candidates come from a checkpoint of a
run (pick a middle one: a late, overfit one copies the picture), or — with no training at all — from **reference
editing** by FLUX.2 [klein], given your picture (the Train tab's, or a run's). ⚠️ marks a near copy of a training
picture (copy score ≥ {api.NEAR_COPY:g}) and a candidate whose colours differ from the subject's (likeness below
{api.UNLIKE:g}: a heuristic, have a look)."""


@dataclass
class GrowSession:
    """This session's candidates (server-side only): their folder, the plan and what has rendered."""
    folder: Path
    plan: Any
    candidates: list = field(default_factory=list)
    redraws: int = 0  # how many times unticked candidates were drawn again (each time with seeds never used before)


def candidate_label(index: int, candidate) -> str:
    warn = " ⚠️" if candidate.warnings else ""
    return f"{index + 1}. {candidate.kind}{warn}"


def candidate_notes(session: GrowSession | None) -> str:
    if session is None or not session.candidates:
        return ""
    lines = []
    for index, c in enumerate(session.candidates):
        notes = "; ".join(c.warnings)
        lines.append(f"**{index + 1}.** {c.kind} · copy {c.copy_score:.2f} · likeness {c.likeness:.2f}"
                     + (f" · ⚠️ {notes}" if notes else ""))
    return "  \n".join(lines)


def gallery_value(session: GrowSession) -> tuple[list, Any]:
    """(gallery items, the tick list's choices) for what has rendered so far."""
    labels = [candidate_label(i, c) for i, c in enumerate(session.candidates)]
    return [(Image.open(c.path), label) for c, label in zip(session.candidates, labels)], gr.update(choices=labels)


def pictures_from_train_tab(images, dataset, caption: str) -> tuple:
    """The Train tab's picture(s), as the reference source straight after upload reads them."""
    if dataset is None and not (images and images.items):
        raise UserError("Upload a picture in the Train tab first, or pick one of your runs.")
    pictures = image_set.training_images(images, dataset, caption)
    if pictures is None:  # a set of one: the editor's image
        pictures = [api.SetImage(name=(images.items[0].name if images and images.items else "image.png"),
                                 image=dataset.image, mask=dataset.mask, caption=(caption or "").strip())]
    return tuple(pictures)


def start_render(store: api.RunStore, owner: str, token, source: str, run_name, step, reference_model, count, seed,
                 weight, prompts_text: str, images, dataset, caption: str, trigger: str) -> GrowSession:
    """Check the request and plan it (nothing is loaded yet); a fresh folder for its candidates."""
    run = open_owned_run(store.root, owner, run_name) if run_name else None
    if source == CHECKPOINT and run is None:
        raise UserError("Pick one of your runs and a checkpoint, or choose reference editing.")
    if source == CHECKPOINT and step in (None, ""):
        raise UserError("Pick a checkpoint (a middle one often gives the most varied candidates).")
    pictures = () if run is not None else pictures_from_train_tab(images, dataset, caption)
    folder = store.new_grown_folder(owner)
    request = api.GrowRequest(
        output=folder, count=int(count or 0), run=run.path if run else None,
        step=int(step) if source == CHECKPOINT else None, weight=float(weight),
        reference_model=(reference_model or api.default_reference_model()).strip() if source == REFERENCE else "",
        pictures=pictures, caption=(caption or "").strip(), trigger=(trigger or "").strip(),
        prompts=tuple(line.strip() for line in (prompts_text or "").splitlines() if line.strip()),
        seed=int(seed or 0))
    return GrowSession(folder=folder, plan=api.plan_grow(request, token))


def next_round_set(session: GrowSession | None, picked: list, mask_model: str) -> image_set.ImageSet:
    """The Train tab's set: the originals and the ticked candidates, with their masks, captions and provenance."""
    if session is None or not session.candidates:
        raise UserError("Render some candidates first.")
    chosen = [c for i, c in enumerate(session.candidates) if candidate_label(i, c) in set(picked or [])]
    if not chosen:
        raise UserError("Tick the candidates to keep (click them in the gallery) first.")
    loaded = api.load_folder(session.folder)
    wanted = {o for o in loaded.names if o.startswith("original-")} | {c.name for c in chosen}
    pictures = [p for p in loaded.images if p.name in wanted]
    if len(pictures) > api.MAX_IMAGES:
        raise UserError(f"A set holds at most {api.MAX_IMAGES} pictures: untick {len(pictures) - api.MAX_IMAGES}.")
    return image_set.from_pictures(pictures, [str(session.folder / p.name) for p in pictures], mask_model,
                                   lineage=loaded.lineage)


@dataclass
class GrowTab:
    tab: Any
    source: Any
    run: Any
    checkpoint: Any
    refresh: Any
    reference_model: Any
    count: Any
    seed: Any
    weight: Any
    prompts: Any
    render: Any
    stop: Any
    status: Any
    gallery: Any
    picks: Any
    notes: Any
    next_round: Any
    session: Any
    rounds: tuple = ()  # Compare rounds: (run, seeds, button, status, grids)
    redraw: Any = None


def build() -> GrowTab:
    """The tab's components (inside the page's Tabs); ``connect`` wires them once the Train tab's editor exists."""
    with gr.Tab("Grow", id="grow") as tab:
        gr.Markdown(HELP)
        source = gr.Radio([("From a checkpoint of a run", CHECKPOINT),
                           ("Reference editing, no training (FLUX.2 [klein])", REFERENCE)], value=CHECKPOINT,
                          label="Candidates from", elem_id="grow-source")
        with gr.Row():
            # custom values: an API client names its run and step without the page's lists (the store still opens
            # only the owner's own runs)
            run = gr.Dropdown(label="Run (reference editing: leave empty to use the Train tab's picture)", choices=[],
                              allow_custom_value=True, elem_id="grow-run", scale=3)
            checkpoint = gr.Dropdown(label="Checkpoint", choices=[], allow_custom_value=True,
                                     elem_id="grow-checkpoint", scale=2)
            refresh = gr.Button("↻ Refresh", scale=1)
        reference_model = gr.Textbox(value=api.default_reference_model(), label="Reference-editing model",
                                     info="a FLUX.2 [klein] Hub id or local folder (tiny-klein tries it on a CPU)",
                                     elem_id="grow-reference-model")
        with gr.Row():
            count = gr.Number(value=12, label=f"Candidates (1 to {api.MAX_CANDIDATES})", precision=0,
                              minimum=1, maximum=api.MAX_CANDIDATES, elem_id="grow-count")
            seed = gr.Number(value=1000, label="Seed (candidate i: seed + i)", precision=0)
            weight = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="LoRA weight")
        prompts = gr.Textbox(label="Your own variations, one per line, tried first ([trigger] names the subject)",
                             lines=2, elem_id="grow-prompts")
        with gr.Row():
            render = gr.Button("Render candidates", variant="primary", elem_id="grow-render")
            stop = gr.Button("Stop", elem_id="grow-stop")
        status = gr.Markdown("", elem_id="grow-status")
        gallery = gr.Gallery(label="Candidates: click one to tick or untick it", columns=6, height=420,
                             allow_preview=False, object_fit="contain", elem_id="grow-gallery")
        picks = gr.CheckboxGroup(label="Keep these", choices=[], elem_id="grow-picks")
        redraw = gr.Button("Redraw the unticked ones (same asks, other seeds)", elem_id="grow-redraw")
        notes = gr.Markdown("", elem_id="grow-notes")
        next_round = gr.Button("Next round: put the original(s) and the ticked candidates in the Train tab",
                               variant="primary", elem_id="grow-next-round")
        session = gr.State(None)
        with gr.Accordion("Compare rounds", open=False):
            gr.Markdown("Each round's chosen checkpoint (the starred one, else its last) side by side, on the same "
                        "prompts and seeds, the base model first: the caption, and the views round 1 lacked.")
            with gr.Row():
                rounds_run = gr.Dropdown(label="The newest round's run", choices=[], allow_custom_value=True,
                                         elem_id="rounds-run", scale=3)
                rounds_seeds = gr.Textbox(value="1,2", label="Seeds", scale=1)
                rounds_go = gr.Button("Compare rounds", elem_id="rounds-go", scale=1)
            rounds_status = gr.Markdown("", elem_id="rounds-status")
            rounds_grids = gr.Gallery(label="Rounds", columns=1, height="auto", elem_id="rounds-grids")
    return GrowTab(tab, source, run, checkpoint, refresh, reference_model, count, seed, weight, prompts, render, stop,
                   status, gallery, picks, notes, next_round, session,
                   (rounds_run, rounds_seeds, rounds_go, rounds_status, rounds_grids), redraw)


def connect(g: GrowTab, store: api.RunStore, service: api.InferenceService, owner_state, editor: set_step.Editor,
            trigger, tabs, then: dict | None = None) -> None:
    """Wire the tab: ``editor`` is the Train tab's (its set, image, caption, mask model), ``trigger`` its trigger box;
    ``then``: a ``.then`` kwargs dict run after the set changes (the epochs box follows the set's size)."""
    def refresh_runs(stored, current, request: gr.Request, profile: gr.OAuthProfile | None = None):
        names = owner_runs(store.root, owner_of(stored, request, profile))
        return gr.update(choices=[("", "")] + names,
                         value=current if current in [n for _, n in names] else (names[0][1] if names else ""))

    @user_errors
    def pick_run(stored, name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if not name:
            return gr.update(choices=[], value=None)
        return checkpoint_choices_update(store.root, owner_of(stored, request, profile), name)

    @user_errors
    def render_candidates(stored, source_, run_, step_, model_, count_, seed_, weight_, prompts_, images_, dataset_,
                          caption_, trigger_, mask_model_, request: gr.Request = None,
                          profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None):
        owner, token = owner_and_token_of(stored, request, profile, oauth_token)
        grown = start_render(store, owner, token, source_, run_, step_, model_, count_, seed_, weight_, prompts_,
                             images_, dataset_, caption_, trigger_)
        total = len(grown.plan.variations)
        yield grown, [], gr.update(choices=[], value=[]), f"Loading {grown.plan.model_folder.name}…", ""
        engine = service.get(grown.plan.model_folder)
        for candidate in api.grow(grown.plan, engine, grown.folder, mask_model=mask_model_):
            grown.candidates.append(candidate)
            yield (grown, *gallery_value(grown), f"{len(grown.candidates)} / {total} candidates (round "
                   f"{grown.plan.round})", candidate_notes(grown))
        yield (grown, *gallery_value(grown), f"{len(grown.candidates)} candidates (round {grown.plan.round}). Tick the "
               "good ones, then **Next round**.", candidate_notes(grown))

    @user_errors
    def redraw_unticked(grown, picked, mask_model_):
        if grown is None or not grown.candidates:
            raise UserError("Render some candidates first.")
        kept = set(picked or [])
        indices = [i + 1 for i, c in enumerate(grown.candidates) if candidate_label(i, c) not in kept]
        if not indices:
            raise UserError("Every candidate is ticked: untick the ones to draw again.")
        grown.redraws += 1
        engine = service.get(grown.plan.model_folder)
        for done, candidate in enumerate(api.redraw(grown.plan, engine, grown.folder, indices, grown.redraws,
                                                    mask_model=mask_model_), start=1):
            grown.candidates[candidate.number - 1] = candidate
            yield (grown, *gallery_value(grown), f"Redrawn {done} / {len(indices)} (ticked ones kept)",
                   candidate_notes(grown))

    def toggle(grown, picked, evt: gr.SelectData):
        if grown is None or not 0 <= evt.index < len(grown.candidates):
            return gr.skip()
        label = candidate_label(evt.index, grown.candidates[evt.index])
        picked = list(picked or [])
        return [p for p in picked if p != label] if label in picked else picked + [label]

    @user_errors
    def to_train_tab(grown, picked, mask_model_, preset_, background_weight_):
        images = next_round_set(grown, picked, mask_model_)
        return (gr.Tabs(selected="train"), *set_step.load(image_set.picked(images, 0), preset_, background_weight_))

    @user_errors
    def compare_rounds(stored, name, seeds_, request: gr.Request = None, profile: gr.OAuthProfile | None = None,
                       oauth_token: gr.OAuthToken | None = None):
        owner, token = owner_and_token_of(stored, request, profile, oauth_token)
        chain = api.round_chain(open_owned_run(store.root, owner, name), lambda path: owned_parent(owner, path))
        plan = api.plan_rounds_grid(chain, seeds=api.parse_numbers(seeds_ or "1", int, "seeds"))
        yield f"{len(chain)} rounds: loading the base model…", []
        engine = service.get(api.base_model_folder(chain[-1], token))
        grids = api.GridImages(plan)
        shown = []
        for row in api.render_grid(engine, plan):
            grids.add(row)
            shown = [(grids.compose(i)[0], plan.prompts[i]) for i in range(row.prompt_index + 1)]
            yield f"{row.done_cells} / {row.total_cells} images", shown
        yield " · ".join(c.label for c in plan.columns), shown

    def owned_parent(owner: str, path: str):
        """A parent round, opened only if it is one of the owner's own runs (the link in run.json is a path)."""
        parent = open_owned_run(store.root, owner, Path(path).name)
        if parent.path.resolve() != Path(path).resolve():
            raise UserError("That run is not one of yours.")
        return parent

    rounds_run, rounds_seeds, rounds_go, rounds_status, rounds_grids = g.rounds
    g.tab.select(refresh_runs, [owner_state, rounds_run], rounds_run, api_name=False)
    rounds_go.click(compare_rounds, [owner_state, rounds_run, rounds_seeds], [rounds_status, rounds_grids],
                    api_name="compare_rounds", concurrency_limit=1, concurrency_id=RENDER_QUEUE)

    render_inputs = [owner_state, g.source, g.run, g.checkpoint, g.reference_model, g.count, g.seed, g.weight,
                     g.prompts, editor.set_state, editor.dataset_state, editor.caption, trigger, editor.mask_model]
    g.tab.select(refresh_runs, [owner_state, g.run], g.run, api_name=False)
    g.refresh.click(refresh_runs, [owner_state, g.run], g.run, api_name=False)
    g.run.change(pick_run, [owner_state, g.run], g.checkpoint, api_name=False)
    rendering = g.render.click(render_candidates, render_inputs, [g.session, g.gallery, g.picks, g.status, g.notes],
                               api_name="grow", concurrency_limit=1, concurrency_id=RENDER_QUEUE)
    g.stop.click(lambda: "Stopped: the candidates rendered so far are kept.", None, g.status, cancels=[rendering],
                 api_name=False)
    redrawing = g.redraw.click(redraw_unticked, [g.session, g.picks, editor.mask_model],
                               [g.session, g.gallery, g.picks, g.status, g.notes], api_name="grow_redraw",
                               concurrency_limit=1, concurrency_id=RENDER_QUEUE)
    g.stop.click(None, None, None, cancels=[redrawing], api_name=False)
    g.gallery.select(toggle, [g.session, g.picks], g.picks, api_name=False)
    moved = g.next_round.click(to_train_tab, [g.session, g.picks, editor.mask_model, editor.preset,
                                              editor.background_weight], [tabs, *editor.load_outputs],
                               api_name="grow_next_round")
    if then:
        moved.then(**then)
