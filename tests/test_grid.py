"""The comparison grid: it reproduces what training previewed, swaps LoRAs on one pipeline, labels its axes.

The run used here is built by hand from the trainer's own pieces (``add_lora``, ``save_lora``, ``PreviewRenderer``)
with strong random LoRA weights, so every checkpoint visibly changes the image: a grid that loaded the wrong
checkpoint, the wrong weight, or no LoRA at all cannot match the previews.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import cli
from trainer.config import TrainingConfig
from trainer.errors import UserError
from trainer.review.grid import GridImages, GridSpec, compose_grid, output_paths, parse_numbers, plan_grid, render_grid
from trainer.review.prompts import suggest_prompts
from trainer.review.inference import LoraPipeline, RenderSettings
from trainer.runs.folder import RunFolder

sys.path.insert(0, str(Path(__file__).parent))
from conftest import subject_image  # noqa: E402

CPU = torch.device("cpu")


def make_run(root: Path, steps=(2, 4), strength: float = 0.5) -> RunFolder:
    """A finished tiny-demo run: checkpoints at ``steps`` with random LoRAs, previews drawn by the training path."""
    from trainer.training.encode import encode_prompts
    from trainer.dataset.prepare import training_size
    from trainer.model.lora import add_lora, save_lora
    from trainer.model.loading import load_parts, resolve_model
    from trainer.training.previews import PreviewRenderer

    cfg = TrainingConfig(caption="a photo of [trigger] with red hair", trigger="ohwx", model="tiny-demo", rank=4,
                         steps=max(steps), save_every=min(steps), resolution=64, preview_steps=2,
                         sample_prompts=("[trigger] as a watercolor painting",))
    image, mask = subject_image()
    run = RunFolder.create_at(root, cfg, image, mask)
    folder = resolve_model("tiny-demo")
    run.model_path = str(folder)
    run.train_size = training_size(image.width, image.height, cfg.resolution)
    parts = load_parts(folder, CPU, torch.float32)
    renderer = PreviewRenderer(parts, encode_prompts(parts, cfg.preview_prompts, cfg.max_text_tokens))

    def previews(step):
        out = []
        for i, prompt in enumerate(cfg.preview_prompts):
            path = run.preview_path(step, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            renderer.render(prompt, cfg.preview_seed, *run.train_size, cfg.preview_steps, cfg.preview_guidance).save(path)
            out.append({"path": path, "prompt": prompt, "seed": cfg.preview_seed})
        run.record_previews(step, out)

    previews(0)
    add_lora(parts.transformer, cfg.rank, cfg.alpha, cfg.seed)
    gen = torch.Generator().manual_seed(7)
    for step in steps:
        with torch.no_grad():
            for name, p in parts.transformer.named_parameters():
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * strength)
        path = run.checkpoint_path(step)
        save_lora(parts.transformer, path, extra_metadata={"step": str(step), "base_model": "tiny-demo"})
        run.record_checkpoint(step, path)
        previews(step)
    run.set_status("finished")
    return run


def module_run(tmp_path_factory, tiny_model_dir, **make_run_args) -> RunFolder:
    """``make_run`` for a module-scoped fixture. Such a fixture runs before the autouse data-dir fixture: point the
    tiny demo at the session model."""
    from trainer import runtime

    data = tmp_path_factory.mktemp("griddata")
    (data / "models").mkdir()
    (data / "models" / "tiny-demo").symlink_to(tiny_model_dir, target_is_directory=True)
    with runtime.using(runtime.Runtime(data_dir=data)):
        return make_run(tmp_path_factory.mktemp("runs") / "run", **make_run_args)


@pytest.fixture(scope="module")
def built_run(tmp_path_factory, tiny_model_dir):
    return module_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def engine(built_run):
    return LoraPipeline.load(Path(built_run.model_path), CPU, torch.float32)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------- rendering

def test_grid_reproduces_the_training_previews(built_run, engine):
    run = built_run
    cfg = run.config
    plan = plan_grid(run, GridSpec(prompts=(cfg.caption,), seeds=(cfg.preview_seed,), weights=(1.0, 0.5)))
    assert [c.label for c in plan.columns] == ["base model", "step 2", "step 4"]
    assert plan.prompts == (cfg.training_caption,)  # [trigger] filled in
    rows = list(render_grid(engine, plan))
    assert [(r.prompt_index, r.row_index) for r in rows] == [(0, 0), (0, 1)]
    full, half = rows[0].images, rows[1].images

    def preview(step):
        entries = run.base_previews if step == 0 else next(c for c in run.checkpoints if c["step"] == step)["previews"]
        return _pixels(Image.open(run.path / entries[0]["path"]))

    for col, step in enumerate((0, 2, 4)):
        diff = np.abs(_pixels(full[col]) - preview(step)).max()
        assert diff <= 1, f"column {col} (step {step}) differs from the training preview by {diff}"
    # The LoRA matters, and the weight matters: otherwise the comparison above proves nothing.
    assert np.abs(preview(2) - preview(0)).mean() > 5 and np.abs(preview(4) - preview(2)).mean() > 5
    assert np.abs(_pixels(half[1]) - _pixels(full[1])).mean() > 2
    assert np.abs(_pixels(half[1]) - _pixels(full[0])).mean() > 2
    assert half[0] is full[0]  # the base image of a seed is drawn once and reused for every weight


@pytest.mark.parametrize("tier,storage", [("16gb", "fp8"), ("12gb", "nf4")])
def test_a_small_card_tier_renders_from_the_quantized_base_like_training(built_run, engine, tier, storage):
    """Compare / Try it / the grid CLI load the base as the GPU's memory tier says: on a 16 or 12 GB card the
    transformer's block weights are fp8 / NF4 as in training (bf16 plus T5 would not fit), and a LoRA loads on top
    (NF4 codes are packed in one dimension, which diffusers' ``load_lora_weights`` shape check could not read). Here
    the tier is asked for by name on the CPU; the text encoders' host-memory placement only differs from the device
    on a GPU and is not visible here."""
    from trainer.model.quantize import QuantizedLinear

    small = LoraPipeline.load(Path(built_run.model_path), CPU, torch.float32, memory_tier=tier)
    assert small.memory_tier == tier and engine.memory_tier == "full"
    quantized = [m for m in small.parts.transformer.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and {m.storage for m in quantized} == {storage}
    assert not any(isinstance(m, QuantizedLinear) for m in engine.parts.transformer.modules())

    run, cfg = built_run, built_run.config
    settings = RenderSettings(*run.train_size, cfg.preview_steps, cfg.preview_guidance)
    lora = run.checkpoint_path(4)
    prompt = cfg.training_caption
    got = {w: _pixels(small.render(prompt, 3, settings, lora if w else None, w or 1.0)) for w in (0, 1.0)}
    ref = {w: _pixels(engine.render(prompt, 3, settings, lora if w else None, w or 1.0)) for w in (0, 1.0)}
    for w in (0, 1.0):  # fp8 weights: close to the bf16/fp32 render, not equal
        assert np.abs(got[w] - ref[w]).mean() < 4, w  # measured: fp8 0.1 (base) / 1.0 (LoRA), NF4 2.1-2.6 of 255
    assert np.abs(got[1.0] - got[0]).mean() > 5  # and the LoRA is applied on top of the quantized layers (27)
    small.close()


def test_render_grid_loads_prompts_once_and_streams_progress(built_run, engine, monkeypatch):
    calls = []
    original = engine.render
    monkeypatch.setattr(engine, "render", lambda prompt, seed, settings, lora=None, weight=1.0: (
        calls.append((prompt, seed, lora, weight)) or original(prompt, seed, settings, lora, weight)))
    encoded = []
    real_embed = engine.embed
    monkeypatch.setattr(engine, "embed", lambda prompts, n: encoded.append(list(prompts)) or real_embed(prompts, n))
    plan = plan_grid(built_run, GridSpec(prompts=("[trigger] smiling", "[trigger] as a statue"), seeds=(1, 2),
                                         weights=(1.0,), steps=(4,), sample_steps=1))
    rows = list(render_grid(engine, plan))
    assert [r.done_cells for r in rows] == [2, 4, 6, 8] and rows[-1].total_cells == 8
    assert encoded[0] == ["ohwx smiling", "ohwx as a statue"]
    assert sum(1 for c in calls if c[2] is None) == 4  # base: once per prompt and seed
    assert {Path(c[2]).name for c in calls if c[2] is not None} == {"lora-000004.safetensors"}


def test_stop_ends_the_grid_early(built_run, engine):
    plan = plan_grid(built_run, GridSpec(prompts=("x",), seeds=(1, 2, 3), sample_steps=1))
    checks = []

    def should_stop():  # let the first row's three cells through, then stop
        checks.append(1)
        return len(checks) > len(plan.columns)

    rows = list(render_grid(engine, plan, should_stop=should_stop))
    assert len(rows) == 1


def test_plan_errors_are_sentences(built_run):
    with pytest.raises(UserError, match="No checkpoint at step 3"):
        plan_grid(built_run, GridSpec(prompts=("x",), steps=(3,)))
    with pytest.raises(UserError):
        GridSpec(prompts=("x",), weights=(3.0,))
    with pytest.raises(UserError):
        RenderSettings(width=100, height=64, steps=2, guidance=1.0)
    with pytest.raises(UserError, match="seeds"):
        parse_numbers("1, two", int, "seeds")
    assert parse_numbers("1, 2 3", int) == (1, 2, 3)


# ---------------------------------------------------------------- the image

def test_compose_grid_places_cells_and_labels():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    images = [[Image.new("RGB", (64, 48), c) for c in row] for row in colours]
    images[1][2] = None  # not drawn yet
    canvas, layout = compose_grid(images, ["base model", "step 250", "step 500"], ["seed 1", "seed 2"],
                                  title="a photo of ohwx")
    assert layout.n_rows == 2 and layout.n_cols == 3 and layout.left > 0 and layout.top > 0
    for r in range(2):
        for c in range(3):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            centre = canvas.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            expected = (225, 225, 225) if (r, c) == (1, 2) else colours[r][c]
            assert centre == expected
            assert layout.cell_at((x0 + x1) / 2, (y0 + y1) / 2) == (r, c)
    assert layout.cell_at(2, 2) is None  # the title corner
    assert layout.cell_at(layout.left - 1, layout.top + 5) is None  # the row-label band
    # Labels are drawn: dark text in the column-label band above each column and in the row-label band.
    pixels = np.asarray(canvas.convert("L"))
    for c in range(3):
        x0, y0, x1, _ = layout.cell_box(0, c)
        assert (pixels[layout.labels_top:y0, x0:x1] < 100).any(), f"no label above column {c}"
    _, y0, _, y1 = layout.cell_box(1, 0)
    assert (pixels[y0:y1, :layout.left] < 100).any()
    assert (pixels[:layout.labels_top, :] < 100).any()  # the title


def test_grid_images_fill_in_rows_and_map_clicks(built_run):
    plan = plan_grid(built_run, GridSpec(prompts=("p1", "p2"), seeds=(1, 2), weights=(0.5, 1.0)))
    grids = GridImages(plan, cell_size=32)
    from trainer.review.grid import RowRendered

    red = Image.new("RGB", (48, 64), (255, 0, 0))
    grids.add(RowRendered(1, 3, (red, red, red), 3, plan.cells))
    image, layout = grids.compose(1)
    assert layout.cell_height == 32 and layout.n_rows == 4  # seeds x weights
    x0, y0, x1, y1 = layout.cell_box(3, 2)
    assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))[0] > 200
    cell = grids.cell(1, 3, 2)
    assert cell["seed"] == 2 and cell["weight"] == 1.0 and cell["step"] == 4 and cell["prompt"] == "p2"
    assert grids.cell(0, 0, 0)["checkpoint"] is None


def test_output_paths():
    assert output_paths(Path("out/grid.png"), 1) == [Path("out/grid.png")]
    assert output_paths(Path("out/grid.png"), 2) == [Path("out/grid-1.png"), Path("out/grid-2.png")]


# ---------------------------------------------------------------- suggested prompts

def test_suggested_prompts_follow_practice():
    cfg = TrainingConfig(caption="a photo of [trigger], a woman with red hair in a green coat", trigger="ohwx")
    prompts = suggest_prompts(cfg)
    texts = [p.text for p in prompts]
    assert texts[0] == "a photo of ohwx, a woman with red hair in a green coat"  # memorisation first
    assert "a photo of ohwx, a woman with blue hair in a green coat" in texts  # one colour changed
    assert any("back view" in t for t in texts)
    assert any("watercolor" in t for t in texts)
    assert any("hair" in t and "jacket" in t for t in texts)
    lengths = sorted(len(t.split()) for t in texts)
    assert lengths[0] <= 3 and lengths[-1] >= 40  # short and long prompts
    assert all("ohwx" in t for t in texts)
    assert len(set(texts)) == len(texts)
    # No trigger word (a style): prompts still name the subject through the caption.
    style = suggest_prompts(TrainingConfig(caption="an ink drawing of a fox", trigger=""))
    assert all("fox" in p.text for p in style)


# ---------------------------------------------------------------- command line

def test_grid_cli(built_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = cli.main(["grid", str(built_run.path), "--seeds", "1", "--weights", "1.0", "--checkpoints", "4",
                     "--prompt", "[trigger] on a beach", "--prompt", "[trigger] in the snow", "--sample-steps", "1",
                     "--cell-size", "40", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "grid-1.png"), str(tmp_path / "grid-2.png")]
    image = Image.open(tmp_path / "grid-1.png")
    assert image.width > 2 * 40 and image.height > 40

    assert cli.main(["grid", str(tmp_path), "--output", str(out)]) == cli.EXIT_USER_ERROR
    assert "not a run folder" in capsys.readouterr().err
    assert cli.main(["grid", str(built_run.path), "--checkpoints", "9", "--output", str(out)]) == 2
    assert "No checkpoint at step 9" in capsys.readouterr().err
    assert cli.main(["grid", str(built_run.path), "--memory-tier", "8gb", "--output", str(out)]) == 2
    assert "Unknown memory tier '8gb'" in capsys.readouterr().err


# ---------------------------------------------------------------- the Compare and Try it tabs (handlers, no browser)

OWNER = "browser-abc"


@pytest.fixture
def owned_run(built_run, tmp_path):
    """A copy of the built run inside OWNER's folder of a runs root, as the app lays runs out."""
    import shutil

    from trainer.runs.store import owner_folder_name as owner_folder

    runs_root = tmp_path / "runs"
    name = "20260101-000000-lora-0000abcd"
    shutil.copytree(built_run.path, runs_root / owner_folder(OWNER) / name)
    return runs_root, name


@pytest.fixture
def service(engine):
    from trainer.review.inference import InferenceService

    loads = []
    svc = InferenceService(loader=lambda path: loads.append(path) or engine)
    svc.loads = loads
    return svc


def test_runs_are_listed_and_opened_only_for_their_owner(owned_run):
    from ui.owned_runs import open_owned_run, owner_runs

    runs_root, name = owned_run
    assert [n for _, n in owner_runs(runs_root, OWNER)] == [name]
    assert owner_runs(runs_root, "someone-else") == []
    assert open_owned_run(runs_root, OWNER, name).path.name == name
    for bad in ("../" + name, "..", "/etc", name + "/..", ""):
        with pytest.raises(UserError):
            open_owned_run(runs_root, OWNER, bad)
    with pytest.raises(UserError):
        open_owned_run(runs_root, "someone-else", name)


def test_compare_tab_selecting_a_run_and_streaming_a_grid(owned_run, service):
    from ui.compare_grids import cell_at, show_prompt, stream_grid
    from ui.compare_tab import on_run_selected

    runs_root, name = owned_run
    shown = on_run_selected(runs_root, OWNER, name)
    assert shown["grid_checkpoints"]["choices"] == [("step 2", 2), ("step 4", 4)]
    assert shown["prompts"].splitlines()[0] == "a photo of ohwx with red hair"
    assert (shown["width"], shown["height"]) == (48, 64)

    updates = list(stream_grid(service, runs_root, OWNER, name,
                               ([4], "1,2", "1.0", "[trigger] on a beach\n[trigger] in the snow", 48, 64, 1)))
    assert len(updates) == 1 + 4 + 1  # loading, one per row (2 prompts x 2 seeds), done
    status, image, _, files, session = updates[-1]
    assert "Done: 8 images" in status and len(files) == 2 and all(Path(f).is_file() for f in files)
    assert Path(files[0]).is_relative_to(runs_root)  # inside the run folder: Gradio may serve it
    assert service.loads == [Path(session.grids.plan.run.model_path)]

    _, layout = session.grids.compose(1)
    x0, y0, x1, y1 = layout.cell_box(1, 1)  # second seed, the step-4 column
    cell = cell_at(session, 1, (x0 + x1) / 2, (y0 + y1) / 2)
    assert cell["run"] == name and cell["step"] == 4 and cell["seed"] == 2 and cell["prompt"] == "ohwx in the snow"
    assert cell_at(session, 1, 1, 1) is None
    assert show_prompt(session, 0).size == show_prompt(session, 1).size


def test_compare_tab_downloads_star_and_prune(owned_run):
    import safetensors.torch

    from trainer.review.advisor import starred_step
    from ui.compare_tab import checkpoint_table, export_files, prune, star
    from ui.owned_runs import open_owned_run

    runs_root, name = owned_run
    kohya, diffusers = export_files(runs_root, OWNER, name, 4)
    assert all(k.startswith("lora_unet_") for k in safetensors.torch.load_file(kohya))
    assert all(k.startswith("transformer.") for k in safetensors.torch.load_file(diffusers))
    assert Path(kohya).name == "lora-000004-kohya.safetensors"

    star(runs_root, OWNER, name, 2)
    run = open_owned_run(runs_root, OWNER, name)
    assert starred_step(run.path) == 2 and list(checkpoint_table(run)["starred"]) == ["★", ""]
    assert "Nothing to delete" in prune(runs_root, OWNER, name, 1)  # keeps step 4 (newest) and step 2 (starred)
    star(runs_root, OWNER, name, None)
    assert "step 2" in prune(runs_root, OWNER, name, 1)
    assert list(checkpoint_table(open_owned_run(runs_root, OWNER, name))["step"]) == [4]


def test_compare_tab_scores_checkpoints(owned_run, service):
    from trainer.review.advisor import load_advice
    from ui.compare_tab import stream_advice
    from ui.owned_runs import open_owned_run

    runs_root, name = owned_run
    updates = list(stream_advice(service, runs_root, OWNER, name))
    status, summary, table, scores = updates[-1]
    assert "heuristic" in status and "Suggested: step" in summary
    assert list(table["step"]) == [2, 4] and table["copy score"].notna().all()
    assert set(scores["measure"]) == {"copy score − base", "artefact score"}
    advice = load_advice(open_owned_run(runs_root, OWNER, name).path)
    assert advice is not None and advice.step in (2, 4)


def test_try_it_renders_the_lora_beside_the_base_model(owned_run, service, built_run):
    from ui.tryit_tab import generate, run_defaults

    runs_root, name = owned_run
    defaults = run_defaults(runs_root, OWNER, name)
    assert defaults["checkpoint"]["value"] == 4 and defaults["prompt"] == "a photo of ohwx with red hair"
    cfg = built_run.config
    lora, base, caption = generate(service, runs_root, OWNER, name, 4, 1.0, "a photo of [trigger] with red hair",
                                   cfg.preview_seed, 48, 64, cfg.preview_steps, cfg.preview_guidance)
    assert "step 4 at weight 1" in caption and "ohwx" in caption
    step4 = next(c for c in built_run.checkpoints if c["step"] == 4)["previews"][0]["path"]
    assert np.abs(_pixels(lora) - _pixels(Image.open(built_run.path / step4))).max() <= 1
    assert np.abs(_pixels(base) - _pixels(Image.open(built_run.path / built_run.base_previews[0]["path"]))).max() <= 1
    zero, base2, _ = generate(service, runs_root, OWNER, name, 4, 0.0, "x", 3, 48, 64, 1, 3.5)
    assert np.abs(_pixels(zero) - _pixels(base2)).max() <= 1  # weight 0 is the base model
    with pytest.raises(UserError):
        generate(service, runs_root, OWNER, name, 4, 1.6, "x", 1, 48, 64, 1, 3.5)
    with pytest.raises(UserError):
        generate(service, runs_root, OWNER, name, 4, 1.0, "x", 1, 50, 64, 1, 3.5)


def test_app_has_train_compare_and_try_it_tabs(tmp_path):
    import gradio as gr

    from trainer.jobs.manager import JobManager
    from ui.app import build_app

    demo = build_app(JobManager(), tmp_path / "runs")
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert [t.label for t in tabs][:1] == ["Train"] and {"Compare", "Try it"} <= {t.label for t in tabs}
    assert {"grid", "try_it", "score"} <= {d.api_name for d in demo.fns.values() if d.api_name}
    # The grid's title (its prompt) is drawn at its top-left, where Gradio puts an image's label: no label over it.
    grid = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "grid-image")
    assert grid.show_label is False
