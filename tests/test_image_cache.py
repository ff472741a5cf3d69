"""ui/image_cache.py: a picture sent again, or to another output, with the same pixels must not rewrite the file a
browser may be fetching (the mask preview's broken <img> in CI, 2026-12-04). Each test that checks "not rewritten"
has Gradio's own writer as its control, which does rewrite: so the checks can fail."""
from __future__ import annotations

import os
import time

import gradio as gr
import PIL.Image
import pytest
from gradio import image_utils, processing_utils

from ui import image_cache


@pytest.fixture
def once_only():
    """The app's writer installed for the test, Gradio's own put back after it."""
    image_cache.write_each_image_once()
    yield
    processing_utils.save_pil_to_cache = image_cache.gradios_own_writer()


def _stamp(path: str) -> tuple:
    found = os.stat(path)
    return found.st_ino, found.st_mtime_ns, found.st_size


def _send_twice(component, value, path_of):
    first = path_of(component.postprocess(value))
    before = _stamp(first)
    time.sleep(0.05)  # past the file system's timestamp granularity: a rewrite shows in st_mtime_ns
    second = path_of(component.postprocess(value))
    return first, second, before, _stamp(second)


def test_the_same_pixels_sent_twice_reuse_the_file_and_gradios_writer_rewrites_it(once_only):
    image = PIL.Image.new("RGB", (64, 48), (200, 40, 10))
    first, second, before, after = _send_twice(gr.Image(type="pil", interactive=False), image, lambda d: d.path)
    assert second == first and after == before
    with PIL.Image.open(second) as shown:
        pixel = shown.convert("RGB").getpixel((5, 5))
    assert shown.size == (64, 48) and max(abs(a - b) for a, b in zip(pixel, (200, 40, 10))) <= 3  # webp is lossy

    processing_utils.save_pil_to_cache = image_cache.gradios_own_writer()  # the control
    first, second, before, after = _send_twice(gr.Image(type="pil", interactive=False), image, lambda d: d.path)
    assert second == first and after[1] != before[1]


def test_the_preview_the_editor_and_the_thumbnail_of_one_overlay_share_one_file_written_once(once_only):
    # What the page sends after an upload: step 1's preview (RGB), the editor's background (the same overlay as RGBA)
    # and the set strip's thumbnail (a small picture's thumbnail is the overlay itself). Same bytes, one path.
    overlay = PIL.Image.new("RGB", (160, 200), (90, 30, 120))
    overlay.paste((240, 200, 10), (40, 50, 120, 150))
    preview = gr.Image(type="pil", interactive=False).postprocess(overlay).path
    before = _stamp(preview)
    time.sleep(0.05)
    editor = gr.ImageEditor(type="pil").postprocess(
        {"background": overlay.convert("RGBA"), "layers": [], "composite": None}).background.path
    strip = gr.Gallery().postprocess([(overlay.copy(), "1. subject.png")]).root[0].image.path
    assert editor == preview and strip == preview
    assert _stamp(preview) == before


def test_different_pixels_get_their_own_file_and_no_staging_file_is_left(tmp_path):
    red = image_cache.save_pil_once(PIL.Image.new("RGB", (8, 8), (255, 0, 0)), str(tmp_path), format="png")
    blue = image_cache.save_pil_once(PIL.Image.new("RGB", (8, 8), (0, 0, 255)), str(tmp_path), format="png")
    assert red != blue
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["image.png", "image.png"]


def test_a_format_pil_cannot_write_falls_back_to_png_as_gradio_does(tmp_path, once_only):
    with pytest.raises((KeyError, ValueError)):  # the contract Gradio's callers rely on for their PNG fallback
        image_cache.save_pil_once(PIL.Image.new("RGB", (8, 8)), str(tmp_path), format="no-such-format")
    path = image_utils.save_image(PIL.Image.new("RGB", (8, 8)), str(tmp_path), format="no-such-format")
    assert path.endswith("image.png")
    with PIL.Image.open(path) as saved:
        assert saved.format == "PNG"


def test_building_the_app_installs_the_writer(tmp_path):
    from trainer.jobs.manager import JobManager
    from ui.app import build_app

    processing_utils.save_pil_to_cache = image_cache.gradios_own_writer()
    try:
        build_app(JobManager(), tmp_path / "runs")
        assert processing_utils.save_pil_to_cache is image_cache.save_pil_once
    finally:
        processing_utils.save_pil_to_cache = image_cache.gradios_own_writer()
