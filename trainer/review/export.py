"""Export a checkpoint in the layouts other tools load.

* ``diffusers``: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` plus ``lora_adapter_metadata``;
  what ``FluxPipeline.load_lora_weights`` / ``Flux2KleinPipeline.load_lora_weights`` load. ComfyUI maps FLUX.1's
  diffusers names, but not all of FLUX.2's in its late-2025 versions (MLPs and single blocks: "lora key not loaded"),
  and it never reads ``lora_adapter_metadata`` (alpha): ComfyUI users take the other layout.
* ``kohya``: ``lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``,
  named after the original (BFL) Flux modules; what ComfyUI, Forge and kohya's sd-scripts load.
  A family's ``KohyaLayout`` may spell it differently: FLUX.2 [klein] uses the original dotted names,
  ``diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`` / ``lora_B.weight``, alpha folded into B, which both
  ComfyUI's loader and diffusers' FLUX.2 converter read (tests/test_klein.py checks both on the 4B model).

The original Flux model fuses layers diffusers keeps apart: a double block's ``img_attn.qkv`` is diffusers'
``to_q``/``to_k``/``to_v`` and a single block's ``linear1`` is ``to_q``/``to_k``/``to_v``/``proj_mlp``. A LoRA on
the fused layer is exact when its ``lora_down`` stacks the parts' A matrices and its ``lora_up`` places the parts'
B matrices on the block diagonal: ``up @ down`` is then the parts' ``B @ A`` stacked by output rows. The fused
rank is the sum of the parts' ranks, so its alpha is scaled by the same factor to keep ``alpha / rank``.
diffusers' ``_convert_kohya_flux_lora_to_diffusers`` recognises exactly this block-diagonal shape and splits it
back into the original matrices, so a kohya export loads back bit for bit.

Files written here never carry peft's ``base_model.model`` prefix (ComfyUI #4202, #4347) and never a token:
the metadata is an allow-list of training facts.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from trainer.errors import UserError
from trainer.families import DEFAULT_FAMILY, KohyaLayout, ModelFamily, family_of_metadata
from trainer.fsutil import atomic_write_bytes
from trainer.model.lora import LORA_METADATA_KEY
from trainer.model.weights import load_lora

FORMATS = ("kohya", "diffusers")

# What a checkpoint may say about itself in an exported file (an allow-list: nothing else is copied).
INFO_KEYS = ("base_model", "family", "step", "steps", "rank", "alpha", "resolution", "trigger_word", "caption",
             "learning_rate", "software")
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.")


@dataclass
class LoraWeights:
    """A LoRA in a layout-neutral form: per diffusers module path, its A (rank x in) and B (out x rank)."""
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    alpha: dict[str, float]
    info: dict[str, str] = field(default_factory=dict)
    family: ModelFamily = DEFAULT_FAMILY  # the model family it was trained on (its metadata says; older files: FLUX.1)

    @property
    def modules(self) -> list[str]:
        return sorted(self.a)

    def rank(self, module: str) -> int:
        return self.a[module].shape[0]

    @property
    def typical_rank(self) -> int:
        return Counter(self.rank(m) for m in self.a).most_common(1)[0][0]

    @property
    def typical_alpha(self) -> float:
        return Counter(self.alpha.values()).most_common(1)[0][0]


# ---------------------------------------------------------------- reading

def read_lora(path: Path) -> LoraWeights:
    """Read a diffusers/peft-layout LoRA file (ours, or peft's with ``base_model.model`` prefixes)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No checkpoint file at '{path}'.")
    # A path from the user: .safetensors only, header size capped, LoRA keys only, finite values (trainer.model.weights).
    tensors, metadata = load_lora(path)
    return lora_from_state_dict(tensors, metadata, source=str(path))


def lora_from_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         source: str = "the checkpoint") -> LoraWeights:
    metadata = metadata or {}
    if any(".lora_down." in k for k in tensors):
        raise UserError(f"{source} is already in the kohya layout; export takes a checkpoint in the diffusers layout.")
    a, b, alphas = {}, {}, {}
    for key, value in tensors.items():
        match = re.match(r"^(.*)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$", key)
        if match:
            module = _strip_prefix(match.group(1))
            (a if match.group(2) == "lora_A" else b)[module] = value
        elif key.endswith(".alpha"):
            alphas[_strip_prefix(key[: -len(".alpha")])] = float(value.item())
        else:
            raise UserError(f"{source} has a key that is not a LoRA weight: '{key}'.")
    if not a:
        raise UserError(f"{source} holds no LoRA weights.")
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[:3]
        raise UserError(f"{source} is incomplete: {', '.join(missing)} lack their lora_A or lora_B half.")
    for module in a:
        if a[module].ndim != 2 or b[module].ndim != 2 or a[module].shape[0] != b[module].shape[1]:
            raise UserError(f"{source}: the LoRA matrices of '{module}' have mismatched shapes.")
    config = _adapter_config(metadata)
    for module in a:
        if module not in alphas:
            alphas[module] = _pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha"))
            if alphas[module] is None:  # no alpha recorded: diffusers and peft then use alpha = rank
                alphas[module] = float(a[module].shape[0])
    info = {k: v for k, v in metadata.items() if k in INFO_KEYS}
    return LoraWeights(a=a, b=b, alpha={m: float(alphas[m]) for m in a}, info=info,
                       family=family_of_metadata(metadata))


def _strip_prefix(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _adapter_config(metadata: dict[str, str]) -> dict:
    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in data.items()}


def _pattern_value(module: str, patterns: dict | None, default):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(value)
    return None if default is None else float(default)


# ---------------------------------------------------------------- the kohya / ComfyUI layout

def kohya_groups(modules, layout: KohyaLayout) -> dict[str, tuple[str, ...]]:
    """kohya name (``lora_unet_…``) → the diffusers modules it fuses, for the modules present (``layout``: the
    model family's original layer names)."""
    modules = set(modules)
    groups: dict[str, tuple[str, ...]] = {}
    claimed: set[str] = set()
    blocks: dict[tuple[str, int], set[str]] = {}
    for module in modules:
        match = _BLOCK.match(module)
        if match:
            blocks.setdefault((match.group(1), int(match.group(2))), set()).add(match.group(3))
    for (kind, index), present in sorted(blocks.items()):
        table, prefix = ((layout.double_block, layout.double_prefix) if kind == "transformer_blocks"
                         else (layout.single_block, layout.single_prefix))
        for kohya, parts in table.items():
            found = [p for p in parts if p in present]
            if not found:
                continue
            if len(found) != len(parts):
                raise UserError(f"The LoRA trains {', '.join(found)} of {kind}.{index} but not "
                                f"{', '.join(p for p in parts if p not in present)}; the kohya layout fuses them "
                                "into one layer, so it needs all of them. Export it in the diffusers layout instead.")
            full = tuple(f"{kind}.{index}.{p}" for p in parts)
            groups[layout.block_format.format(prefix=prefix, index=index, name=kohya)] = full
            claimed.update(full)
    for kohya, module in layout.global_layers.items():
        if module in modules:
            groups[layout.global_format.format(name=kohya)] = (module,)
            claimed.add(module)
    unknown = sorted(modules - claimed)
    if unknown:
        raise UserError(f"These LoRA layers have no kohya/ComfyUI name: {', '.join(unknown[:5])}. "
                        "Export in the diffusers layout instead.")
    return groups


def to_kohya(lora: LoraWeights) -> dict[str, torch.Tensor]:
    """kohya/ComfyUI state dict: ``lora_down`` / ``lora_up`` / ``alpha`` per (fused) original layer."""
    out: dict[str, torch.Tensor] = {}
    layout = lora.family.kohya
    for name, parts in kohya_groups(lora.a, layout).items():
        if len(parts) == 1:
            (module,) = parts
            down, up = lora.a[module], lora.b[module]
            if module in layout.swapped:
                up = _swap_halves(up)
            alpha = lora.alpha[module]
        else:
            down, up, alpha = _fuse(lora, parts)
        if layout.alpha_key is None:  # the consumer scales by 1 (alpha = rank): fold alpha / rank into up
            up = up * (alpha / down.shape[0])
        out[f"{name}.{layout.down_key}"] = down.contiguous()
        out[f"{name}.{layout.up_key}"] = up.contiguous()
        if layout.alpha_key is not None:
            out[f"{name}.{layout.alpha_key}"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _fuse(lora: LoraWeights, parts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA for the fused layer: A's stacked, B's block-diagonal, each part at the same rank ``r``.

    Parts with a lower rank are padded with zero rows/columns (a no-op); a part whose ``alpha / rank`` differs
    from the first part's is folded into its B so the fused layer can have a single alpha.
    """
    r = max(lora.rank(p) for p in parts)
    first = parts[0]
    scale = lora.alpha[first] / lora.rank(first)
    downs, ups = [], []
    for p in parts:
        a, b = lora.a[p], lora.b[p]
        factor = (lora.alpha[p] / lora.rank(p)) / scale
        if factor != 1.0:
            b = b * factor
        if a.shape[0] < r:  # zero-pad to rank r
            a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
        downs.append(a)
        ups.append(b)
    down = torch.cat(downs, dim=0)
    up = torch.block_diag(*ups)
    # kohya scales by alpha / rank with rank = down.shape[0] = len(parts) * r.
    alpha = scale * down.shape[0]
    return down, up, alpha


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


# ---------------------------------------------------------------- the diffusers layout

def to_diffusers(lora: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers state dict (``transformer.`` prefix, no peft prefix) and its ``lora_adapter_metadata``."""
    tensors = {}
    for module in lora.modules:
        tensors[f"transformer.{module}.lora_A.weight"] = lora.a[module].contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = lora.b[module].contiguous()
    r, alpha = lora.typical_rank, lora.typical_alpha
    config = {"r": r, "lora_alpha": alpha, "target_modules": lora.modules, "lora_dropout": 0.0,
              "bias": "none", "use_dora": False, "init_lora_weights": True}
    rank_pattern = {m: lora.rank(m) for m in lora.modules if lora.rank(m) != r}
    alpha_pattern = {m: lora.alpha[m] for m in lora.modules if lora.alpha[m] != alpha}
    if rank_pattern:
        config["rank_pattern"] = {re.escape(m): v for m, v in rank_pattern.items()}
    if alpha_pattern:
        config["alpha_pattern"] = {re.escape(m): v for m, v in alpha_pattern.items()}
    adapter = json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)
    return tensors, {LORA_METADATA_KEY: adapter}


# ---------------------------------------------------------------- metadata and the file

def export_metadata(lora: LoraWeights, fmt: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Training facts for the file's header: an allow-list, never a token."""
    info = {k: str(v) for k, v in {**lora.info, **(extra or {})}.items() if k in INFO_KEYS and v is not None}
    info.setdefault("rank", str(lora.typical_rank))
    info.setdefault("alpha", str(lora.typical_alpha))
    if "step" in info:
        info.setdefault("steps", info["step"])
    info["format"] = "pt"
    info["lora_layout"] = fmt
    if fmt == "kohya":
        layout = lora.family.kohya
        info.update({"ss_network_module": layout.network_module, "ss_network_dim": info["rank"],
                     "ss_network_alpha": info["alpha"], "ss_base_model_version": layout.base_model_version})
        for ours, theirs in (("steps", "ss_steps"), ("resolution", "ss_resolution"),
                             ("learning_rate", "ss_learning_rate")):
            if ours in info:
                info[theirs] = info[ours]
    return scrub_tokens(info)


def scrub_tokens(metadata: dict[str, str]) -> dict[str, str]:
    """Drop anything that looks like a Hugging Face token, or equals one in the environment."""
    secrets = {os.environ.get(k) for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN")}
    secrets = {s for s in secrets if s and len(s) >= 8}
    clean = {}
    for key, value in metadata.items():
        if _TOKEN.search(value) or any(s in value for s in secrets):
            continue
        clean[key] = value
    return clean


def export_bytes(checkpoint: Path, fmt: str, extra_info: dict[str, str] | None = None) -> bytes:
    if fmt not in FORMATS:
        raise UserError(f"Unknown export format '{fmt}'. Choose one of: {', '.join(FORMATS)}.")
    lora = read_lora(checkpoint)
    metadata = export_metadata(lora, fmt, extra_info)
    if fmt == "kohya":
        tensors = to_kohya(lora)
    else:
        tensors, adapter = to_diffusers(lora)
        metadata.update(adapter)
    return safetensors.torch.save(tensors, metadata=metadata)


def export_lora(checkpoint: Path, fmt: str, output: Path, extra_info: dict[str, str] | None = None) -> Path:
    """Write ``checkpoint`` in layout ``fmt`` to ``output`` (atomically). Returns the output path."""
    output = Path(output)
    if output.resolve() == Path(checkpoint).resolve():
        raise UserError("The export would overwrite the checkpoint itself; choose another output file.")
    if output.suffix != ".safetensors":
        raise UserError(f"Name the export '{output.stem}.safetensors': tools recognise LoRAs by that extension.")
    data = export_bytes(checkpoint, fmt, extra_info)
    try:
        atomic_write_bytes(output, data)
    except OSError as err:
        raise UserError(f"Could not write '{output}': {err.strerror or err}.") from None
    return output


def export_name(checkpoint: Path, fmt: str) -> str:
    """``lora-000250.safetensors`` → ``lora-000250-kohya.safetensors``."""
    return f"{Path(checkpoint).stem}-{fmt}.safetensors"
