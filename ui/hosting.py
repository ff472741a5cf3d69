"""Where the app runs: a Hugging Face Space (with login, persistent storage, ZeroGPU) or a plain host.

On a Space with ``hf_oauth`` the logged-in user owns their jobs and their token fetches the gated model;
elsewhere the browser's own id owns jobs and the token comes from ``HF_TOKEN``. All Space facts are read
from the environment variables a Space sets, so they can be tested anywhere.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from trainer import api


def on_space(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get("SPACE_ID"))


def zero_gpu(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def hosting_notices(environ: Mapping[str, str] = os.environ, data: Path | None = None) -> list[str]:
    """Warnings a Space user must see before training."""
    if not on_space(environ):
        return []
    notices = []
    data = data or api.data_dir()  # the process's Runtime
    if not Path(data).is_relative_to(api.SPACE_VOLUME):
        notices.append("⚠️ This Space has no persistent storage: runs are kept in the container and a restart "
                       "erases them. Download checkpoints as they appear, or enable persistent storage (/data) "
                       "in the Space settings.")
    if zero_gpu(environ):
        notices.append("⚠️ This Space runs on ZeroGPU, which lends a GPU for a minute or two per call: a LoRA "
                       "training takes many minutes, so it cannot train FLUX.1-dev here. Duplicate the Space and pick "
                       "dedicated GPU hardware (A100, L40S or H100), or use tiny-demo to try the workflow.")
    return notices


def owner_and_token(browser_id: str, profile=None, oauth_token=None,
                    environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """Who owns the job, and which token fetches the model: the logged-in user's, else HF_TOKEN."""
    owner = f"hf-user:{profile.username}" if profile is not None and getattr(profile, "username", None) else browser_id
    token = getattr(oauth_token, "token", None) or environ.get("HF_TOKEN") or None
    return owner, token
