"""Grow the dataset (trainer/grow/): candidates from a checkpoint or by reference editing, into a folder in the
``--dataset`` layout with provenance; the next round trains on it and keeps its lineage.

Real parts throughout: a tiny-demo run with saved LoRA checkpoints rendered by diffusers (LoraPipeline), the real
u2netp masks, the real CLI in a subprocess, tiny-klein's Flux2KleinPipeline with reference images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import TRIGGER_PLACEHOLDER
from trainer.dataset.imageset import SetImage, load_folder
from trainer.errors import UserError
from trainer.grow import lineage
from trainer.grow.job import GrowRequest, grow, plan_grow
from trainer.grow.variations import MAX_CANDIDATES, plan_variations
from trainer.review.inference import LoraPipeline
from trainer.runs.folder import RunFolder

sys.path.insert(0, str(Path(__file__).parent))
from conftest import subject_image  # noqa: E402
from test_grid import module_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory, tiny_model_dir):
    return module_run(tmp_path_factory, tiny_model_dir, strength=2.0)  # a strong LoRA: its candidates differ


@pytest.fixture(scope="module")
def engine(grown_run):
    return LoraPipeline.load(Path(grown_run.model_path), CPU, torch.float32)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---- what candidates ask for


def test_variations_ask_first_for_what_the_set_lacks():
    plan = plan_variations("a photo of [trigger] with red hair", ["a photo of [trigger] with red hair"],
                           own_prompts=["[trigger] riding a bicycle"], count=8)
    assert len(plan) == 8
    assert plan[0].kind == "your prompt" and plan[0].caption == "[trigger] riding a bicycle"
    assert plan[0].instruction == "the subject riding a bicycle"  # an editing model knows no trigger word
    # a front view only: the missing views come next, the most extreme first, each alone
    assert [v.kind for v in plan[1:4]] == ["view: back", "view: side", "view: three-quarter"]
    assert all(TRIGGER_PLACEHOLDER in v.caption and "plain" in v.caption for v in plan[1:])
    assert all(TRIGGER_PLACEHOLDER not in v.instruction for v in plan)
    assert len({v.caption for v in plan}) == 8  # no two ask for the same thing
    # a set that already shows the back and the side is asked for the views it still lacks
    shown = plan_variations("[trigger]", ["[trigger], back view", "[trigger] seen from the side"], count=2)
    assert [v.kind for v in shown] == ["view: three-quarter", "view: front"]  # a caption naming an angle is not a front view
    # a caption without [trigger] gets it where the subject is named first
    assert plan_variations("a red ball", count=1)[0].caption.startswith("[trigger], a red ball, ")
    with pytest.raises(UserError, match=f"1 to {MAX_CANDIDATES}"):
        plan_variations("x", count=MAX_CANDIDATES + 1)


# ---- from a checkpoint


def test_candidates_from_a_checkpoint_fill_a_dataset_folder_with_provenance(grown_run, engine, tmp_path):
    step = grown_run.checkpoints[-1]["step"]
    plan = plan_grow(GrowRequest(output=tmp_path / "r2", count=3, run=grown_run.path, step=step, seed=5,
                                 sample_steps=2))
    assert plan.round == 2 and plan.parent["run"] == str(grown_run.path)
    candidates = list(grow(plan, engine, tmp_path / "r2"))
    folder = tmp_path / "r2"
    assert [c.name for c in candidates] == ["candidate-001.png", "candidate-002.png", "candidate-003.png"]
    # the original stays in, with its caption and mask
    original = Image.open(folder / "original-01.png")
    assert np.array_equal(_pixels(original), _pixels(grown_run.load_set()[0].image))
    assert (folder / "original-01.txt").read_text().strip() == grown_run.config.caption
    assert (folder / "masks" / "original-01.png").is_file()
    for candidate in candidates:
        image = Image.open(candidate.path)
        # what was written is what the checkpoint renders for that prompt and seed
        again = engine.render(candidate.prompt, candidate.seed, plan.settings, lora=plan.lora)
        assert np.array_equal(_pixels(image), _pixels(again))
        assert "ohwx" in candidate.prompt and TRIGGER_PLACEHOLDER not in candidate.prompt
        assert (folder / candidate.name).with_suffix(".txt").read_text().strip() == candidate.caption
        assert 0.0 <= candidate.copy_score <= 1.0 and 0.0 <= candidate.likeness <= 1.0
        assert candidate.nearest == "image.png"
    # the LoRA reached the render: the base model draws another picture for the same prompt and seed
    first = candidates[0]
    base = engine.render(first.prompt, first.seed, plan.settings, lora=None)
    assert np.abs(_pixels(base) - _pixels(Image.open(first.path))).mean() > 2
    recorded = lineage.read(folder)
    assert recorded.round == 2 and recorded.parent["name"] == grown_run.config.name
    assert recorded.source == {"kind": "checkpoint", "run": str(grown_run.path), "step": step, "weight": 1.0}
    assert recorded.images["original-01.png"]["source"]["kind"] == "original"
    assert recorded.images["candidate-002.png"]["seed"] == candidates[1].seed
    assert recorded.images["candidate-002.png"]["prompt"] == candidates[1].prompt


def test_a_stopped_render_keeps_what_it_rendered(grown_run, engine, tmp_path):
    plan = plan_grow(GrowRequest(output=tmp_path / "r2", count=4, run=grown_run.path,
                                 step=grown_run.checkpoints[0]["step"], sample_steps=1))
    rendered = []
    for candidate in grow(plan, engine, tmp_path / "r2", should_stop=lambda: len(rendered) >= 2):
        rendered.append(candidate)
    assert len(rendered) == 2
    assert sorted(p.name for p in (tmp_path / "r2").glob("candidate-*.png")) == ["candidate-001.png",
                                                                                  "candidate-002.png"]
    assert set(lineage.read(tmp_path / "r2").images) == {"original-01.png", "candidate-001.png", "candidate-002.png"}


def test_redrawing_replaces_only_the_chosen_candidates_with_new_seeds(grown_run, engine, tmp_path):
    from trainer.grow.job import redraw

    plan = plan_grow(GrowRequest(output=tmp_path / "r2", count=3, run=grown_run.path, step=4, sample_steps=1))
    first = list(grow(plan, engine, tmp_path / "r2"))
    before = {c.name: _pixels(Image.open(c.path)) for c in first}
    again = list(redraw(plan, engine, tmp_path / "r2", [2], attempt=1))
    assert [c.name for c in again] == ["candidate-002.png"] and again[0].number == 2
    assert again[0].seed not in {c.seed for c in first} and again[0].prompt == first[1].prompt  # same ask
    assert not np.array_equal(_pixels(Image.open(again[0].path)), before["candidate-002.png"])
    for name in ("candidate-001.png", "candidate-003.png"):  # the others are untouched
        assert np.array_equal(_pixels(Image.open(tmp_path / "r2" / name)), before[name])
    recorded = lineage.read(tmp_path / "r2").images
    assert recorded["candidate-002.png"]["seed"] == again[0].seed
    assert recorded["candidate-001.png"]["seed"] == first[0].seed
    second = list(redraw(plan, engine, tmp_path / "r2", [2], attempt=2))  # a second redraw: yet another seed
    assert second[0].seed not in {again[0].seed, *(c.seed for c in first)}
    with pytest.raises(UserError, match="no candidate 4"):
        list(redraw(plan, engine, tmp_path / "r2", [4], attempt=3))


def test_grow_refuses_what_cannot_work_in_a_sentence(grown_run, engine, tmp_path):
    with pytest.raises(UserError, match=r"no checkpoint at step 3; its checkpoints are at steps 2, 4"):
        plan_grow(GrowRequest(output=tmp_path / "a", run=grown_run.path, step=3))
    with pytest.raises(UserError, match="takes no reference images"):
        plan_grow(GrowRequest(output=tmp_path / "b", run=grown_run.path, reference_model="tiny-demo"))
    with pytest.raises(UserError, match="Grow from a run's checkpoint"):
        plan_grow(GrowRequest(output=tmp_path / "c"))
    with pytest.raises(UserError, match="takes no reference images"):
        engine.render("x", 1, plan_grow(GrowRequest(output=tmp_path / "d", run=grown_run.path, step=2)).settings,
                      references=[Image.new("RGB", (64, 64))])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    plan = plan_grow(GrowRequest(output=tmp_path / "full", count=1, run=grown_run.path, step=2, sample_steps=1))
    with pytest.raises(UserError, match="already exists and is not empty"):
        next(grow(plan, engine, tmp_path / "full"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # nothing of the user's was touched


def test_a_damaged_grow_json_is_a_sentence(tmp_path):
    image, _ = subject_image()
    image.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of [trigger]")
    (tmp_path / lineage.FILE).write_text("{not json")
    with pytest.raises(UserError, match="not a readable grow.json"):
        load_folder(tmp_path)


# ---- the next round, through the real CLI


def cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)


def test_the_cli_grows_a_folder_and_round_two_trains_on_the_picked_ones(grown_run, tmp_path):
    folder = tmp_path / "round2"
    out = cli("grow", grown_run.path, "--from-checkpoint", 4, "--count", 3, "--sample-steps", 1, "--size", "64x64",
              "--prompt", "[trigger] holding an umbrella", "--output", folder)
    assert out.returncode == 0, out.stderr
    assert "train --dataset" in out.stderr
    listed = [line.split("\t") for line in out.stdout.splitlines() if line.startswith(str(folder))]
    assert [Path(row[0]).name for row in listed] == ["candidate-001.png", "candidate-002.png", "candidate-003.png"]
    assert listed[0][1] == "your prompt"
    (folder / "candidate-002.png").unlink()  # the CLI's way of not picking it
    run_dir = tmp_path / "run2"
    out = cli("train", "--dataset", folder, "--model", "tiny-demo", "--preset", "quick-test-250", "--trigger", "ohwx",
              "--steps", 2, "--save-every", 2, "--resolution", 64, "--output", run_dir)
    assert out.returncode == 0, out.stderr
    run = RunFolder.open(run_dir)
    assert run.status == "finished"
    assert run.lineage["round"] == 2 and run.lineage["parent"]["run"] == str(grown_run.path)
    assert run.lineage["source"]["step"] == 4
    entries = {e["name"]: e for e in run.set_entries()}
    assert list(entries) == ["original-01.png", "candidate-001.png", "candidate-003.png"]  # the original first
    assert entries["original-01.png"]["provenance"]["source"]["kind"] == "original"
    assert entries["candidate-001.png"]["provenance"]["kind"] == "your prompt"
    assert "umbrella" in entries["candidate-001.png"]["caption"]
    assert json.loads((run_dir / "run.json").read_text())["lineage"]["round"] == 2
    # the model card says what was synthetic and how it was made
    from trainer.review.publish import model_card

    card = model_card(run, "me/round2", "lora", 2, 1.0, "the last checkpoint", [], None)
    assert "## How the dataset was grown" in card and "This is round 2" in card
    assert "round 1's LoRA at step 4" in card
    assert "| original-01.png | original |" in card and "| candidate-001.png | synthetic | your prompt |" in card
    # and the runs list says which round a run is
    from trainer.runs.store import RunStore

    store = RunStore(tmp_path / "owners")
    (store.owner_root("me")).mkdir(parents=True)
    (store.owner_root("me") / "run2").symlink_to(run_dir, target_is_directory=True)
    assert " · round 2 · finished · " in store.listing("me")[0].label


# ---- zero-shot: reference editing on tiny-klein


def test_reference_editing_renders_the_pictures_subject(tmp_path, isolated_data_dir, tiny_klein_dir):
    (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)
    image, mask = subject_image((64, 64))
    picture = SetImage("me.png", image, mask, "a photo of [trigger]")
    plan = plan_grow(GrowRequest(output=tmp_path / "r", count=2, reference_model="tiny-klein", pictures=(picture,),
                                 caption="a photo of [trigger]", trigger="ohwx", size=(64, 64), sample_steps=2))
    assert plan.source.kind == "reference" and plan.lora is None and plan.round == 2
    engine = LoraPipeline.load(plan.model_folder, CPU, torch.float32)
    candidates = list(grow(plan, engine, tmp_path / "r"))
    assert len(candidates) == 2
    assert candidates[0].prompt.startswith("the same subject")  # the instruction, not the trigger caption
    assert lineage.read(tmp_path / "r").source == {"kind": "reference", "model": "tiny-klein"}
    # the reference really reaches the transformer: another reference, another picture (same prompt and seed)
    prompt, seed = candidates[0].prompt, candidates[0].seed
    with_ref = engine.render(prompt, seed, plan.settings, references=[image])
    other = engine.render(prompt, seed, plan.settings, references=[Image.new("RGB", (64, 64), (20, 200, 40))])
    none = engine.render(prompt, seed, plan.settings)
    # rendering is deterministic (the same reference twice: the same pixels), so any difference is the reference's;
    # tiny-klein's random weights attend little to it, so the differences are small but there
    assert np.array_equal(_pixels(with_ref), _pixels(engine.render(prompt, seed, plan.settings, references=[image])))
    assert np.abs(_pixels(with_ref) - _pixels(other)).sum() > 0
    assert np.abs(_pixels(with_ref) - _pixels(none)).sum() > 0


def test_a_klein_rounds_grid_has_a_no_training_column(tmp_path, isolated_data_dir, tiny_klein_dir):
    """A reference-editing family's rounds grid shows what editing alone gives: the base model given round 1's
    picture as the reference, beside the base model and each round's checkpoint."""
    from trainer.config import TrainingConfig
    from trainer.grow.rounds import plan_rounds_grid
    from trainer.review.grid import GridPlan, render_grid

    (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)
    image, mask = subject_image((64, 64))
    cfg = TrainingConfig(caption="a photo of [trigger]", trigger="ohwx", model="tiny-klein", rank=4, steps=2,
                         save_every=2, resolution=64, preview_steps=2)
    first = RunFolder.create_at(tmp_path / "r1", cfg, image, mask)
    second = RunFolder.create_at(tmp_path / "r2", cfg, image, mask)
    second.lineage = {"round": 2, "parent": {"run": str(first.path), "round": 1}}
    for run in (first, second):
        run.model_path = str(tiny_klein_dir)
        run.train_size = (64, 64)
        run.checkpoint_path(2).write_bytes(b"")  # the plan only needs the files; these columns are not rendered
        run.record_checkpoint(2, run.checkpoint_path(2))
    plan = plan_rounds_grid([first, second], seeds=(1,))
    assert [c.label for c in plan.columns] == ["base model", "no training (reference edit)", "round 1 · step 2",
                                               "round 2 · step 2"]
    engine = LoraPipeline.load(tiny_klein_dir, CPU, torch.float32)
    two = GridPlan(run=plan.run, prompts=plan.prompts[:1], columns=plan.columns[:2], rows=plan.rows,
                   settings=plan.settings)
    row = next(render_grid(engine, two))
    base, edited = row.images
    references = plan.columns[1].references
    assert np.array_equal(_pixels(edited), _pixels(engine.render(two.prompts[0], 1, plan.settings,
                                                                 references=references)))
    assert np.abs(_pixels(base) - _pixels(edited)).sum() > 0  # the reference reached the render


def test_each_round_s_column_is_its_starred_checkpoint_else_its_last_one_on_disk(tmp_path):
    from trainer.config import TrainingConfig
    from trainer.grow.rounds import chosen_checkpoint
    from trainer.review.advisor import set_star

    image, mask = subject_image((64, 64))
    run = RunFolder.create_at(tmp_path / "r1", TrainingConfig(caption="a photo of [trigger]", trigger="ohwx",
                                                              steps=6, save_every=2, resolution=64), image, mask)
    with pytest.raises(UserError, match="no checkpoint to compare"):
        chosen_checkpoint(run)
    for step in (2, 4, 6):
        run.checkpoint_path(step).write_bytes(b"")
        run.record_checkpoint(step, run.checkpoint_path(step))
    assert chosen_checkpoint(run).step == 6
    run.checkpoint_path(6).unlink()  # deleted by hand: the newest one still there
    assert chosen_checkpoint(run).step == 4
    set_star(run.path, 2)
    chosen = chosen_checkpoint(run)
    assert (chosen.step, chosen.path) == (2, run.checkpoint_path(2))
