"""Shared fixtures: the tiny demo model (built once per session), a synthetic subject image, no hub access."""
from __future__ import annotations

import os

# Any stray download must fail loudly: nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
from PIL import Image, ImageDraw


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from trainer.families import FLUX1
    from trainer.model.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-demo", FLUX1)


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path_factory, monkeypatch, tiny_model_dir):
    """Every test gets its own data folder, with the session's tiny demo model already in it."""
    data = tmp_path_factory.mktemp("data")
    (data / "models").mkdir()
    (data / "models" / "tiny-demo").symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.setenv("LORA_DATA_DIR", str(data))
    return data


def subject_image(size=(160, 200)) -> tuple[Image.Image, Image.Image]:
    """A red disc (the subject) on a blue/green background, and its exact mask."""
    w, h = size
    box = (int(w * 0.25), int(h * 0.25), int(w * 0.75), int(h * 0.8))
    image = Image.new("RGB", size, (30, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(h * 0.85), w, h), fill=(20, 200, 30))
    draw.ellipse(box, fill=(240, 40, 40))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, mask
