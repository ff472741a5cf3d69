"""Every picture the page is sent is written to Gradio's cache once, never rewritten while a browser may fetch it.

Gradio 6.31 saves a PIL output with ``processing_utils.save_pil_to_cache`` (gr.Image, gr.Gallery, gr.ImageEditor and
gr.AnnotatedImage all call it): the file is named after a hash of its encoded bytes, ``<cache>/<hash>/image.webp``,
and written in place (``write_bytes``: truncate, then write) every time, even when it is already there. This page
sends the same pixels to several outputs at once: step 1's mask preview, the full-resolution mask, the editor's
background (the same overlay as RGBA encodes to the same webp bytes) and the set's thumbnail (a small picture's
thumbnail is the overlay itself), and sends the preview again as the mask controls settle. Each send truncated the
file the browser was fetching for the one before: Starlette's FileResponse had taken the size first, the response
ended short (ERR_CONTENT_LENGTH_MISMATCH, "Exception in ASGI application") and the <img> stayed broken although its
URL answered 200 a moment later (CI, 2026-12-04, twice: the mask preview after an upload).

``write_each_image_once`` swaps Gradio's function for one with the same file naming that writes under a temporary name
renamed into place, and only when the file is not there yet (a reader of an existing file then always gets all of
it). Gradio's copy of an uploaded or returned file path (``save_file_to_cache``) is already written that way.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import PIL.Image
from gradio import processing_utils

_gradios_own_writer = processing_utils.save_pil_to_cache


def save_pil_once(img: PIL.Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """``processing_utils.save_pil_to_cache``'s contract (same path for the same bytes; KeyError/ValueError for a
    format PIL cannot write, which Gradio's callers answer with PNG), but an existing file is never written again."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / f"{name}.{format}").resolve()
    if not path.exists():
        descriptor, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        try:
            with os.fdopen(descriptor, "wb") as out:
                out.write(data)
            os.replace(staging, path)  # atomic: a concurrent writer of the same bytes replaces it with the same bytes
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
    return str(path)


def write_each_image_once() -> None:
    """Make every Gradio component of this process save PIL images with ``save_pil_once`` (idempotent)."""
    processing_utils.save_pil_to_cache = save_pil_once


def gradios_own_writer():
    """The function Gradio shipped (the tests' control: it does rewrite the file)."""
    return _gradios_own_writer
