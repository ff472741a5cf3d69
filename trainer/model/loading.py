"""Loading a model's parts: the one place weights are loaded.

A model is named by a spec: ``tiny-demo`` (built in code, saved in the diffusers layout), a Hugging Face
Hub id such as ``black-forest-labs/FLUX.1-dev`` (downloaded with the user's token), or a local diffusers
folder. ``resolve_model`` turns a spec into a local folder and explains every failure *before* any GPU
memory is taken; ``load_parts`` loads that folder — the same code for all three. What differs between model
families (pipeline class, required subfolders, what to download) comes from the folder's ``ModelFamily``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError
from trainer.families import DEMO_IDS, FLUX1, ModelFamily, family_of_folder, family_of_spec, tiny_ids
from trainer.model.tiny import MARKER, ensure_tiny_model
from trainer.paths import shipped_model_dir, tiny_model_dir

TINY_DEMO = FLUX1.tiny_id
SHAPES_DEMO = "shapes-demo"
SHAPES_DEMO_NOTICE = (
    "shapes-demo is a small built-in FLUX.1-shaped model trained on coloured shapes and little figures on plain, "
    "striped, checkered, dotted and gradient backgrounds (scripts/train_shapes_demo.py). It is no photo model, but a "
    "LoRA visibly pulls its pictures toward your image within minutes on a CPU: try the workflow, masking and "
    "checkpoint picking with it. It draws at 128 px, so it trains at 128 px.")
SHAPES_DEMO_RESOLUTION = 128  # the size it was trained at (scripts/train_shapes_demo.py --cpu-profile's buckets)
SHAPES_DEMO_PREVIEW_STEPS = 12  # its pictures settle by ~12 denoising steps; 20 costs a CPU user more for no change
FLUX_DEV = FLUX1.default_hub_id
TINY_DEMO_NOTICE = FLUX1.tiny_notice
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelParts:
    """The loaded components of a model's pipeline, on their devices (a family without a second text encoder leaves
    ``text_encoder_2`` / ``tokenizer_2`` None)."""
    transformer: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    model_path: Path
    # How the transformer sits on ``device`` (set by ``place_transformer``; a memory tier decides): the storage of
    # its frozen weights, and whether training must recompute activations to fit.
    weights: str = "bf16"
    gradient_checkpointing: bool = False
    # Set: only as many blocks are checkpointed as fit under this many GiB (a tier's "as-needed"); None: every block.
    checkpoint_cap_gib: float | None = None
    # Previews one image at a time and without a CUDA graph (small-card tiers: ``MemoryTier.lean_previews``).
    lean_previews: bool = False
    # "fp8" when the block layers multiply in fp8 (``place_transformer`` with a tier's ``matmul = "fp8"``), else "bf16"
    matmul: str = "bf16"
    family: ModelFamily = FLUX1

    @property
    def is_tiny_demo(self) -> bool:
        return is_tiny_demo(self.model_path)


def is_tiny_demo(folder: Path) -> bool:
    """A built-in small model (tiny-demo's random weights, any family, or shapes-demo's trained ones): fine on a CPU."""
    return (Path(folder) / MARKER).is_file()


def default_model() -> str:
    """FLUX.1-dev where a CUDA GPU can train it; otherwise shapes-demo (it learns something a user can see), or
    tiny-demo where a checkout lacks shapes-demo's files."""
    if torch.cuda.is_available():
        return FLUX_DEV
    return SHAPES_DEMO if (shipped_model_dir(SHAPES_DEMO) / "model_index.json").is_file() else TINY_DEMO


TINY_DEMO_PREVIEW_STEPS = 4


def adjust_for_model(config):
    """Settings a tiny model changes so a CPU run stays quick; returns (config, notice or "")."""
    if config.model == SHAPES_DEMO:
        return config.replace(resolution=SHAPES_DEMO_RESOLUTION,
                              preview_steps=min(config.preview_steps, SHAPES_DEMO_PREVIEW_STEPS)), SHAPES_DEMO_NOTICE
    family = tiny_ids().get(config.model)
    if family is None:
        return config, ""
    return config.replace(preview_steps=min(config.preview_steps, TINY_DEMO_PREVIEW_STEPS)), family.tiny_notice


def resolve_model(spec: str, token: str | None = None) -> Path:
    """Return a local diffusers folder for ``spec``, downloading from the Hub if needed."""
    spec = (spec or "").strip()
    if spec in tiny_ids():
        return ensure_tiny_model(tiny_model_dir(spec), tiny_ids()[spec])
    if spec in DEMO_IDS:
        folder = shipped_model_dir(spec)
        if not (folder / "model_index.json").is_file():
            raise UserError(f"The built-in model '{spec}' is missing from {folder} (a partial copy of the app?). "
                            f"Get a complete checkout, or use '{TINY_DEMO}' to try the workflow.")
        check_diffusers_folder(folder)
        return folder
    local = Path(spec).expanduser()
    if local.is_dir():
        check_diffusers_folder(local)
        return local.resolve()
    if spec.startswith((".", "/", "~")) or "\\" in spec or not _HUB_ID.match(spec):
        raise UserError(f"Model '{spec}' is neither an existing folder nor a Hugging Face id like "
                        f"'{FLUX_DEV}'. Give a diffusers folder (with model_index.json), a Hub id, or '{TINY_DEMO}'.")
    return _download(spec, token, family_of_spec(spec))


def check_diffusers_folder(folder: Path) -> ModelFamily:
    """Check a diffusers folder is a complete model of a family we train, with .safetensors weights; its family."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"The folder '{folder}' is not a diffusers model: it has no model_index.json. "
                        "Point at the folder that holds model_index.json, transformer/, vae/ and the text encoders.")
    try:
        parts = json.loads(index.read_text())
    except ValueError:
        raise UserError(f"'{index}' is not valid JSON; the model folder looks damaged.") from None
    family = family_of_folder(folder)
    missing = [p for p in family.required_parts if p not in parts or not (folder / p).is_dir()]
    if missing:
        raise UserError(f"The model folder '{folder}' is missing {', '.join(missing)}. A {family.label} model needs "
                        f"{', '.join(family.required_parts[:-1])} and {family.required_parts[-1]}.")
    for weights_part in family.weight_parts:
        if not any((folder / weights_part).glob("*.safetensors")):
            raise UserError(f"'{folder / weights_part}' has no .safetensors weights. Only .safetensors files "
                            "are loaded (pickle-based .bin files can run code and are refused).")
    return family


def _download(repo_id: str, token: str | None, family: ModelFamily) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    import os

    try:
        # HF_HUB_CACHE is read at call time (not import time) so a changed cache location is honoured.
        path = snapshot_download(repo_id, token=token or None, allow_patterns=list(family.hub_patterns),
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except hub_errors.GatedRepoError:
        if token:
            raise UserError(f"'{repo_id}' is a gated model and your Hugging Face token has no access to it. "
                            f"Open https://huggingface.co/{repo_id}, accept the license with the account the token "
                            "belongs to, then try again.") from None
        raise UserError(f"'{repo_id}' is a gated model: it needs a Hugging Face token. Accept the license at "
                        f"https://huggingface.co/{repo_id}, then set HF_TOKEN in the environment (or log in on the "
                        "Space) and try again.") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f"No model '{repo_id}' on the Hugging Face Hub (or it is private and your token can't "
                        "see it). Check the spelling, or give a local diffusers folder.") from None
    except hub_errors.LocalEntryNotFoundError:
        raise UserError(f"Could not download '{repo_id}': the Hugging Face Hub can't be reached (offline, or "
                        "HF_HUB_OFFLINE is set) and it is not in the local cache. Connect to the internet, or "
                        f"point at a local diffusers folder, or use '{TINY_DEMO}' to try the workflow.") from None
    except hub_errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            raise UserError(f"The Hugging Face Hub refused the token for '{repo_id}' (401). Check that HF_TOKEN "
                            "is a valid read token.") from None
        raise UserError(f"Downloading '{repo_id}' failed (HTTP {status}). Try again, or use a local folder.") from None
    except OSError as err:  # disk full, permissions
        raise UserError(f"Downloading '{repo_id}' failed while writing to disk: {err.strerror or err}. "
                        f"Free some disk space ({family.label} needs about {family.download_gb:.0f} GB) and try "
                        "again.") from None
    folder = Path(path)
    check_diffusers_folder(folder)
    return folder


def pick_device(device: torch.device | None = None, dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """bf16 on a CUDA GPU that supports it (fp16 overflows in Flux), fp32 on the CPU; ``device`` / ``dtype``, when
    given, are kept (and nothing is checked when both are)."""
    if device is not None and dtype is not None:
        return device, dtype
    picked_device, picked_dtype = _default_device()
    return device or picked_device, dtype or picked_dtype


def _default_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise UserError("This GPU does not support bfloat16, which Flux needs (float16 overflows and gives "
                            "NaN losses). Use an Ampere (RTX 30xx / A100) or newer GPU.")
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_parts(folder: Path, device: torch.device | None = None, dtype: torch.dtype | None = None,
               transformer_on_device: bool = True, encoders_on_device: bool = True) -> ModelParts:
    """Load every component of the diffusers folder onto ``device`` (text encoders stay until freed).

    ``transformer_on_device=False`` leaves the transformer in host memory for ``place_transformer``: a training job
    encodes its prompts first and frees the text encoders, so T5 (8.9 GiB) and the transformer never share the GPU.
    ``encoders_on_device=False`` keeps the text encoders in host memory for good (rendering on a small card, where
    the encoders stay loaded for new prompts: ``encode_prompts`` runs them there).
    """
    device, dtype = pick_device(device, dtype)
    family = check_diffusers_folder(folder)
    pipe = family.pipeline_class().from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    parts = ModelParts(
        transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
        text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer=pipe.tokenizer,
        tokenizer_2=getattr(pipe, "tokenizer_2", None), scheduler=pipe.scheduler, device=device, dtype=dtype,
        model_path=Path(folder), family=family)
    encoders = tuple(e for e in (parts.text_encoder, parts.text_encoder_2) if e is not None)
    for module in (parts.transformer, parts.vae, *encoders):
        module.requires_grad_(False)
        module.eval()
        if module is parts.transformer and not transformer_on_device:
            continue
        if any(module is e for e in encoders) and not encoders_on_device:
            continue
        module.to(device)
    return parts


def fp8_matmuls_apply(matmul: str, weights: str, device: torch.device, runtime=None) -> bool:
    """Will the block layers multiply in fp8? The tier asks (``matmul = "fp8"``, on bf16 or fp8 weights), the GPU
    has fp8 tensor cores, and ``ONE_IMAGE_LORA_FP8_MATMUL`` is not 0."""
    from trainer.model import fp8_matmul
    from trainer.runtime import current

    runtime = runtime or current()
    return (matmul == "fp8" and weights in ("bf16", "fp8") and runtime.fp8_matmul
            and fp8_matmul.supported(device))


def place_transformer(parts: ModelParts, weights: str = "bf16", gradient_checkpointing: bool = False,
                      lean_previews: bool = False, checkpoint_cap_gib: float | None = None, matmul: str = "bf16",
                      training: bool = True) -> dict:
    """Move the transformer to ``parts.device``, its frozen Linear weights stored as ``weights`` (a memory tier's).

    ``bf16`` moves it as loaded. ``fp8``/``nf4`` quantize it layer by layer on the device (``trainer.model.quantize``), so the
    GPU never holds the full-precision model. ``matmul="fp8"`` (a tier's, where ``fp8_matmuls_apply``): the block
    layers multiply in fp8; bf16 weights are then stored as fp8 with a transposed copy for ``training``'s backward
    (the same bytes as bf16; a render-only model needs no copy). Returns what was done for the job's log.
    """
    fp8 = fp8_matmuls_apply(matmul, weights, parts.device)
    parts.weights, parts.gradient_checkpointing, parts.lean_previews = weights, gradient_checkpointing, lean_previews
    parts.checkpoint_cap_gib = checkpoint_cap_gib if gradient_checkpointing else None
    parts.matmul = "fp8" if fp8 else "bf16"
    if weights == "bf16" and not fp8:
        parts.transformer.to(parts.device)
        return {"weights": weights, "quantized_layers": 0, "matmul": "bf16"}
    from trainer.model.quantize import quantize_linears, use_fp8_matmuls

    storage = "fp8" if weights == "bf16" else weights
    report = quantize_linears(parts.transformer, storage, parts.device, skip=parts.family.keeps_full_precision)
    report = {"weights": weights, **report, "matmul": parts.matmul}
    if fp8:
        report.update(use_fp8_matmuls(parts.transformer, transposed_copy=training and weights == "bf16"))
    return report
