"""Automatic captions: Florence-2 describes each picture in detail, the trigger goes where the subject is named.

Florence-2 runs through transformers' own ``Florence2ForConditionalGeneration`` (no ``trust_remote_code``), with its
``<MORE_DETAILED_CAPTION>`` task: a paragraph describing everything in the picture, which is what a LoRA caption
should be (what the caption names is not learned into the trigger word). The trigger placeholder is placed by the
rule in ``trainer.dataset.caption_trigger``; the user then edits the result.

- Models (``model=``): ``florence-community/Florence-2-base`` (0.23B, the default) or ``-large`` (0.77B): the
  transformers-native conversions of Microsoft's checkpoints (``microsoft/Florence-2-*`` ids, whose Hub repos hold
  the remote-code version, are read as these), any Hub id of that layout, a local folder saved with
  ``save_pretrained``, ``base`` / ``large``, or ``tiny-caption`` (random weights, gibberish: ``trainer.model.tiny_florence``).
- A Hub model downloads on first use, with its progress sent to ``progress(fraction, message)``; offline and not in
  the cache, it is a ``UserError`` that names the model and how to get it.
- It runs on the CUDA GPU when there is one (bfloat16, or float16 where bfloat16 is not supported), else the CPU
  (float32). Each (model, device) loads once and stays for the next pictures; ``free()`` drops them all and gives
  the GPU memory back (the job manager calls it before every training job).
"""
from __future__ import annotations

import gc
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from trainer.config import TRIGGER_PLACEHOLDER
from trainer.dataset.caption_trigger import place_trigger
from trainer.errors import UserError

DEFAULT_CAPTION_MODEL = "florence-community/Florence-2-base"
LARGE_CAPTION_MODEL = "florence-community/Florence-2-large"
CAPTION_MODELS = (DEFAULT_CAPTION_MODEL, LARGE_CAPTION_MODEL)  # what the page offers
_ALIASES = {"base": DEFAULT_CAPTION_MODEL, "large": LARGE_CAPTION_MODEL}
# Microsoft's repos hold the trust_remote_code version; florence-community holds the same checkpoints converted to
# transformers' native Florence2ForConditionalGeneration.
_NATIVE = {f"microsoft/Florence-2-{size}": f"florence-community/Florence-2-{size}"
           for size in ("base", "large", "base-ft", "large-ft")}
TASK = "<MORE_DETAILED_CAPTION>"
MAX_NEW_TOKENS = 384  # a detailed caption is ~60-120 tokens; the cap only stops a runaway
NUM_BEAMS = 3  # transformers' Florence-2 examples
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]  # configs, weights, tokenizer (never pickle .bin files)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Progress = Callable[[float, str], None]  # (fraction of the current stage 0..1, a sentence for the user)


@dataclass
class Captioner:
    model: Any  # Florence2ForConditionalGeneration, in eval mode on ``device``
    processor: Any  # Florence2Processor
    device: str
    dtype: Any  # torch.dtype
    folder: Path


_LOADED: dict[tuple[str, str], Captioner] = {}  # (model folder, device) -> the loaded captioner
_LOCK = threading.RLock()  # held while a captioner loads or captions, and by free()


def _no_progress(fraction: float, message: str) -> None:
    pass


def _device(device: str | None = None) -> tuple[str, Any]:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def caption_model_folder(model: str = DEFAULT_CAPTION_MODEL, progress: Progress | None = None,
                         token: str | None = None) -> Path:
    """A local Florence-2 folder for ``model`` (see the module's notes), downloading a Hub model on first use."""
    from trainer.model.tiny_florence import TINY_CAPTION, ensure_tiny_florence
    from trainer.paths import tiny_model_dir

    progress = progress or _no_progress
    spec = (model or DEFAULT_CAPTION_MODEL).strip()
    spec = _ALIASES.get(spec.lower(), spec)
    if spec == TINY_CAPTION:
        return ensure_tiny_florence(tiny_model_dir(TINY_CAPTION))
    local = Path(spec).expanduser()
    if local.is_dir():
        return check_florence_folder(local.resolve())
    if spec.startswith((".", "/", "~")) or "\\" in spec or not _HUB_ID.match(spec):
        raise UserError(f"Caption model '{spec}' is neither an existing folder nor a Hugging Face id like "
                        f"'{DEFAULT_CAPTION_MODEL}'. Give a Florence-2 folder (saved with save_pretrained), a Hub id, "
                        f"'base', 'large' or '{TINY_CAPTION}'.")
    spec = _NATIVE.get(spec, spec)
    return check_florence_folder(_download(spec, token, progress))


def check_florence_folder(folder: Path) -> Path:
    """``folder`` holds a transformers-native Florence-2 with .safetensors weights (else a UserError); returns it."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except OSError:
        raise UserError(f"The folder '{folder}' is not a transformers model: it has no config.json. Point at the "
                        "folder a Florence-2 model was saved to (config.json, model.safetensors, the processor "
                        "and tokenizer files).") from None
    except ValueError:
        raise UserError(f"'{folder / 'config.json'}' is not valid JSON; the model folder looks damaged.") from None
    if config.get("model_type") != "florence2":
        raise UserError(f"'{folder}' holds a '{config.get('model_type')}' model, not Florence-2 (model_type "
                        f"'florence2'). Use '{DEFAULT_CAPTION_MODEL}' or a folder of it.")
    if "auto_map" in config:
        raise UserError(f"'{folder}' is the remote-code version of Florence-2 (its config.json has an auto_map), "
                        "which is not loaded here. Use the transformers-native conversion, "
                        f"'{DEFAULT_CAPTION_MODEL}' or '{LARGE_CAPTION_MODEL}'.")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"'{folder}' has no .safetensors weights. Only .safetensors files are loaded (pickle-based "
                        ".bin files can run code and are refused).")
    return folder


def _download(repo_id: str, token: str | None, progress: Progress) -> Path:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    import os

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:  # already downloaded: no network, no message
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, cache_dir=cache_dir,
                                      local_files_only=True))
    except hub_errors.LocalEntryNotFoundError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise UserError(offline_message(repo_id)) from None
    progress(0.0, f"Downloading the caption model {repo_id} (first use only)")
    try:
        path = snapshot_download(repo_id, token=token or None, allow_patterns=_HUB_PATTERNS, cache_dir=cache_dir,
                                 tqdm_class=download_bar(progress, repo_id))
    except hub_errors.GatedRepoError:
        raise UserError(f"'{repo_id}' is a gated model: accept its license at https://huggingface.co/{repo_id} and "
                        "set HF_TOKEN, or use the default caption model.") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f"No caption model '{repo_id}' on the Hugging Face Hub. Check the spelling, or use "
                        f"'{DEFAULT_CAPTION_MODEL}'.") from None
    except hub_errors.LocalEntryNotFoundError:
        raise UserError(offline_message(repo_id)) from None
    except hub_errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise UserError(f"Downloading the caption model '{repo_id}' failed (HTTP {status}). Try again, or give a "
                        "local Florence-2 folder as the model.") from None
    except OSError as err:
        raise UserError(f"Downloading the caption model '{repo_id}' failed while writing to disk: "
                        f"{err.strerror or err}. Free some disk space and try again.") from None
    progress(1.0, f"Downloaded {repo_id}")
    return Path(path)


def offline_message(repo_id: str) -> str:
    return (f"The caption model '{repo_id}' is not on this machine and the Hugging Face Hub can't be reached "
            "(offline, or HF_HUB_OFFLINE is set), so it can't be downloaded. Connect to the internet and try again "
            "(it downloads once, then works offline), or on a connected machine run "
            f"`hf download {repo_id}` (or `python -m trainer caption IMAGE` once) and copy the Hugging Face cache "
            "here, or give the folder of a Florence-2 saved with save_pretrained as the model (--model FOLDER).")


def download_bar(progress: Progress, label: str, every_s: float = 0.5):
    """A tqdm class for ``snapshot_download`` that sends its byte counts to ``progress`` (at most every
    ``every_s`` seconds, and at the end) instead of drawing a bar."""
    from tqdm.std import tqdm

    class _Sink:
        def write(self, text: str) -> None:
            pass

        def flush(self) -> None:
            pass

    class DownloadBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs.update(file=_Sink(), disable=False)
            super().__init__(*args, **kwargs)
            self._told = 0.0

        def update(self, n=1):
            shown = super().update(n)
            if self.unit == "B" and self.total:
                now = time.monotonic()
                if now - self._told >= every_s or self.n >= self.total:
                    self._told = now
                    progress(min(self.n / self.total, 1.0),
                             f"Downloading {label}: {self.n / 1e6:.0f} of {self.total / 1e6:.0f} MB")
            return shown

    return DownloadBar


def load_captioner(model: str = DEFAULT_CAPTION_MODEL, device: str | None = None,
                   progress: Progress | None = None, token: str | None = None) -> Captioner:
    """The captioner of ``model`` on ``device`` (default: the CUDA GPU if there is one, else the CPU), loaded on
    first use and kept."""
    progress = progress or _no_progress
    folder = caption_model_folder(model, progress, token)
    device, dtype = _device(device)
    with _LOCK:
        key = (str(folder), device)
        if key not in _LOADED:
            from transformers import AutoProcessor, Florence2ForConditionalGeneration

            progress(0.0, f"Loading the caption model on the {'GPU' if device.startswith('cuda') else 'CPU'}")
            try:
                processor = AutoProcessor.from_pretrained(folder)
                net = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
            except OSError as err:  # a file missing from a local folder
                raise UserError(f"Could not load the caption model from '{folder}': {err}") from None
            _LOADED[key] = Captioner(net.to(device).eval(), processor, device, dtype, folder)
        return _LOADED[key]


def caption_images(images: Sequence[Image.Image], model: str = DEFAULT_CAPTION_MODEL,
                   trigger: str = TRIGGER_PLACEHOLDER, progress: Progress | None = None,
                   device: str | None = None, token: str | None = None,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """One detailed caption per picture, in order, with ``trigger`` (default: the ``[trigger]`` placeholder, which
    training replaces by the run's trigger word) placed where the subject is named."""
    if not images:
        return []
    progress = progress or _no_progress
    captioner = load_captioner(model, device, progress, token)
    captions = []
    with _LOCK:
        for i, image in enumerate(images):
            progress(i / len(images), f"Captioning picture {i + 1} of {len(images)}")
            captions.append(place_trigger(describe(captioner, image, max_new_tokens), trigger))
    progress(1.0, f"Captioned {len(images)} picture(s)")
    return captions


def describe(captioner: Captioner, image: Image.Image, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """Florence-2's ``<MORE_DETAILED_CAPTION>`` of ``image``, whitespace tidied."""
    import torch

    image = image.convert("RGB")
    inputs = captioner.processor(text=TASK, images=image, return_tensors="pt").to(captioner.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(captioner.dtype)
    with torch.inference_mode():
        ids = captioner.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=NUM_BEAMS,
                                       do_sample=False)
    text = captioner.processor.batch_decode(ids, skip_special_tokens=False)[0]
    answer = captioner.processor.post_process_generation(text, task=TASK, image_size=image.size)[TASK]
    return " ".join(str(answer).split())


def loaded() -> list[tuple[str, str]]:
    """(model folder, device) of every captioner in memory."""
    with _LOCK:
        return list(_LOADED)


def free() -> bool:
    """Drop every loaded captioner and give its GPU memory back (waits for a caption being written). Whether there
    was one."""
    with _LOCK:
        had = bool(_LOADED)
        on_gpu = any(c.device.startswith("cuda") for c in _LOADED.values())
        _LOADED.clear()
    if had:
        gc.collect()
        if on_gpu:
            import torch

            torch.cuda.empty_cache()
    return had


free_captioner = free  # the names trainer.api exports (the page's other stages have a free of their own)
loaded_captioners = loaded
