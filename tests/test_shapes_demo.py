"""``shapes-demo``: the built-in model with trained weights (models/shapes-demo, scripts/train_shapes_demo.py).

It is the default without a GPU because it really draws something: these tests check that it does (its pictures
follow their captions), that it loads through the same code as any diffusers folder, and that a short LoRA run on one
image pulls its previews toward that image.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import api
from trainer.errors import UserError
from trainer.model import demo_scenes, loading
from trainer.paths import shipped_model_dir


def _colour_error(pixels: np.ndarray, colour: str) -> float:
    return float(np.abs(pixels.reshape(-1, 3).mean(0) - np.array(demo_scenes.COLOURS[colour])).mean())


def test_it_is_the_default_without_a_gpu_and_trains_at_its_own_size(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert api.default_model() == "shapes-demo"
    config, notice = api.training_config(api.RunRequest(caption="a photo of [trigger]", preset="character-rank4-400"))
    assert config.model == "shapes-demo"
    assert config.resolution == loading.SHAPES_DEMO_RESOLUTION == 128  # what it was trained at, whatever the preset
    assert config.preview_steps == loading.SHAPES_DEMO_PREVIEW_STEPS
    assert "shapes-demo" in notice and "128 px" in notice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert api.default_model() == api.FLUX_DEV


def test_a_checkout_without_its_files_falls_back_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "shipped_model_dir", lambda model_id: tmp_path / model_id)
    assert loading.default_model() == "tiny-demo"
    with pytest.raises(UserError, match="missing.*tiny-demo"):
        loading.resolve_model("shapes-demo")


def test_it_loads_as_a_flux1_folder_with_its_training_size_in_the_estimates():
    folder = loading.resolve_model("shapes-demo")
    assert folder == shipped_model_dir("shapes-demo")
    assert loading.check_diffusers_folder(folder).name == "flux1"
    assert loading.is_tiny_demo(folder)  # a built-in small model: allowed on the CPU
    from trainer.model.estimates import transformer_config_for

    family, config = transformer_config_for("shapes-demo")
    assert family.name == "flux1" and config["num_layers"] == 2 and config["in_channels"] == 64


def test_its_pictures_follow_their_captions():
    """The real loading code and the real pipeline: a red circle on blue, a yellow star on black — the centre has the
    subject's colour and the corners the background's (a random-weight model fails both by far)."""
    parts = loading.load_parts(loading.resolve_model("shapes-demo"), torch.device("cpu"), torch.float32)
    pipe = parts.family.pipeline_for(parts, text_encoders=True)
    prompts = {"a large red circle in the center, on a blue background": ("red", "blue"),
               "a large yellow square in the center, on a black background": ("yellow", "black")}
    size = loading.SHAPES_DEMO_RESOLUTION
    images = pipe(list(prompts), height=size, width=size, num_inference_steps=loading.SHAPES_DEMO_PREVIEW_STEPS,
                  guidance_scale=3.5, generator=torch.Generator().manual_seed(0),
                  max_sequence_length=parts.tokenizer_2.model_max_length).images
    q = size // 8
    for image, (subject, background) in zip(images, prompts.values()):
        a = np.asarray(image).astype(np.float32)
        corners = np.concatenate([a[:q, :q], a[:q, -q:], a[-q:, :q], a[-q:, -q:]])
        assert _colour_error(a[3 * q:5 * q, 3 * q:5 * q], subject) < 45, subject
        assert _colour_error(corners, background) < 45, background
