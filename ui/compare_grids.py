"""The Compare tab's grids: checkpoints x seeds (base model first) streamed row by row, prompts switched, cells clicked.

One browser tab's rendered grids live in a ``GridSession`` (gr.State), so switching the prompt or clicking a cell
needs no new render; every finished prompt's grid is also saved as a PNG in the run's ``grids/`` folder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from trainer import api
from trainer.errors import UserError
from ui.owned_runs import open_owned_run

GRID_CELL = 384  # pixels per cell in the page's grid image (the PNG download has the same)


@dataclass
class GridSession:
    """What one browser tab has rendered: the grids (for clicks and prompt switching) and their PNG files."""
    run_name: str
    grids: api.GridImages
    files: list[str]
    render_with: str = ""  # the model that drew them ("" = the run's base model), for Try it when a cell is clicked


def grid_spec(run: api.RunFolder, steps, seeds: str, weights: str, prompts: str, width, height,
              sample_steps, render_with: str = "") -> api.GridSpec:
    lines = tuple(line.strip() for line in (prompts or "").splitlines() if line.strip())
    if not steps:
        raise UserError("Tick at least one checkpoint to compare.")
    return api.GridSpec(prompts=lines, seeds=api.parse_numbers(seeds, int, "seeds"),
                        weights=api.parse_numbers(weights, float, "LoRA weights"), steps=tuple(int(s) for s in steps),
                        width=int(width) if width else None, height=int(height) if height else None,
                        sample_steps=int(sample_steps) if sample_steps else None,
                        guidance=api.render_defaults(run, render_with)[1])


def stream_grid(service: api.InferenceService, runs_root: Path, owner: str, name: str, spec_args: tuple,
                progress: Callable[[float, str], None] = lambda f, d: None,
                render_with: str = "") -> Iterator[tuple]:
    """Yield (status, grid image, prompt picker update, files, session) after every rendered row."""
    run = open_owned_run(runs_root, owner, name)
    plan = api.plan_grid(run, grid_spec(run, *spec_args, render_with=render_with))
    grids = api.GridImages(plan, cell_size=GRID_CELL)
    session = GridSession(name, grids, [], render_with)
    picker = gr.update(choices=[(_short(p), i) for i, p in enumerate(plan.prompts)], value=0)
    progress(0.0, "loading the base model")
    yield ("Loading the base model…", grids.compose(0)[0], picker, None, session)
    engine = service.get(api.render_model_folder(run, render_with))
    out_dir = run.path / "grids" / time.strftime("%Y%m%d-%H%M%S")
    for row in api.render_grid(engine, plan):
        grids.add(row)
        progress(row.done_cells / row.total_cells, f"{row.done_cells}/{row.total_cells} images")
        image, _ = grids.compose(row.prompt_index)
        if row.row_index == len(plan.rows) - 1:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"grid-{row.prompt_index + 1}.png"
            image.save(path)
            session.files.append(str(path))
        status = (f"Prompt {row.prompt_index + 1}/{len(plan.prompts)}, row {row.row_index + 1}/{len(plan.rows)} · "
                  f"{row.done_cells}/{row.total_cells} images")
        yield (status, image, gr.update(value=row.prompt_index), list(session.files) or None, session)
    yield (f"Done: {plan.cells} images. Click a cell to open it in **Try it**.", image, gr.update(),
           list(session.files), session)


def show_prompt(session: GridSession | None, index):
    if session is None or index is None:
        return gr.update()
    return session.grids.compose(int(index))[0]


def cell_at(session: GridSession | None, index, x: float, y: float) -> dict | None:
    """The clicked cell's settings (run, checkpoint step, weight, prompt, seed, size), or None off the cells."""
    if session is None:
        return None
    prompt_index = int(index or 0)
    _, layout = session.grids.compose(prompt_index)
    hit = layout.cell_at(x, y)
    if hit is None:
        return None
    cell = session.grids.cell(prompt_index, *hit)
    cell["run"] = session.run_name
    return cell


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
