"""Optional speed-ups for the Flux transformer on a CUDA GPU; everything here falls back to doing nothing.

``accelerate_transformer`` compiles each transformer block in place ("regional compilation": the 19 double
and 38 single blocks share two compiled graphs, so compiling costs seconds to a minute, not the many minutes a
whole-model compile takes). Blocks are compiled with ``nn.Module.compile``, which keeps parameter names (and
so saved LoRA keys) unchanged; compilation itself is lazy and happens on the first forward. On a CPU, without
Triton, or with ``ONE_IMAGE_LORA_COMPILE=0`` it returns ``False`` and leaves the model untouched, so the CPU
tiny-demo path and the tests never compile. ``restore_eager`` undoes it (used as the fallback when compiling
fails at the first step).

Measured numbers and what each change bought: ``bench/RESULTS.md``.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "ONE_IMAGE_LORA_COMPILE"  # "0" turns compilation off (debugging, or a GPU where it misbehaves)
_FLAG = "_one_image_lora_compiled"


def _blocks(transformer) -> list[torch.nn.Module]:
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(transformer, name, None) or [])
    return blocks


def can_compile(device) -> bool:
    """True where block compilation is expected to work and pay: a CUDA device with Triton, not switched off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401  (inductor's GPU code generator)
    except ImportError:
        return False
    return hasattr(torch, "compile")


def accelerate_transformer(transformer, device, *, force: bool = False, **compile_kwargs) -> bool:
    """Compile every Flux block in place; ``True`` if it did. Quietly ``False`` where it can't (CPU, no Triton).

    ``force`` compiles on any device (tests use it on the CPU with ``backend="aot_eager"``). Extra keyword
    arguments go to ``torch.compile`` (default: inductor, static shapes, graph breaks allowed).
    """
    if not (force or can_compile(device)):
        return False
    blocks = _blocks(transformer)
    if not blocks:
        return False
    if getattr(transformer, _FLAG, False):
        return True
    kwargs = {"dynamic": False, **compile_kwargs}
    # Previews (eval, no grad) and training (grad) each need a graph, and 1024 px a third: stay under the limit.
    try:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    except AttributeError:
        pass
    for block in blocks:
        block.compile(**kwargs)
    setattr(transformer, _FLAG, True)
    return True


def is_accelerated(transformer) -> bool:
    return bool(getattr(transformer, _FLAG, False))


def restore_eager(transformer) -> None:
    """Undo ``accelerate_transformer``: every block runs eagerly again (the fallback when compiling fails)."""
    for block in _blocks(transformer):
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
    if getattr(transformer, _FLAG, False):
        setattr(transformer, _FLAG, False)
    try:
        torch._dynamo.reset()
    except Exception:  # pragma: no cover - best effort
        pass
