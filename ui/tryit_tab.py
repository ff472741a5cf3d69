"""The Try it tab: one of your checkpoints at a LoRA weight, on your prompt, beside the base model's image.

Same seed, size and steps for both images, so they differ by the LoRA alone. An overfit late checkpoint is often
usable at weight 0.5 (docs/PRACTICE.md §4, §6), hence the slider up to 1.5. Works on tiny-demo on a CPU and on FLUX.1-dev
on a GPU: the base model is loaded once and shared with the Compare tab.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from trainer import api
from trainer.errors import UserError
from ui.compare_grids import cell_at
from ui.compare_tab import CompareTab
from ui.owned_runs import checkpoint_choices, checkpoint_path, open_owned_run, owner_runs
from ui.session import RENDER_QUEUE, owner_of, user_errors

MAX_WEIGHT = 1.5


def checkpoint_choices_update(runs_root: Path, owner: str, name: str, step: int | None = None):
    """The checkpoint dropdown for run ``name``: its checkpoints, ``step`` (or the starred/last one) selected."""
    run = open_owned_run(runs_root, owner, name)
    choices = checkpoint_choices(run)
    steps = [s for _, s in choices]
    if step not in steps:
        star = api.starred_step(run.path)
        step = star if star in steps else (steps[-1] if steps else None)
    return gr.update(choices=choices, value=step)


def run_defaults(runs_root: Path, owner: str, name: str) -> dict[str, Any]:
    """What picking a run fills in: its checkpoints, its caption, training size and preview settings."""
    run = open_owned_run(runs_root, owner, name)
    width, height = run.train_size or (run.config.resolution, run.config.resolution)
    render_with = api.default_render_model(run)  # what drew its previews: the same images come back
    steps, guidance = api.render_defaults(run, render_with)
    return {"checkpoint": checkpoint_choices_update(runs_root, owner, name), "prompt": run.config.training_caption,
            "width": width, "height": height, "steps": steps, "guidance": guidance,
            "render_with": gr.update(choices=api.render_options(run), value=render_with)}


def generate(service: api.InferenceService, runs_root: Path, owner: str, name: str, step, weight: float, prompt: str,
             seed, width, height, steps, guidance, render_with: str = ""):
    """(LoRA image, base image, caption line) for the chosen checkpoint and weight."""
    run = open_owned_run(runs_root, owner, name)
    if step in (None, ""):
        raise UserError("Pick a checkpoint.")
    if not (prompt or "").strip():
        raise UserError("Write a prompt.")
    weight = float(weight)
    if not 0.0 <= weight <= MAX_WEIGHT:
        raise UserError(f"The LoRA weight must be between 0 and {MAX_WEIGHT}.")
    checkpoint = checkpoint_path(run, step)
    settings = api.RenderSettings(width=int(width), height=int(height), steps=int(steps), guidance=float(guidance),
                              max_text_tokens=run.config.max_text_tokens)
    prompt = api.fill_trigger(prompt, run.config.trigger)
    engine = service.get(api.render_model_folder(run, render_with))
    with engine.lock:  # both images from one uninterrupted turn on the pipeline
        lora_image = engine.render(prompt, int(seed), settings, checkpoint, weight)
        base_image = engine.render(prompt, int(seed), settings)
    return lora_image, base_image, f"step {int(step)} at weight {weight:g} · seed {int(seed)} · “{prompt}”"


@dataclass
class TryItTab:
    tab: Any
    run: Any
    checkpoint: Any
    weight: Any
    prompt: Any
    seed: Any
    width: Any
    height: Any
    steps: Any
    guidance: Any
    status: Any
    render_with: Any = None


def build(runs_root: Path, service: api.InferenceService, owner_state) -> TryItTab:
    runs_root = Path(runs_root)
    with gr.Tab("Try it", id="tryit") as tab:
        gr.Markdown("## Try a checkpoint\nYour LoRA at a weight, beside the base model with the same seed. "
                    "A late, overfit checkpoint is often usable at weight 0.5.")
        with gr.Row():
            run = gr.Dropdown(label="Run", choices=[], elem_id="tryit-run", scale=3)
            checkpoint = gr.Dropdown(label="Checkpoint", choices=[], elem_id="tryit-checkpoint", scale=2)
            refresh = gr.Button("↻ Refresh", scale=1)
        weight = gr.Slider(0.0, MAX_WEIGHT, value=1.0, step=0.05, label="LoRA weight", elem_id="tryit-weight")
        prompt = gr.Textbox(label="Prompt ([trigger] is replaced by the trigger word)", lines=2, elem_id="tryit-prompt")
        with gr.Row():
            seed = gr.Number(value=1, label="Seed", precision=0)
            width = gr.Number(value=512, label="Width", precision=0, step=16)
            height = gr.Number(value=512, label="Height", precision=0, step=16)
            steps = gr.Number(value=20, label="Steps", precision=0, minimum=1, maximum=200)
            guidance = gr.Number(value=3.5, label="Guidance")
        render_with = gr.Dropdown(label="Render with", choices=[("the run's base model", "")], value="",
                                  allow_custom_value=True, elem_id="tryit-render-with",
                                  info="klein: its distilled model (4 steps, guidance 1) is where a LoRA trained on "
                                       "the base model is used; the right-hand image is then that model without it")
        go = gr.Button("Generate", variant="primary", elem_id="tryit-generate")
        status = gr.Markdown("")
        with gr.Row():
            lora_image = gr.Image(label="With the LoRA", type="pil", interactive=False, height=480,
                                  elem_id="tryit-lora")
            base_image = gr.Image(label="Base model (no LoRA)", type="pil", interactive=False, height=480,
                                  elem_id="tryit-base")

    def refresh_runs(stored, current, request: gr.Request, profile: gr.OAuthProfile | None = None):
        choices = owner_runs(runs_root, owner_of(stored, request, profile))
        names = [n for _, n in choices]
        return gr.update(choices=choices, value=current if current in names else (names[0] if names else None))

    @user_errors
    def pick_run(stored, name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if not name:
            return tuple(gr.update() for _ in range(7))
        d = run_defaults(runs_root, owner_of(stored, request, profile), name)
        return d["checkpoint"], d["prompt"], d["width"], d["height"], d["steps"], d["guidance"], d["render_with"]

    @user_errors
    def pick_renderer(stored, name, choice, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if not name:
            return gr.update(), gr.update()
        return api.render_defaults(open_owned_run(runs_root, owner_of(stored, request, profile), name), choice)

    @user_errors
    def make(stored, name, step, weight_, prompt_, seed_, w, h, n, g, render_with_="", request: gr.Request = None,
             profile: gr.OAuthProfile | None = None, progress=gr.Progress()):
        progress(0.1, desc="Rendering (the first render loads the model)")
        return generate(service, runs_root, owner_of(stored, request, profile), name, step, weight_, prompt_, seed_,
                        w, h, n, g, render_with_ or "")

    @user_errors
    def fill_first_time(stored, name, step, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if step not in (None, ""):  # already chosen (by hand or by a grid click): keep it
            return tuple(gr.update() for _ in range(7))
        return pick_run(stored, name, request, profile)

    # .input, not .change: a grid click sets the run programmatically and must not reset its settings.
    tab.select(refresh_runs, [owner_state, run], run, api_name=False).then(
        fill_first_time, [owner_state, run, checkpoint], [checkpoint, prompt, width, height, steps, guidance,
                                                           render_with], api_name=False)
    refresh.click(refresh_runs, [owner_state, run], run, api_name=False)
    run.input(pick_run, [owner_state, run], [checkpoint, prompt, width, height, steps, guidance, render_with],
              api_name=False)
    render_with.input(pick_renderer, [owner_state, run, render_with], [steps, guidance], api_name=False)
    go.click(make, [owner_state, run, checkpoint, weight, prompt, seed, width, height, steps, guidance, render_with],
             [lora_image, base_image, status], api_name="try_it", concurrency_limit=1, concurrency_id=RENDER_QUEUE)
    return TryItTab(tab=tab, run=run, checkpoint=checkpoint, weight=weight, prompt=prompt, seed=seed, width=width,
                    height=height, steps=steps, guidance=guidance, status=status, render_with=render_with)


def connect_to_compare(compare: CompareTab, tryit: TryItTab, tabs) -> None:
    """Clicking a grid cell opens that checkpoint, weight, prompt and seed in the Try it tab."""
    outputs = [tabs, tryit.run, tryit.checkpoint, tryit.weight, tryit.prompt, tryit.seed, tryit.width, tryit.height,
               tryit.steps, tryit.guidance, tryit.render_with, tryit.status]

    @user_errors
    def on_click(stored, session, index, evt: gr.SelectData, request: gr.Request,
                 profile: gr.OAuthProfile | None = None):
        xy = evt.index if isinstance(evt.index, (list, tuple)) and len(evt.index) == 2 else None
        cell = cell_at(session, index, *xy) if xy else None
        if cell is None:
            return tuple(gr.update() for _ in outputs)
        owner = owner_of(stored, request, profile)
        step = cell["step"] or None  # the base-model column opens the last checkpoint at weight 0
        runs = owner_runs(compare.runs_root, owner)
        return (gr.Tabs(selected="tryit"), gr.update(choices=runs, value=cell["run"]),
                checkpoint_choices_update(compare.runs_root, owner, cell["run"], step),
                cell["weight"] if step else 0.0, cell["prompt"], cell["seed"], cell["width"], cell["height"],
                cell["steps"], cell["guidance"],
                gr.update(choices=api.render_options(open_owned_run(compare.runs_root, owner, cell["run"])),
                          value=session.render_with),
                f"Opened from the grid: {f'step {step}' if step else 'the base model (weight 0)'}, seed {cell['seed']}.")

    compare.grid_image.select(on_click, [compare.owner_state, compare.session, compare.prompt_pick], outputs,
                              api_name=False)
