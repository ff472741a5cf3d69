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

DATA_DIR_VARIABLE = "ONE_IMAGE_LORA_DATA_DIR"
# The tests mask with u2netp (5x faster than u2net, the default where installed); tests of the default unset it.
MASK_MODEL_VARIABLE = "ONE_IMAGE_LORA_MASK_MODEL"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from trainer.families import FLUX1
    from trainer.model.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-demo", FLUX1)


@pytest.fixture(scope="session")
def tiny_klein_dir(tmp_path_factory):
    """The FLUX.2 [klein] stand-in, built once per session (on first use: only the klein tests ask for it)."""
    from trainer.families import FLUX2_KLEIN
    from trainer.model.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-klein", FLUX2_KLEIN)


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path_factory, monkeypatch, tiny_model_dir):
    """Every test gets its own data folder, with the session's tiny demo model already in it, and a ``Runtime``
    built from nothing but that folder and the mask network pinned to u2netp (the developer's own
    ``ONE_IMAGE_LORA_*`` settings don't leak in).

    Child processes (the CLI, the app server, torchrun) read their ``Runtime`` from the environment, so the data
    folder is also put there, under its name; the old ``LORA_*`` names are taken out."""
    from trainer import runtime

    data = tmp_path_factory.mktemp("data")
    (data / "models").mkdir()
    (data / "models" / "tiny-demo").symlink_to(tiny_model_dir, target_is_directory=True)
    for old in runtime.OLD_NAMES.values():
        monkeypatch.delenv(old, raising=False)
    monkeypatch.setenv(DATA_DIR_VARIABLE, str(data))
    monkeypatch.setenv(MASK_MODEL_VARIABLE, "u2netp")
    with runtime.using(runtime.Runtime.from_environment({DATA_DIR_VARIABLE: str(data), MASK_MODEL_VARIABLE: "u2netp"})):
        yield data


@pytest.fixture
def use_runtime(isolated_data_dir):
    """``use_runtime(environ=None, **fields)`` makes the test's ``Runtime`` one read from ``environ`` (plus the
    test's data folder), with ``fields`` replaced, for the rest of the test; returns it. In-process only: a child
    process still reads the real environment."""
    import contextlib
    import dataclasses

    from trainer import runtime

    stack = contextlib.ExitStack()

    def install(environ: dict | None = None, **fields) -> "runtime.Runtime":
        base = runtime.current() if environ is None else runtime.Runtime.from_environment(
            {DATA_DIR_VARIABLE: str(isolated_data_dir), MASK_MODEL_VARIABLE: "u2netp", **environ})
        return stack.enter_context(runtime.using(dataclasses.replace(base, **fields)))

    with stack:
        yield install


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
