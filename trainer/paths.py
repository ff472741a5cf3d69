"""Where the app keeps its files: runs, the tiny demo model, caches.

Everything lives under one data folder outside the working directory (Gradio serves files from the
working directory and its cache, so job files must not be there). ``LORA_DATA_DIR`` overrides it; on a
Hugging Face Space the persistent ``/data`` volume is used when it exists.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SPACE_VOLUME = Path("/data")  # a Space's persistent storage, when the owner has enabled it


def data_dir(environ: Mapping[str, str] = os.environ, space_volume: Path = SPACE_VOLUME) -> Path:
    explicit = environ.get("LORA_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    if environ.get("SPACE_ID") and space_volume.is_dir() and os.access(space_volume, os.W_OK):
        return space_volume / "one-image-lora"
    return Path.home() / ".cache" / "one-image-lora"


def runs_dir() -> Path:
    return data_dir() / "runs"


def tiny_model_dir(tiny_id: str) -> Path:
    """Where a built-in tiny model (``tiny-demo``) is built once and kept."""
    return data_dir() / "models" / tiny_id
