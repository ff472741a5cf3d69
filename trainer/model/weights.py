"""Loading weight files that come from outside the app: ``.safetensors`` only, header checked first.

A pickle (``.bin``, ``.pt``, ``.ckpt``) can run code when it is loaded, so it is refused by name and by
content. A ``.safetensors`` file is safe to parse, but its first 8 bytes say how long the JSON header is:
a hostile or damaged file can claim gigabytes. So the header is read by hand first (size cap, a pickle or zip
renamed to .safetensors, JSON shape, every tensor's dtype on an allow-list) and the keys are checked against what
the caller expects, before safetensors is asked to load anything. Byte ranges, overlaps and the file's length are
left to safetensors' own parser, which refuses them before it allocates a tensor (the error becomes "damaged").

Everything that loads a user-provided LoRA, and the resume code reading its own training state, goes
through ``load_safetensors``.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from trainer.errors import UserError

MAX_HEADER_BYTES = 16 * 1024 * 1024  # a rank-128 FLUX LoRA's header is ~200 KB; safetensors itself allows 100 MB
MAX_FILE_BYTES = 8 * 1024 ** 3  # no LoRA is 8 GB; anything bigger is not what the user meant to give us
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ALLOWED_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}

# A LoRA for the Flux transformer, in the layouts diffusers loads: diffusers/peft
# ("transformer.<module>.lora_A.weight"), kohya/ComfyUI ("lora_unet_<module>.lora_down.weight", ".alpha").
LORA_KEY = re.compile(
    r"^(?:(?:transformer|base_model\.model|diffusion_model)\.)?[\w.]+\.lora_[AB](?:\.default)?\.weight$"
    r"|^lora_(?:unet|transformer)_\w+\.(?:lora_down\.weight|lora_up\.weight|alpha|dora_scale)$"
)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the tensor data (8 + header length)


def read_header(path: str | os.PathLike, what: str = "weights file",
                max_header_bytes: int = MAX_HEADER_BYTES, max_file_bytes: int = MAX_FILE_BYTES) -> Header:
    """Parse and check a ``.safetensors`` header without loading any tensor. Raises ``UserError``."""
    path = Path(path)
    _check_name(path, what)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UserError(f"The {what} '{path.name}' is not a regular file.")
        if size > max_file_bytes:
            raise UserError(f"The {what} '{path.name}' is {size / 1e9:.1f} GB, more than the "
                            f"{max_file_bytes / 1e9:.0f} GB allowed.")
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(_damaged(path, what, "it is shorter than a safetensors header"))
            (length,) = struct.unpack("<Q", head)
            if length > max_header_bytes:
                raise UserError(f"The {what} '{path.name}' declares a {length:,}-byte header, more than the "
                                f"{max_header_bytes:,} bytes allowed: it is damaged or not a real weights file.")
            if 8 + length > size:
                raise UserError(_damaged(path, what, "it is truncated (the header runs past the end)"))
            raw = f.read(length)
    except OSError as err:
        raise UserError(f"Could not read the {what} '{path.name}': {err.strerror or err}.") from None
    return _parse_header(raw, path, what)


def load_safetensors(path: str | os.PathLike, what: str = "weights file", *,
                     key_check: Callable[[Iterable[str]], None] | None = None,
                     max_header_bytes: int = MAX_HEADER_BYTES, max_file_bytes: int = MAX_FILE_BYTES,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check the header, check the keys (``key_check`` raises ``UserError``), then load on the CPU."""
    header = read_header(path, what, max_header_bytes, max_file_bytes)
    if key_check is not None:
        key_check(header.tensors.keys())
    return _load(Path(path), header, what)


def load_safetensors_bytes(data: bytes, name: str, what: str = "weights file", *,
                           max_header_bytes: int = MAX_HEADER_BYTES,
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The same checks for bytes already in memory (e.g. read once to verify a checksum)."""
    if len(data) < 8:
        raise UserError(_damaged(Path(name), what, "it is shorter than a safetensors header"))
    (length,) = struct.unpack("<Q", data[:8])
    if length > max_header_bytes:
        raise UserError(f"The {what} '{name}' declares a {length:,}-byte header, more than the "
                        f"{max_header_bytes:,} bytes allowed.")
    if 8 + length > len(data):
        raise UserError(_damaged(Path(name), what, "it is truncated (the header runs past the end)"))
    header = _parse_header(data[8:8 + length], Path(name), what)
    import safetensors.torch

    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise UserError(_damaged(Path(name), what, str(err).splitlines()[0] if str(err) else type(err).__name__)) from None
    return tensors, dict(header.metadata)


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A user's LoRA file: ``.safetensors`` only, LoRA keys only, finite floating-point values."""
    tensors, metadata = load_safetensors(path, "LoRA file", key_check=check_lora_keys)
    for key, value in tensors.items():
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise UserError(f"The LoRA file '{Path(path).name}' has a non-finite or non-float tensor ({key}).")
    return tensors, metadata


def check_lora_keys(keys: Iterable[str]) -> None:
    keys = list(keys)
    if not keys:
        raise UserError("The LoRA file holds no tensors.")
    foreign = [k for k in keys if not LORA_KEY.match(k)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise UserError(f"This is not a Flux LoRA file: it holds {len(foreign)} tensor(s) that are not LoRA weights "
                        f"({shown}). Give a LoRA .safetensors (diffusers/peft or kohya/ComfyUI layout).")
    if not any(".lora_" in k and ("lora_A" in k or "lora_down" in k) for k in keys):
        raise UserError("The LoRA file has no LoRA down/A matrices; it is incomplete.")


# ---- internals --------------------------------------------------------------------------------------

def _check_name(path: Path, what: str) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UserError(f"'{path.name}' is a pickle-based {suffix} file, which can run code when loaded; only "
                        ".safetensors weights are accepted. Convert it to .safetensors first.")
    if suffix != ".safetensors":
        raise UserError(f"The {what} '{path.name}' must be a .safetensors file.")


def _damaged(path: Path, what: str, why: str) -> str:
    return f"The {what} '{path.name}' is damaged: {why}."


def _parse_header(raw: bytes, path: Path, what: str) -> Header:
    if raw[:1] != b"{":
        if raw[:2] == b"\x80\x02" or raw[:1] == b"\x80" or raw[:2] == b"PK":
            raise UserError(f"'{path.name}' is a pickle/zip (PyTorch) file renamed to .safetensors; it is refused.")
        raise UserError(_damaged(path, what, "its header is not JSON"))
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" "))
    except (UnicodeDecodeError, ValueError):
        raise UserError(_damaged(path, what, "its header is not valid JSON")) from None
    if not isinstance(header, dict):
        raise UserError(_damaged(path, what, "its header is not a JSON object"))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise UserError(_damaged(path, what, "its metadata is not a map of strings"))
    data_start = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(_damaged(path, what, f"tensor '{key}' has an invalid entry")) from None
        if dtype not in ALLOWED_DTYPES:
            raise UserError(_damaged(path, what, f"tensor '{key}' has an unsupported dtype {dtype!r}"))
        tensors[key] = TensorInfo(dtype, shape, start, end)
    return Header(tensors=tensors, metadata=metadata, data_start=data_start)


def _load(path: Path, header: Header, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import safetensors.torch

    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:
        raise UserError(_damaged(path, what, str(err).splitlines()[0] if str(err) else type(err).__name__)) from None
    return tensors, dict(header.metadata)

