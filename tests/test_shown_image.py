"""ui/shown_image.py: an output image sent again with the same pixels must not rewrite the file the browser may be
fetching (the mask preview's broken <img> in CI, 2026-12-04). Gradio's own gr.Image rewrites it: the check of the
file's modification time below fails with gr.Image in place of ShownImage (tried when the test was written)."""
from __future__ import annotations

import os
import time

import PIL.Image

from ui.shown_image import ShownImage, cache_image_once


def test_the_same_pixels_sent_twice_reuse_the_file_without_writing_it_again(tmp_path):
    image = PIL.Image.new("RGB", (64, 48), (200, 40, 10))
    component = ShownImage(type="pil", interactive=False)
    first = component.postprocess(image)
    before = os.stat(first.path)
    time.sleep(0.05)  # past the file system's timestamp granularity: a rewrite would show in st_mtime_ns
    second = component.postprocess(image.copy())
    after = os.stat(second.path)
    assert second.path == first.path
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    with PIL.Image.open(second.path) as shown:
        pixel = shown.convert("RGB").getpixel((5, 5))
    assert shown.size == (64, 48) and max(abs(a - b) for a, b in zip(pixel, (200, 40, 10))) <= 3  # webp is lossy


def test_different_pixels_get_their_own_file_and_no_staging_file_is_left(tmp_path):
    red = cache_image_once(PIL.Image.new("RGB", (8, 8), (255, 0, 0)), tmp_path, "png")
    blue = cache_image_once(PIL.Image.new("RGB", (8, 8), (0, 0, 255)), tmp_path, "png")
    assert red != blue
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["image.png", "image.png"]


def test_a_format_pil_cannot_write_falls_back_to_png(tmp_path):
    path = cache_image_once(PIL.Image.new("RGB", (8, 8)), tmp_path, "no-such-format")
    assert path.endswith("image.png")
    with PIL.Image.open(path) as saved:
        assert saved.format == "PNG"


def test_the_page_draws_it_with_gradios_image_component():
    component = ShownImage(type="pil", interactive=False)
    assert component.get_block_name() == "image"
    assert component.get_config()["type"] == "pil"
