"""Config strictness, presets, trigger insertion, checkpoint schedule."""
from __future__ import annotations

import pytest

from trainer.config import TrainingConfig, list_presets, load_preset
from trainer.errors import UserError


def test_presets_exist_with_their_documented_settings():
    presets = {p.name: p.config() for p in list_presets()}
    assert set(presets) == {"character-rank4-400", "character-rank16-500", "style-rank16-2000", "quick-test-250",
                            "klein-character-rank16-500", "cpu-demo-40", "cpu-demo-shapes-300"}
    expected = {"character-rank4-400": (4, 400, 50), "character-rank16-500": (16, 500, 50),
                "style-rank16-2000": (16, 2000, 250), "quick-test-250": (4, 250, 50), "cpu-demo-40": (4, 40, 20),
                "cpu-demo-shapes-300": (8, 300, 50)}
    for name, (rank, steps, every) in expected.items():
        cfg = presets[name]
        size = 128 if name == "cpu-demo-shapes-300" else 512  # shapes-demo's own size
        assert (cfg.rank, cfg.steps, cfg.save_every, cfg.resolution) == (rank, steps, every, size)
        assert cfg.alpha == rank  # alpha = rank
        assert load_preset(name).description


def test_preset_files_explain_their_choices():
    from trainer.config import PRESETS_DIR

    for path in PRESETS_DIR.glob("*.toml"):
        text = path.read_text()
        lr_line = next(line for line in text.splitlines() if line.startswith("learning_rate"))
        assert "#" in lr_line, f"{path.name}: the learning rate needs a comment saying why"


def test_unknown_and_mistyped_keys_are_errors():
    with pytest.raises(UserError, match="Unknown setting.*stepz"):
        TrainingConfig.from_dict({"stepz": 10})
    with pytest.raises(UserError, match="'rank' must be a whole number"):
        TrainingConfig.from_dict({"rank": "16"})
    with pytest.raises(UserError, match="'masked' must be true or false"):
        TrainingConfig.from_dict({"masked": 1})
    with pytest.raises(UserError, match="resolution must be a multiple of 16"):
        TrainingConfig(resolution=500)
    with pytest.raises(UserError, match="name must be a plain file name"):
        TrainingConfig(name="../evil")


def test_unknown_preset_lists_the_available_ones(tmp_path):
    with pytest.raises(UserError, match="Available presets: .*quick-test-250"):
        load_preset("nope")
    bad = tmp_path / "broken.toml"
    bad.write_text("rank = 4\nwarmup = 3\n")
    with pytest.raises(UserError, match="warmup"):
        load_preset("broken", tmp_path)


def test_round_trip_through_dict():
    cfg = TrainingConfig(rank=16, sample_prompts=("a", "b"), trigger="ohwx")
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("caption,trigger,expected", [
    ("a photo of [trigger]", "ohwx", "a photo of ohwx"),
    ("a photo of a man", "ohwx", "ohwx, a photo of a man"),
    ("ohwx standing", "ohwx", "ohwx standing"),
    ("a photo of [trigger]", "", "a photo of"),
    ("a watercolor", "", "a watercolor"),
])
def test_trigger_word_goes_into_the_caption(caption, trigger, expected):
    assert TrainingConfig(caption=caption, trigger=trigger).training_caption == expected


def test_preview_prompts_start_with_the_caption_and_insert_the_trigger():
    cfg = TrainingConfig(caption="a photo of [trigger]", trigger="ohwx",
                         sample_prompts=("[trigger] on a beach", "", "a photo of [trigger]"))
    assert cfg.preview_prompts == ["a photo of ohwx", "ohwx on a beach"]


def test_checkpoint_steps_always_include_the_last():
    assert TrainingConfig(steps=400, save_every=50).checkpoint_steps == [50, 100, 150, 200, 250, 300, 350, 400]
    assert TrainingConfig(steps=120, save_every=50).checkpoint_steps == [50, 100, 120]
    assert TrainingConfig(steps=10, save_every=50).checkpoint_steps == [10]
