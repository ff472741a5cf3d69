"""Checkpoint scores on constructed cases, the suggestion rule, the star and keep-last-N."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from trainer.review.advisor import (ARTEFACT_LIMIT, COPY_RISE, CheckpointScore, advice_from_grid, artefact_score,
                             checkpoint_files, copy_score, disk_summary, keep_last, score_checkpoints, set_star,
                             starred_step, suggest)
from trainer.config import TrainingConfig
from trainer.errors import UserError
from trainer.runs.folder import RunFolder

sys.path.insert(0, str(Path(__file__).parent))
from conftest import subject_image  # noqa: E402


def _scene(seed: int, size=(96, 128)) -> Image.Image:
    """A smooth synthetic 'photo': soft shapes in random colours (what a clean base-model sample looks like)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(10, 40))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image.filter(ImageFilter.GaussianBlur(2))


def _noisy(image: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- constructed cases

def test_identical_image_scores_as_a_copy_and_unrelated_does_not():
    training, _ = subject_image((160, 200))
    assert copy_score(training, training) == pytest.approx(1.0)
    # A sample at another size and a slight blur is still a copy.
    assert copy_score(training.resize((96, 128)).filter(ImageFilter.GaussianBlur(1)), training) > 0.8
    for seed in range(5):
        assert copy_score(_scene(seed), training) < 0.5
    # Base-model-like samples score low, a copy scores far above them: the rise crosses the threshold.
    assert copy_score(training.resize((96, 128)), training) - copy_score(_scene(1), training) > COPY_RISE


def test_added_high_frequency_noise_scores_as_artefacted():
    for seed in range(5):
        clean = _scene(seed)
        assert artefact_score(clean, clean) == pytest.approx(0.0, abs=1e-9)
        assert artefact_score(_noisy(clean, 12, seed), clean) > ARTEFACT_LIMIT  # fabric/paper texture
        assert artefact_score(_noisy(clean, 1.5, seed), clean) < ARTEFACT_LIMIT  # barely visible grain
        assert artefact_score(clean.filter(ImageFilter.GaussianBlur(2)), clean) < 0  # smoother is not artefacted
    # Other clean images of the same kind are not artefacted on average (the advisor averages over samples;
    # one image's content alone can move the score either way).
    assert abs(np.mean([artefact_score(_scene(s + 10), _scene(s)) for s in range(8)])) < ARTEFACT_LIMIT / 2


def test_scores_and_suggestion_on_a_constructed_run():
    training, _ = subject_image((96, 128))
    base = [_scene(s) for s in range(3)]
    samples = {
        100: [_scene(s + 20) for s in range(3)],  # learning, still generalising
        200: [_scene(s + 40) for s in range(3)],
        300: [_noisy(b, 14, s) for s, b in enumerate(base)],  # artefacts begin
        400: [training.copy() for _ in range(3)],  # copies the training image for every prompt
    }
    scores = score_checkpoints(samples, base, training)
    by_step = {s.step: s for s in scores}
    assert not by_step[100].copying and not by_step[100].artefacted
    assert by_step[300].artefacted and not by_step[300].copying
    assert by_step[400].copying
    advice = suggest(scores)
    assert (advice.step, advice.weight) == (200, 1.0)
    assert "step 300" in advice.reason and "heuristic" in advice.markdown()


def test_suggestion_edges():
    clean = CheckpointScore(step=50, copy=0.1, copy_rise=0.0, artefact=0.0)
    bad = CheckpointScore(step=100, copy=0.9, copy_rise=0.6, artefact=0.0)
    assert suggest([clean, CheckpointScore(100, 0.1, 0.0, 0.1)]).step == 100  # nothing flagged: the last
    first_bad = suggest([bad, CheckpointScore(200, 0.9, 0.6, 1.0)])
    assert (first_bad.step, first_bad.weight) == (100, 0.6)  # overfit from the start: first one, lower weight
    assert suggest([bad, clean]).step == 50  # order of the input does not matter
    with pytest.raises(UserError):
        suggest([])


def test_advice_from_a_rendered_grid(tmp_path):
    from trainer.review.advisor import advice_spec
    from trainer.review.grid import GridImages, RowRendered, plan_grid

    run = _run_with_checkpoints(tmp_path / "run", steps=(10, 20, 30))
    training, _ = run.load_dataset()
    plan = plan_grid(run, advice_spec(run, seeds=(1,)))
    assert all("ohwx" in p and p != run.config.training_caption for p in plan.prompts)
    grids = GridImages(plan)
    for p in range(len(plan.prompts)):
        base = _scene(p).resize((48, 64))
        row = (base, _scene(p + 9).resize((48, 64)), training.resize((48, 64)), training.resize((48, 64)))
        grids.add(RowRendered(p, 0, row, 0, plan.cells))
    advice = advice_from_grid(grids, training)
    assert advice.step == 10 and [s.step for s in advice.scores] == [10, 20, 30]


# ---------------------------------------------------------------- star and disk

def _run_with_checkpoints(path: Path, steps=(10, 20, 30, 40), status="finished") -> RunFolder:
    image, mask = subject_image()
    cfg = TrainingConfig(caption="a photo of [trigger]", trigger="ohwx", steps=max(steps), save_every=min(steps))
    run = RunFolder.create_at(path, cfg, image, mask)
    run.train_size = (48, 64)
    for step in steps:
        ckpt = run.checkpoint_path(step)
        ckpt.write_bytes(b"x" * (1000 * step))
        run.record_checkpoint(step, ckpt)
        preview = run.preview_path(step, 0)
        preview.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(preview)
        run.record_previews(step, [{"path": preview, "prompt": "p", "seed": 1}])
    run.set_status(status)
    return run


def test_sizes_star_and_keep_last_never_delete_the_star(tmp_path):
    run = _run_with_checkpoints(tmp_path / "run")
    files = checkpoint_files(run)
    assert [(f.step, f.size_bytes) for f in files] == [(10, 10000), (20, 20000), (30, 30000), (40, 40000)]
    assert disk_summary(run) == "4 checkpoint(s), 0.1 MB in all"

    set_star(run.path, 10)
    assert starred_step(run.path) == 10 and checkpoint_files(run)[0].starred
    with pytest.raises(UserError):
        set_star(run.path, 15)

    deleted = keep_last(run.path, 1)
    assert deleted == [20, 30]
    reopened = RunFolder.open(run.path)
    assert [c["step"] for c in reopened.checkpoints] == [10, 40]  # the newest, and the starred one
    assert not run.checkpoint_path(20).exists() and run.checkpoint_path(10).exists()
    assert not run.preview_path(30, 0).exists() and run.preview_path(40, 0).exists()

    set_star(run.path, None)
    assert starred_step(run.path) is None
    assert keep_last(run.path, 1) == [10]
    with pytest.raises(UserError):
        keep_last(run.path, 0)


def test_keep_last_is_refused_while_training(tmp_path):
    run = _run_with_checkpoints(tmp_path / "run", status="running")
    with pytest.raises(UserError, match="still training"):
        keep_last(run.path, 1)
    assert len(RunFolder.open(run.path).checkpoints) == 4


# ---------------------------------------------------------------- a set: the nearest training image

def _three_pictures():
    """Three training images that look nothing alike: the subject, and two smooth scenes."""
    from trainer.dataset.imageset import SetImage

    subject, mask = subject_image((96, 128))
    return [SetImage("a.png", subject, mask), SetImage("b.png", _scene(101, (128, 96))),
            SetImage("c.png", _scene(202, (96, 96)))]


def test_one_image_scores_are_the_numbers_of_before_sets():
    """A one-image run scores exactly as before: the mean copy score against its one image (recomputed here the way it
    was computed before sets, and pinned to the numbers the code of before gave), whether the image comes alone or as
    a set of one; and the advice names no image."""
    from trainer.dataset.imageset import SetImage

    training, mask = subject_image((96, 128))
    base = [_scene(s) for s in range(3)]
    samples = {100: [_scene(s + 20) for s in range(3)], 300: [_noisy(b, 14, s) for s, b in enumerate(base)],
               400: [training.resize((80, 100)) for _ in range(3)]}
    alone = score_checkpoints(samples, base, training)
    assert score_checkpoints(samples, base, [SetImage("image.png", training, mask)]) == alone
    base_copy = np.mean([copy_score(b, training) for b in base])
    for score in alone:
        copy = np.mean([copy_score(im, training) for im in samples[score.step]])
        assert (score.copy, score.copy_rise, score.nearest) == (copy, copy - base_copy, "")
    pinned = {100: (0.3396813431441168, 0.05013629055513863, -0.18823683284800763),
              300: (0.26481924681632113, -0.02472580577265704, 3.2753751348392175),
              400: (0.9632143973177089, 0.6736693447287307, -0.5332768819495531)}
    for score in alone:
        assert (score.copy, score.copy_rise, score.artefact) == pytest.approx(pinned[score.step], rel=1e-9, abs=1e-12)
    advice = suggest([s for s in alone if s.step != 300])  # 400 copies: named as before, no image name
    assert "copying the training image" in advice.reason and "nearest" not in advice.markdown()


def test_a_set_scores_each_sample_against_its_nearest_training_image_and_the_advice_names_it():
    pictures = _three_pictures()
    third = pictures[2].image
    base = [_scene(s) for s in range(4)]
    samples = {100: [_scene(s + 30) for s in range(4)],
               200: [third.resize((80, 80)) for _ in range(3)] + [_scene(7)],  # 3 of 4 copy the third picture
               300: [third.copy() for _ in range(4)]}
    scores = {s.step: s for s in score_checkpoints(samples, base, pictures)}
    # every sample scores against the image it is nearest to: the copies of c.png score as copies of it
    expected = np.mean([max(copy_score(im, p.image) for p in pictures) for im in samples[200]])
    assert scores[200].copy == pytest.approx(expected, abs=1e-12)
    assert scores[200].copy > np.mean([copy_score(im, pictures[0].image) for im in samples[200]]) + COPY_RISE
    assert scores[200].nearest == "c.png" and scores[300].nearest == "c.png"
    assert scores[200].copying and not scores[100].copying
    base_copy = np.mean([max(copy_score(b, p.image) for p in pictures) for b in base])  # the base: nearest too
    assert scores[100].copy_rise == pytest.approx(scores[100].copy - base_copy, abs=1e-12)
    # compared with the first image only (the one-image way), the copying of c.png would go unseen
    assert not score_checkpoints(samples, base, pictures[0].image)[1].copying

    advice = suggest(list(scores.values()))
    assert advice.step == 100 and "copying training image 'c.png'" in advice.reason
    assert f"come nearest to training image '{scores[100].nearest}'" in advice.markdown()


def test_a_sets_scores_name_the_nearest_image_on_disk_and_in_the_compare_tab(tmp_path):
    """The Compare tab's scoring of a set run: every image of run.json's dataset.images is compared (through
    ``stream_advice`` with a stand-in renderer whose checkpoint samples copy the set's third image)."""
    from trainer.review.advisor import load_advice, save_advice
    from trainer.review.inference import InferenceService
    from trainer.runs.store import RunStore
    from ui.compare_tab import checkpoint_table, stream_advice, summary_markdown

    pictures = _three_pictures()
    cfg = TrainingConfig(caption="a photo of [trigger]", trigger="ohwx", steps=20, save_every=10)
    run = RunStore(tmp_path / "runs").create_set("alice", cfg, pictures)
    run.train_size, run.model_path = (48, 64), str(tmp_path)
    for step in (10, 20):
        run.checkpoint_path(step).write_bytes(b"x")
        run.record_checkpoint(step, run.checkpoint_path(step))
    run.set_status("finished")

    class Renderer:
        def embed(self, prompts, max_tokens):
            pass

        def render(self, prompt, seed, settings, checkpoint=None, weight=1.0):
            step = int(Path(checkpoint).stem.rsplit("-", 1)[1]) if checkpoint else 0
            if step < 20:  # the base model, and a checkpoint that draws what it draws
                return _scene(seed + len(prompt), (48, 64))
            return pictures[2].image.resize((48, 64))  # copies the set's third image

    service = InferenceService(loader=lambda path: Renderer())
    *_, (status, summary, table, _) = stream_advice(service, tmp_path / "runs", "alice", run.path.name)
    advice = load_advice(run.path)
    assert [(s.step, s.nearest) for s in advice.scores][1] == (20, "c.png") and advice.scores[1].copying
    assert (advice.step, advice.weight) == (10, 1.0) and "'c.png'" in advice.reason
    assert list(table["nearest image"])[1] == "c.png" and "nearest to training image" in summary
    save_advice(run.path, advice)
    assert load_advice(run.path) == advice  # the nearest image survives advice.json

    one = _run_with_checkpoints(tmp_path / "one", steps=(10,))
    save_advice(one.path, suggest([CheckpointScore(10, 0.2, 0.0, 0.0)]))
    assert "nearest image" not in checkpoint_table(one).columns and "nearest" not in summary_markdown(one)
