"""An output image that never rewrites a file the browser may be fetching.

Gradio 6.31 saves a PIL output with ``processing_utils.save_pil_to_cache``: the file is named after a hash of its bytes
and written in place (``write_bytes``: truncate, then write) every time, even when it already exists. The mask
preview is sent several times with the same pixels (the upload, then the mask step, then the mask controls settling),
so the second write truncated the very file the browser was fetching for the first: Starlette's FileResponse had
taken its size before the truncation, the response ended short ("Exception in ASGI application"), and the <img>
stayed broken (complete, naturalWidth 0) although its URL answered 200 a moment later (CI, 2026-12-04). Here the file
is written once, under a temporary name renamed into place, and only when it is not there yet; Gradio's own cache
copy of a file path (``save_file_to_cache``) is already written that way.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gradio as gr
import PIL.Image
from gradio import processing_utils


def cache_image_once(image: PIL.Image.Image, cache_dir: str | Path, image_format: str) -> str:
    """The image encoded in ``image_format`` (PNG when PIL cannot write that), saved in ``cache_dir`` under a folder
    named after a hash of its bytes; an existing file of the same bytes is reused, never written again."""
    try:
        data = processing_utils.encode_pil_to_bytes(image, image_format)
    except (KeyError, ValueError):  # a format PIL cannot write (Gradio falls back the same way)
        image_format = "png"
        data = processing_utils.encode_pil_to_bytes(image, image_format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"image.{image_format}"
    if not path.exists():
        descriptor, staging = tempfile.mkstemp(dir=folder, prefix=".image.")
        try:
            with os.fdopen(descriptor, "wb") as out:
                out.write(data)
            os.replace(staging, path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
    return str(path)


class ShownImage(gr.Image):
    """``gr.Image`` for outputs; PIL images are cached by ``cache_image_once``. (Arrays and watermarked images keep
    Gradio's own path: no page here returns either.)"""

    is_template = True  # Gradio's marker for a subclass drawn by its parent's front-end component (``image``)

    def postprocess(self, value):
        if isinstance(value, PIL.Image.Image) and (self.watermark is None or self.watermark.watermark is None):
            value = cache_image_once(value, self.GRADIO_CACHE, self.format)
        return super().postprocess(value)
