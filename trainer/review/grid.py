"""Checkpoint comparison grids, as practitioners judge a run (docs/PRACTICE.md §5).

Columns are the base model (no LoRA) then each checkpoint; rows are seeds (x LoRA weights when more than one
is asked for); one grid per prompt. The base column is drawn once per prompt and seed and reused for every
weight. ``render_grid`` yields each row as soon as it is drawn, so the page and the CLI can show progress;
``compose_grid`` draws the labelled image and returns the layout that maps a pixel back to its cell.

Also here: the suggested test prompts made from the caption and the trigger word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageDraw, ImageFont

from trainer.config import TRIGGER_PLACEHOLDER
from trainer.errors import UserError
from trainer.review.inference import LoraPipeline, RenderSettings
from trainer.runs.folder import RunFolder

BASE_STEP = 0  # the base-model column


# ---------------------------------------------------------------- what to draw

@dataclass(frozen=True)
class Column:
    step: int  # 0 = base model
    checkpoint: Path | None
    name: str = ""  # a label other than "step N" (a rounds grid: "round 2 · step 250")
    # no LoRA, the base model given these pictures as references (a reference-editing family: the "no training"
    # column of a rounds grid, trainer.grow.rounds)
    references: tuple = ()

    @property
    def label(self) -> str:
        return self.name or ("base model" if self.step == BASE_STEP else f"step {self.step}")


@dataclass(frozen=True)
class Row:
    seed: int
    weight: float

    def label(self, show_weight: bool) -> str:
        return f"seed {self.seed}" + (f"\nweight {self.weight:g}" if show_weight else "")


@dataclass(frozen=True)
class GridSpec:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (1, 2)
    weights: tuple[float, ...] = (1.0,)
    steps: tuple[int, ...] | None = None  # checkpoint steps to show; None = all
    width: int | None = None  # None = the run's training size
    height: int | None = None
    sample_steps: int | None = None  # None = the run's preview steps
    guidance: float | None = None

    def __post_init__(self) -> None:
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise UserError("Give at least one prompt for the grid.")
        if not self.seeds:
            raise UserError("Give at least one seed for the grid.")
        if not self.weights or any(not 0.0 <= w <= 2.0 for w in self.weights):
            raise UserError("LoRA weights must be between 0 and 2.")


@dataclass(frozen=True)
class GridPlan:
    run: RunFolder
    prompts: tuple[str, ...]
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    settings: RenderSettings

    @property
    def show_weight(self) -> bool:
        return len({r.weight for r in self.rows}) > 1

    @property
    def cells(self) -> int:
        return len(self.prompts) * len(self.rows) * len(self.columns)


def plan_grid(run: RunFolder, spec: GridSpec) -> GridPlan:
    cfg = run.config
    available = {c["step"]: run.path / c["path"] for c in run.checkpoints if (run.path / c["path"]).is_file()}
    if not available:
        raise UserError(f"The run in '{run.path}' has no checkpoints yet.")
    if spec.steps is None:
        steps = sorted(available)
    else:
        missing = [s for s in spec.steps if s not in available]
        if missing:
            raise UserError(f"No checkpoint at step {', '.join(map(str, missing))}; this run has steps "
                            f"{', '.join(map(str, sorted(available)))}.")
        steps = list(dict.fromkeys(spec.steps))
    columns = (Column(BASE_STEP, None), *(Column(s, available[s]) for s in steps))
    rows = tuple(Row(seed, weight) for seed in spec.seeds for weight in spec.weights)
    width, height = run.train_size or (cfg.resolution, cfg.resolution)
    settings = RenderSettings(width=spec.width or width, height=spec.height or height,
                              steps=spec.sample_steps or cfg.preview_steps,
                              guidance=cfg.preview_guidance if spec.guidance is None else spec.guidance,
                              max_text_tokens=cfg.max_text_tokens)
    prompts = tuple(dict.fromkeys(fill_trigger(p, cfg.trigger) for p in spec.prompts))
    return GridPlan(run=run, prompts=prompts, columns=columns, rows=rows, settings=settings)


def fill_trigger(prompt: str, trigger: str) -> str:
    """Replace ``[trigger]``; unlike training captions, never add the trigger word to a prompt without it
    (a prompt without the subject is how leaking is tested)."""
    return " ".join(prompt.replace(TRIGGER_PLACEHOLDER, trigger.strip()).split())


# ---------------------------------------------------------------- rendering

@dataclass(frozen=True)
class RowRendered:
    """One finished row: its images in column order, and how far the whole grid is."""
    prompt_index: int
    row_index: int
    images: tuple[Image.Image, ...]
    done_cells: int
    total_cells: int


def render_grid(engine: LoraPipeline, plan: GridPlan,
                should_stop: Callable[[], bool] = lambda: False) -> Iterator[RowRendered]:
    """Draw the grid row by row. Prompts are encoded once up front; the base model image of a prompt and
    seed is drawn once and reused for every weight."""
    engine.embed(list(plan.prompts), plan.settings.max_text_tokens)
    done = 0
    for p, prompt in enumerate(plan.prompts):
        base: dict[int, Image.Image] = {}
        for r, row in enumerate(plan.rows):
            images = []
            for column in plan.columns:
                if should_stop():
                    return
                if column.references:
                    images.append(engine.render(prompt, row.seed, plan.settings, references=column.references))
                elif column.checkpoint is None:
                    if row.seed not in base:
                        base[row.seed] = engine.render(prompt, row.seed, plan.settings)
                    images.append(base[row.seed])
                else:
                    images.append(engine.render(prompt, row.seed, plan.settings, column.checkpoint, row.weight))
                done += 1
            yield RowRendered(p, r, tuple(images), done, plan.cells)


# ---------------------------------------------------------------- drawing the labelled image

@dataclass(frozen=True)
class GridLayout:
    """Where the cells are in a composed grid image."""
    left: int  # width of the row-label band
    top: int  # height of the title + column-label bands
    cell_width: int
    cell_height: int
    gap: int
    n_rows: int
    n_cols: int
    labels_top: int = 0  # where the column labels start (below the title)

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, column) of the cell under pixel (x, y), or None on a label or a gap."""
        x, y = x - self.left, y - self.top
        if x < 0 or y < 0:
            return None
        col, cx = divmod(int(x), self.cell_width + self.gap)
        row, cy = divmod(int(y), self.cell_height + self.gap)
        if col >= self.n_cols or row >= self.n_rows or cx >= self.cell_width or cy >= self.cell_height:
            return None
        return row, col

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x = self.left + col * (self.cell_width + self.gap)
        y = self.top + row * (self.cell_height + self.gap)
        return x, y, x + self.cell_width, y + self.cell_height

    def to_dict(self) -> dict:
        return self.__dict__.copy()


BACKGROUND, INK, PENDING = (255, 255, 255), (20, 20, 20), (225, 225, 225)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if draw.textlength(candidate, font=font) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + " …"
    return lines


def compose_grid(images: list[list[Image.Image | None]], column_labels: list[str], row_labels: list[str],
                 title: str = "", cell_size: int | None = None, gap: int = 4) -> tuple[Image.Image, GridLayout]:
    """One labelled image: title on top, column labels under it, row labels on the left.

    ``images[row][col]`` may be ``None`` for a cell not drawn yet (a gray placeholder). ``cell_size`` scales cells
    so their longer side is that many pixels (None keeps the first image's size).
    """
    n_rows, n_cols = len(row_labels), len(column_labels)
    first = next((im for row in images for im in row if im is not None), None)
    w, h = first.size if first is not None else (cell_size or 256, cell_size or 256)
    if cell_size:
        scale = cell_size / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    font_size = max(12, min(24, w // 12))
    font, title_font = _font(font_size), _font(font_size + 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 6
    left = max(int(max((probe.textlength(line, font=font) for label in row_labels for line in label.split("\n")),
                       default=0)) + 16, 8 * font_size)
    total_w = left + n_cols * w + (n_cols - 1) * gap + gap
    title_lines = _wrap(probe, title, title_font, total_w - 16) if title else []
    col_lines = [_wrap(probe, label, font, w - 4, max_lines=2) for label in column_labels]
    top = len(title_lines) * (line_h + 2) + max((len(c) for c in col_lines), default=1) * line_h + 10
    total_h = top + n_rows * h + (n_rows - 1) * gap + gap
    canvas = Image.new("RGB", (total_w, total_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    labels_top = 4 + len(title_lines) * (line_h + 2)
    layout = GridLayout(left=left, top=top, cell_width=w, cell_height=h, gap=gap, n_rows=n_rows, n_cols=n_cols,
                        labels_top=labels_top)

    for i, line in enumerate(title_lines):
        draw.text((8, 4 + i * (line_h + 2)), line, fill=INK, font=title_font)
    y = labels_top
    for c, lines in enumerate(col_lines):
        x0, _, _, _ = layout.cell_box(0, c)
        for i, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((x0 + (w - tw) / 2, y + i * line_h), line, fill=INK, font=font)
    for r, label in enumerate(row_labels):
        _, y0, _, _ = layout.cell_box(r, 0)
        lines = label.split("\n")
        for i, line in enumerate(lines):
            draw.text((8, y0 + (h - len(lines) * line_h) / 2 + i * line_h), line, fill=INK, font=font)
        for c in range(n_cols):
            box = layout.cell_box(r, c)
            image = images[r][c] if r < len(images) and c < len(images[r]) else None
            if image is None:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=PENDING)
            else:
                canvas.paste(image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), box[:2])
    return canvas, layout


class GridImages:
    """The grid of each prompt, filled in as rows arrive; what the page and the CLI draw from."""

    def __init__(self, plan: GridPlan, cell_size: int | None = None):
        self.plan = plan
        self.cell_size = cell_size
        self.cells: list[list[list[Image.Image | None]]] = [
            [[None] * len(plan.columns) for _ in plan.rows] for _ in plan.prompts]

    def add(self, row: RowRendered) -> None:
        self.cells[row.prompt_index][row.row_index] = list(row.images)

    def compose(self, prompt_index: int) -> tuple[Image.Image, GridLayout]:
        plan = self.plan
        return compose_grid(self.cells[prompt_index], [c.label for c in plan.columns],
                            [r.label(plan.show_weight) for r in plan.rows], title=plan.prompts[prompt_index],
                            cell_size=self.cell_size)

    def cell(self, prompt_index: int, row: int, col: int) -> dict:
        """What a clicked cell shows: enough to re-create it in the try-it tab."""
        plan = self.plan
        column, r = plan.columns[col], plan.rows[row]
        return {"prompt": plan.prompts[prompt_index], "seed": r.seed, "weight": r.weight, "step": column.step,
                "checkpoint": str(column.checkpoint) if column.checkpoint else None,
                "width": plan.settings.width, "height": plan.settings.height, "steps": plan.settings.steps,
                "guidance": plan.settings.guidance}


def output_paths(output: Path, n_prompts: int) -> list[Path]:
    """``grid.png`` for one prompt; ``grid-1.png``, ``grid-2.png``, … for several."""
    output = Path(output)
    if n_prompts == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(n_prompts)]


def parse_numbers(text: str, kind=int, what: str = "numbers") -> tuple:
    """``"1, 2,3"`` → ``(1, 2, 3)``; a clear error for anything else."""
    items = [t for t in re.split(r"[,\s]+", (text or "").strip()) if t]
    try:
        values = tuple(kind(t) for t in items)
    except ValueError:
        raise UserError(f"Could not read the {what} '{text}': give them separated by commas, e.g. 1,2,3.") from None
    if not values:
        raise UserError(f"Give at least one of the {what}.")
    return values

