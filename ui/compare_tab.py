"""The Compare tab: pick a run, see its checkpoints (size, scores, star), compare them in grids, export, publish.

Handlers are plain functions of (runs root, owner, inputs) so they can be tested without a browser; ``build``
only lays out components and wires them. Only the owner's own runs are listed or opened.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
import pandas as pd

from trainer import api
from trainer.errors import UserError
from ui.compare_grids import show_prompt, stream_grid
from ui.owned_runs import checkpoint_choices, checkpoint_path, open_owned_run, owner_runs
from ui.session import RENDER_QUEUE, owner_of, token_of, user_errors

ADVICE_NOTE = ("Scores are a **heuristic**: the copy score measures how close samples of *other* prompts come to "
               "the training image (pixels and structure; a set: the nearest of its images, named in the advice), "
               "the artefact score the extra fine-grain energy compared with the base model's image. They cannot "
               "judge likeness or taste. On tiny-demo they mean nothing.")


# ---------------------------------------------------------------- checkpoints: table, star, disk

def checkpoint_table(run: api.RunFolder) -> pd.DataFrame:
    advice = api.load_advice(run.path)
    scores = {s.step: s for s in advice.scores} if advice else {}
    columns = ["step", "size (MB)", "starred", "copy score", "artefact score"]
    if any(s.nearest for s in scores.values()):
        columns.append("nearest image")  # a set: the training image the checkpoint's samples come nearest to
    rows = []
    for f in api.checkpoint_files(run):
        s = scores.get(f.step)
        rows.append({"step": f.step, "size (MB)": round(f.size_bytes / 1e6, 1), "starred": "★" if f.starred else "",
                     "copy score": round(s.copy, 3) if s else None,
                     "artefact score": round(s.artefact, 3) if s else None, "nearest image": s.nearest if s else None})
    return pd.DataFrame(rows, columns=columns)


def summary_markdown(run: api.RunFolder) -> str:
    lines = [f"**{run.path.name}** — {run.status}. {api.disk_summary(run)}."]
    advice = api.load_advice(run.path)
    if advice:
        lines.append(advice.markdown())
    return "  \n".join(lines)


def scores_frame(run: api.RunFolder) -> pd.DataFrame:
    advice = api.load_advice(run.path)
    rows = []
    for s in advice.scores if advice else ():
        rows.append({"step": s.step, "score": s.copy_rise, "measure": "copy score − base"})
        rows.append({"step": s.step, "score": s.artefact, "measure": "artefact score"})
    return pd.DataFrame(rows, columns=["step", "score", "measure"])


def on_run_selected(runs_root: Path, owner: str, name: str | None) -> dict[str, Any]:
    """Everything the tab shows about a run, by field name."""
    run = open_owned_run(runs_root, owner, name)
    choices = checkpoint_choices(run)
    steps = [step for _, step in choices]
    star = api.starred_step(run.path)
    return {
        "summary": summary_markdown(run),
        "table": checkpoint_table(run),
        "scores": scores_frame(run),
        "grid_checkpoints": gr.update(choices=choices, value=steps),
        "prompts": "\n".join(s.text for s in api.suggest_prompts(run.config, run.captions())),
        "width": (run.train_size or (run.config.resolution,) * 2)[0],
        "height": (run.train_size or (run.config.resolution,) * 2)[1],
        "sample_steps": api.render_defaults(run, api.default_render_model(run))[0],
        "render_with": gr.update(choices=api.render_options(run), value=api.default_render_model(run)),
        "checkpoint": gr.update(choices=choices, value=(star if star in steps else (steps[-1] if steps else None))),
    }


def star(runs_root: Path, owner: str, name: str, step) -> str:
    run = open_owned_run(runs_root, owner, name)
    api.set_star(run.path, None if step in (None, "") else int(step))
    return summary_markdown(run)


def prune(runs_root: Path, owner: str, name: str, keep) -> str:
    run = open_owned_run(runs_root, owner, name)
    try:
        n = int(keep)
    except (TypeError, ValueError):
        raise UserError("Give how many of the newest checkpoints to keep.") from None
    deleted = api.keep_last(run.path, n)
    run = api.RunFolder.open(run.path)
    if not deleted:
        return f"Nothing to delete. {api.disk_summary(run)}."
    return (f"Deleted the checkpoints of step {', '.join(map(str, deleted))}. {api.disk_summary(run)} left "
            "(the starred one is always kept).")


# ---------------------------------------------------------------- exports

def export_files(runs_root: Path, owner: str, name: str, step) -> tuple[str, str]:
    """Both export layouts of one checkpoint, written into the run's exports/ folder. Returns (kohya, diffusers)."""
    run = open_owned_run(runs_root, owner, name)
    source = checkpoint_path(run, step)
    out = []
    for fmt in ("kohya", "diffusers"):
        target = run.path / "exports" / api.export_name(source, fmt)
        if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
            api.export_lora(source, fmt, target)
        out.append(str(target))
    return out[0], out[1]


# ---------------------------------------------------------------- advice

def stream_advice(service: api.InferenceService, runs_root: Path, owner: str, name: str,
                  progress: Callable[[float, str], None] = lambda f, d: None) -> Iterator[tuple]:
    """Render the scoring samples (non-caption prompts, every checkpoint, the base model), then score.
    Yields (status markdown, summary markdown, table, scores frame)."""
    run = open_owned_run(runs_root, owner, name)
    plan = api.plan_grid(run, api.advice_spec(run))
    grids = api.GridImages(plan)
    yield ("Loading the base model…", gr.update(), gr.update(), gr.update())
    engine = service.get(api.base_model_folder(run))  # scores compare against the run's own base model
    for row in api.render_grid(engine, plan):
        grids.add(row)
        progress(row.done_cells / row.total_cells, f"scoring samples {row.done_cells}/{row.total_cells}")
        yield (f"Rendering scoring samples: {row.done_cells}/{row.total_cells}", gr.update(), gr.update(), gr.update())
    advice = api.advice_from_grid(grids, run.load_set())  # a set: each sample against its nearest image
    api.save_advice(run.path, advice)
    yield (ADVICE_NOTE, summary_markdown(run), checkpoint_table(run), scores_frame(run))


# ---------------------------------------------------------------- publishing

def publish_run(runs_root: Path, owner: str, name: str, repo_id: str, private: bool, step, weight,
                token: str | None) -> str:
    run = open_owned_run(runs_root, owner, name)
    grids = sorted((run.path / "grids").glob("*/grid-1.png"))
    plan = api.plan_publish(run, repo_id, step=int(step) if step not in (None, "") else None,
                            weight=float(weight) if weight not in (None, "") else None, private=bool(private),
                            grid=grids[-1] if grids else None)
    url = api.publish(plan, token)
    return f"Published step {plan.step} (weight {plan.weight:g}) to [{plan.repo_id}]({url}) — " \
           f"{'private' if plan.private else 'public'}."


# ---------------------------------------------------------------- layout and wiring

@dataclass
class CompareTab:
    tab: Any
    run: Any
    grid_image: Any
    prompt_pick: Any
    session: Any
    owner_state: Any
    runs_root: Path


def build(runs_root: Path, service: api.InferenceService, owner_state) -> CompareTab:
    """Lay out the tab inside the current ``gr.Tabs``; returns what other tabs connect to."""
    runs_root = Path(runs_root)
    with gr.Tab("Compare", id="compare") as tab:
        gr.Markdown("## Compare checkpoints\nColumns: the **base model** (no LoRA), then each checkpoint; rows: seeds "
                    "(and LoRA weights). Test the caption, small changes, extremes and other styles: the best "
                    "checkpoint learned the subject but still follows other prompts.")
        with gr.Row():
            run = gr.Dropdown(label="Run", choices=[], elem_id="compare-run", scale=4)
            refresh = gr.Button("↻ Refresh", scale=1)
        summary = gr.Markdown("", elem_id="compare-summary")
        table = gr.Dataframe(label="Checkpoints", interactive=False, elem_id="compare-table")

        with gr.Accordion("Comparison grid", open=True):
            grid_checkpoints = gr.CheckboxGroup(label="Checkpoints", choices=[], elem_id="grid-checkpoints")
            with gr.Row():
                seeds = gr.Textbox(value="1,2", label="Seeds (rows)")
                weights = gr.Textbox(value="1.0", label="LoRA weights", info="e.g. 0.5,1.0: a row per seed and weight")
                width = gr.Number(label="Width", precision=0)
                height = gr.Number(label="Height", precision=0)
                sample_steps = gr.Number(label="Steps", precision=0)
            render_with = gr.Dropdown(label="Render with", choices=[("the run's base model", "")], value="",
                                      allow_custom_value=True, elem_id="grid-render-with",
                                      info="klein: its distilled model renders the LoRA as it will be used (4 steps, "
                                           "guidance 1); the base column is that model without the LoRA")
            prompts = gr.Textbox(label="Test prompts (one grid per line; [trigger] is replaced)", lines=6,
                                 info="Suggested: the caption (memorisation), a colour change, the views no training "
                                      "image's caption names (a back view, ...), other hair/clothes, watercolor, "
                                      "short/medium/long. Edit freely.",
                                 elem_id="grid-prompts")
            with gr.Row():
                render = gr.Button("Render grid", variant="primary", elem_id="grid-render")
                stop = gr.Button("Stop", variant="stop")
            grid_status = gr.Markdown("", elem_id="grid-status")
            prompt_pick = gr.Radio(label="Prompt", choices=[], type="value")
            # No label on the image itself: Gradio draws it over the image's top-left corner, where the grid's title
            # (its prompt) is, and hid it. The same words stand above the image instead.
            gr.Markdown("**Grid**: click a cell to open it in Try it.", elem_id="grid-image-label")
            grid_image = gr.Image(label="Grid", show_label=False, type="pil", interactive=False, elem_id="grid-image")
            grid_files = gr.File(label="Grid PNGs", file_count="multiple", interactive=False)
            session = gr.State(None)

        with gr.Accordion("Which checkpoint? (scores, a heuristic)", open=False):
            gr.Markdown(ADVICE_NOTE)
            score_btn = gr.Button("Score every checkpoint")
            score_status = gr.Markdown("")
            scores_plot = gr.LinePlot(x="step", y="score", color="measure", title="Scores per checkpoint", height=240)

        with gr.Accordion("Download, star, disk, publish", open=True):
            checkpoint = gr.Dropdown(label="Checkpoint", choices=[], elem_id="export-checkpoint")
            with gr.Row():
                kohya_btn = gr.DownloadButton("Download for ComfyUI / Forge (kohya)", value=None,
                                              elem_id="download-kohya")
                diffusers_btn = gr.DownloadButton("Download for diffusers", value=None, elem_id="download-diffusers")
                star_btn = gr.Button("★ Star this checkpoint")
            with gr.Row():
                keep_n = gr.Number(value=3, label="Keep the newest N checkpoints", precision=0, minimum=1)
                prune_btn = gr.Button("Delete older checkpoints (never the starred one)", variant="stop")
            disk_status = gr.Markdown("")
            with gr.Row():
                repo_id = gr.Textbox(label="Hub repo", placeholder="your-username/my-lora")
                private = gr.Checkbox(value=True, label="Private")
                weight = gr.Number(value=1.0, label="Recommended LoRA weight")
                publish_btn = gr.Button("Publish to the Hugging Face Hub")
            publish_status = gr.Markdown("Uses your own token (HF_TOKEN, or your login on a Space); never saved.")

    # ---- wiring
    selected_outputs = [summary, table, scores_plot, grid_checkpoints, prompts, width, height, sample_steps, checkpoint,
                        render_with]

    def refresh_runs(stored, request: gr.Request, profile: gr.OAuthProfile | None = None):
        choices = owner_runs(runs_root, owner_of(stored, request, profile))
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    @user_errors
    def select_run(stored, name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if not name:
            return tuple(gr.update() for _ in selected_outputs)
        shown = on_run_selected(runs_root, owner_of(stored, request, profile), name)
        return tuple(shown[k] for k in ("summary", "table", "scores", "grid_checkpoints", "prompts", "width",
                                        "height", "sample_steps", "checkpoint", "render_with"))

    @user_errors
    def pick_renderer(stored, name, choice, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if not name:
            return gr.update()
        run_ = open_owned_run(runs_root, owner_of(stored, request, profile), name)
        return api.render_defaults(run_, choice)[0]

    @user_errors
    def grid(stored, name, steps, seeds_, weights_, prompts_, w, h, n, render_with_="", request: gr.Request = None,
             profile: gr.OAuthProfile | None = None, progress=gr.Progress()):
        yield from stream_grid(service, runs_root, owner_of(stored, request, profile), name,
                               (steps, seeds_, weights_, prompts_, w, h, n), lambda f, d: progress(f, desc=d),
                               render_with=render_with_ or "")

    @user_errors
    def score(stored, name, request: gr.Request, profile: gr.OAuthProfile | None = None, progress=gr.Progress()):
        yield from stream_advice(service, runs_root, owner_of(stored, request, profile), name,
                                 lambda f, d: progress(f, desc=d))

    @user_errors
    def prepare_downloads(stored, name, step, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if not name or step in (None, ""):
            return gr.update(value=None), gr.update(value=None)
        kohya, diffusers = export_files(runs_root, owner_of(stored, request, profile), name, step)
        return gr.update(value=kohya), gr.update(value=diffusers)

    @user_errors
    def do_star(stored, name, step, request: gr.Request, profile: gr.OAuthProfile | None = None):
        owner = owner_of(stored, request, profile)
        text = star(runs_root, owner, name, step)
        run_ = open_owned_run(runs_root, owner, name)
        return text, checkpoint_table(run_), gr.update(choices=checkpoint_choices(run_))

    @user_errors
    def do_prune(stored, name, keep, request: gr.Request, profile: gr.OAuthProfile | None = None):
        owner = owner_of(stored, request, profile)
        message = prune(runs_root, owner, name, keep)
        run_ = open_owned_run(runs_root, owner, name)
        choices = checkpoint_choices(run_)
        return (message, checkpoint_table(run_), gr.update(choices=choices, value=[s for _, s in choices]),
                gr.update(choices=choices, value=choices[-1][1] if choices else None))

    @user_errors
    def do_publish(stored, name, repo, private_, step, weight_, request: gr.Request,
                   profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None):
        return publish_run(runs_root, owner_of(stored, request, profile), name, repo, private_, step, weight_,
                           token_of(stored, request, profile, oauth_token))

    tab.select(refresh_runs, owner_state, run, api_name=False)
    refresh.click(refresh_runs, owner_state, run, api_name=False)
    run.change(select_run, [owner_state, run], selected_outputs, api_name=False)
    render_with.input(pick_renderer, [owner_state, run, render_with], sample_steps, api_name=False)
    grid_event = render.click(grid, [owner_state, run, grid_checkpoints, seeds, weights, prompts, width, height,
                                     sample_steps, render_with], [grid_status, grid_image, prompt_pick, grid_files, session],
                              api_name="grid", concurrency_limit=1, concurrency_id=RENDER_QUEUE)
    stop.click(None, cancels=[grid_event], api_name=False)
    prompt_pick.input(show_prompt, [session, prompt_pick], grid_image, api_name=False)
    score_btn.click(score, [owner_state, run], [score_status, summary, table, scores_plot], api_name="score",
                    concurrency_limit=1, concurrency_id=RENDER_QUEUE)
    checkpoint.change(prepare_downloads, [owner_state, run, checkpoint], [kohya_btn, diffusers_btn], api_name=False)
    star_btn.click(do_star, [owner_state, run, checkpoint], [summary, table, checkpoint], api_name=False)
    prune_btn.click(do_prune, [owner_state, run, keep_n], [disk_status, table, grid_checkpoints, checkpoint],
                    api_name=False)
    publish_btn.click(do_publish, [owner_state, run, repo_id, private, checkpoint, weight], publish_status,
                      api_name=False)
    return CompareTab(tab=tab, run=run, grid_image=grid_image, prompt_pick=prompt_pick, session=session,
                      owner_state=owner_state, runs_root=runs_root)
