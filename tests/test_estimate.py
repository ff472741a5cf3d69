"""The "≈ N min on this machine" said before Train on a CPU (trainer/training/estimate.py), in the page and the CLI."""
from __future__ import annotations

import pytest

from trainer import api
from trainer.config import load_preset
from trainer.training import estimate


def _config(preset: str, prompts: tuple[str, ...] = ()):
    config, _ = api.training_config(api.RunRequest(caption="a photo of [trigger]", preset=preset, model="tiny-demo",
                                                   sample_prompts=prompts))
    return config


def test_the_estimate_adds_setup_steps_and_preview_rounds():
    figures = estimate.CpuFigures(setup_s=30, step_s=2, denoise_s=1, machine="m")
    config = _config("quick-test-250")  # 250 steps, checkpoints every 50 (5) + step 0 = 6 rounds, 1 prompt
    expected = 30 + 250 * 2 + 6 * 1 * config.preview_steps * 1
    assert estimate.minutes(config, figures) == pytest.approx(expected / 60)
    three = _config("quick-test-250", ("[trigger] in snow", "[trigger] from the back"))  # 3 prompts per round
    assert estimate.minutes(three, figures) == pytest.approx((expected + 2 * 6 * config.preview_steps) / 60)
    big = three.replace(resolution=1024)  # 4x the tokens: steps and previews cost 4x, setup does not
    assert estimate.minutes(big, figures) == pytest.approx((30 + 4 * (expected - 30 + 2 * 6 * config.preview_steps)) / 60)


def test_the_measured_figures_put_the_presets_in_the_reported_order():
    # The new user's report: ~1 hour for the default preset, 18 min for quick-test on a 2-core CPU; the demo preset
    # must be a few minutes by the same figures.
    default, quick, demo = (estimate.minutes(_config(p)) for p in ("character-rank4-400", "quick-test-250",
                                                                     api.CPU_DEMO_PRESET))
    assert demo < 6 < quick < default
    assert estimate.TINY_CPU.step_s > 0 and estimate.TINY_CPU.denoise_s > 0  # measured, not left at zero


def test_the_notice_only_for_a_built_in_model_without_a_gpu():
    config = _config("character-rank4-400")
    text = estimate.cpu_time_notice(config, cuda=False)
    assert text.startswith("≈ ") and " min on this machine" in text and estimate.TINY_CPU.machine in text
    assert estimate.cpu_time_notice(config, cuda=True) == ""  # a GPU: no CPU figure applies
    full = config.replace(model="black-forest-labs/FLUX.1-dev")
    assert estimate.cpu_time_notice(full, cuda=False) == ""  # no figure for a full-size model


def test_the_page_says_it_before_train_and_offers_the_cpu_demo(monkeypatch):
    import torch

    from ui import settings_step

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    presets = settings_step.preset_choices()
    assert settings_step.first_preset(presets) == api.CPU_DEMO_PRESET
    plan = settings_step.on_plan_change("tiny-demo", 4, 400, 50, "character-rank4-400", settings_step.DEFAULT_PROMPTS)
    minutes = estimate.minutes(_config("character-rank4-400", settings_step.prompt_lines(settings_step.DEFAULT_PROMPTS)))
    assert f"≈ {minutes:.0f} min on this machine" in plan and api.CPU_DEMO_PRESET in plan
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert settings_step.first_preset(presets) == "character-rank4-400"
    assert "≈" not in settings_step.on_plan_change("tiny-demo", 4, 400, 50, "character-rank4-400", "")


def test_the_cli_says_it_before_training(tmp_path, capsys, monkeypatch):
    import torch
    from PIL import Image

    from trainer import cli, cli_train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = tmp_path / "i.png"
    Image.new("RGB", (256, 256), (200, 50, 50)).save(image)
    args = cli._parser().parse_args(["train", "--image", str(image), "--caption", "a photo of [trigger]", "--no-mask",
                                     "--model", "tiny-demo", "--preset", "quick-test-250",
                                     "--output", str(tmp_path / "run")])
    cli_train._prepare_new_run(args)
    minutes = estimate.minutes(_config("quick-test-250"))
    assert f"note: ≈ {minutes:.0f} min on this machine" in capsys.readouterr().err
    assert load_preset("quick-test-250").config().steps == 250


def test_shapes_demo_has_its_own_measured_figures_at_its_own_size():
    config, _ = api.training_config(api.RunRequest(caption="a photo of [trigger]", preset=api.CPU_DEMO_PRESET,
                                                   model="shapes-demo"))
    assert estimate.figures_for("shapes-demo") is estimate.SHAPES_CPU and config.resolution == 128
    n = estimate.minutes(config, estimate.SHAPES_CPU)
    rounds = len(config.checkpoint_steps) + 1
    expected = 7.0 + 300 * 0.030 + rounds * len(config.preview_prompts) * config.preview_steps * 0.010
    assert n == pytest.approx(expected / 60)  # measured at 128 px: no scaling at its own size
    assert estimate.SHAPES_CPU.machine in estimate.cpu_time_notice(config, cuda=False)
