"""Where the app keeps its files: runs, the tiny demo model, caches.

Everything lives under one data folder outside the working directory (Gradio serves files from the
working directory and its cache, so job files must not be there). ``ONE_IMAGE_LORA_DATA_DIR`` overrides it; on a
Hugging Face Space the persistent ``/data`` volume is used when it exists. The folder is the process's
``Runtime.data_dir`` (``trainer.runtime``: read from the environment once, at start-up).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from trainer.runtime import SPACE_VOLUME, Runtime, current

__all__ = ["SPACE_VOLUME", "data_dir", "runs_dir", "shipped_model_dir", "tiny_model_dir"]


def data_dir(environ: Mapping[str, str] | None = None, space_volume: Path = SPACE_VOLUME, *,
             runtime: Runtime | None = None) -> Path:
    """The data folder: ``runtime``'s (default: the process's), or, given ``environ``, the one that environment
    names (the same rules: the variable, else a Space's volume, else ``~/.cache/one-image-lora``)."""
    if environ is not None:
        return Runtime.from_environment(environ, space_volume=space_volume).data_dir
    return (runtime or current()).data_dir


def runs_dir(runtime: Runtime | None = None) -> Path:
    return data_dir(runtime=runtime) / "runs"


def tiny_model_dir(tiny_id: str, runtime: Runtime | None = None) -> Path:
    """Where a built-in tiny model (``tiny-demo``) is built once and kept."""
    return data_dir(runtime=runtime) / "models" / tiny_id


def shipped_model_dir(model_id: str) -> Path:
    """Where a built-in model with trained weights (``shapes-demo``) lies: ``models/<id>`` in the repository, read
    only (a checkout, the Docker image or a Space all carry it)."""
    return Path(__file__).resolve().parents[1] / "models" / model_id
