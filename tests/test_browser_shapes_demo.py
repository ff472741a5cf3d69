"""A real browser run on the default model without a GPU, ``shapes-demo``: the subject appears in the previews.

Headless Chromium, as tests/test_browser.py (its fixtures and helpers): upload a subject the demo model has never
seen (a purple figure with a yellow crown on a green and white checkered background), keep the page's defaults on a
machine without a GPU (shapes-demo, the CPU demo preset), Train, and read the previews the run wrote: the last
checkpoint's previews carry the subject's purple where the base model's (step 0) do not. With UPDATE_SCREENSHOT=1
the page is saved as the README's docs/shapes-demo-run.png.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_browser import (RUN_TIMEOUT, By, app, browser, full_page_screenshot, loaded_gallery_images,  # noqa: F401
                                open_page, text_of, upload_image, wait_until)
from trainer import api
from trainer.model.demo_scenes import COLOURS, novel_subject

README_PICTURE = Path(__file__).resolve().parent.parent / "docs" / "shapes-demo-run.png"


def purple_share(path: Path) -> float:
    a = np.asarray(Image.open(path).convert("RGB"), np.float32)
    return float((np.abs(a - np.array(COLOURS["purple"], np.float32)).mean(-1) < 60).mean())


def test_shapes_demo_learns_the_subject_in_the_browser(app, browser, tmp_path, monkeypatch):  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("the page's defaults differ with a GPU (FLUX.1-dev)")
    image, _ = novel_subject(256)
    picture = tmp_path / "crowned-figure.png"
    image.save(picture)
    open_page(browser, app.url)
    # The page's defaults on a machine without a GPU: shapes-demo and its preset, nothing chosen by the test.
    wait_until(browser, lambda d: "shapes-demo is a small built-in" in text_of(d, "#model-notice"), 30,
               "the shapes-demo notice")
    upload_image(browser, picture)
    browser.find_element(By.ID, "train").click()
    wait_until(browser, lambda d: "Finished" in text_of(d, "#progress"), RUN_TIMEOUT, "Finished")

    runs = [json.loads(p.read_text()) | {"dir": p.parent} for p in app.runs_root.rglob("run.json")]
    assert len(runs) == 1
    run = runs[0]
    assert run["config"]["model"] == "shapes-demo" and run["config"]["resolution"] == 128
    last = run["checkpoints"][-1]["step"]
    assert last == api.load_preset(api.CPU_DEMO_PRESET).config().steps
    samples = run["dir"] / "samples"
    before = purple_share(samples / f"lora-{0:06d}-00.png")
    after = purple_share(samples / f"lora-{last:06d}-00.png")
    assert after > before + 0.05, (before, after)  # the subject's colour appears where the base model had none

    wait_until(browser, lambda d: len(loaded_gallery_images(d)) >= 3, 60, "the previews in the gallery")
    browser.execute_script("window.scrollTo(0, 0);")
    shot = README_PICTURE if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "shapes-demo-run.png"
    full_page_screenshot(browser, shot)
    assert shot.is_file()
