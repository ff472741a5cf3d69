"""Regional compilation of the Flux transformer on a CUDA GPU; quietly nothing elsewhere.

``accelerate_transformer`` compiles each transformer block in place ("regional compilation": the 19 double and 38
single blocks share two compiled graphs, so compiling costs seconds to a minute, not the many minutes a
whole-model compile takes). It uses diffusers' ``ModelMixin.compile_repeated_blocks`` (the classes a model names in
``_repeated_blocks``: ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock`` for Flux, i.e. exactly
``transformer_blocks`` and ``single_transformer_blocks``) and compiles those two lists itself for a model that
names none. Either way each block is compiled with ``nn.Module.compile``, which keeps parameter names (and so saved
LoRA keys) unchanged; compilation itself is lazy and happens on the first forward. On a CPU, without Triton, or
with ``ONE_IMAGE_LORA_COMPILE=0`` it returns ``False`` and leaves the blocks as they are, so the CPU tiny-demo path
and the tests never compile. Compiled blocks also put cuDNN's attention first where a self-test in a child process
finds it works (``trainer.training.accel.attention.choose_attention``), and on CUDA the preview forward is replayed
from CUDA graphs (``trainer.training.accel.graphs.GraphedInference``). ``restore_eager`` undoes all three (used as
the fallback when compiling fails at the first step).
"""
from __future__ import annotations

import torch

from trainer.runtime import Runtime, current
from trainer.training.accel.attention import choose_attention, flux_blocks, prefer_cudnn_attention, restore_attention
from trainer.training.accel.graphs import GraphedInference, can_use_cuda_graphs

_FLAG = "_one_image_lora_compiled"


def can_compile(device, runtime: Runtime | None = None) -> bool:
    """True where block compilation is expected to work and pay: a CUDA device with Triton, not switched off
    (``ONE_IMAGE_LORA_COMPILE=0`` in the process's ``Runtime``)."""
    if not (runtime or current()).compile:
        return False
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401  (inductor's GPU code generator)
    except ImportError:
        return False
    return hasattr(torch, "compile")


def accelerate_transformer(transformer, device, *, force: bool = False, inference_graphs: bool | None = None,
                           attention_tokens: int | tuple[int, ...] | None = None, runtime: Runtime | None = None,
                           **compile_kwargs) -> bool:
    """Compile every Flux block in place; ``True`` if it did. Quietly ``False`` where it can't (CPU, no Triton).

    ``force`` compiles on any device (tests use it on the CPU with ``backend="aot_eager"``). Extra keyword
    arguments go to ``torch.compile`` (default: inductor, static shapes, graph breaks allowed). On CUDA it also
    installs ``GraphedInference`` for the no-grad forward (previews) unless ``inference_graphs=False``, and
    puts cuDNN attention first where ``choose_attention`` finds it works at ``attention_tokens`` (the job's
    sequence length: image + text tokens). ``runtime``: the switches (default: the process's).
    """
    runtime = runtime or current()
    if inference_graphs is None:
        inference_graphs = can_use_cuda_graphs(device, runtime)
    if inference_graphs:
        GraphedInference.install(transformer)
    if not (force or can_compile(device, runtime)):
        return False
    blocks = flux_blocks(transformer)
    if not blocks:
        return False
    if getattr(transformer, _FLAG, False):
        return True
    # cuDNN attention only with compiled blocks: the choice is then made once, while each block is traced, and
    # the compiled code never touches PyTorch's process-wide attention settings again (uncompiled, every call
    # would set and restore them, racing with other threads: a second job on another GPU, a Compare render). A
    # compile failure at the first step falls back to uncompiled blocks and PyTorch's default attention together.
    if choose_attention(device, attention_tokens, runtime) == "cudnn":
        prefer_cudnn_attention(transformer)
    kwargs = {"dynamic": False, **compile_kwargs}
    # Previews (eval, no grad) and training (grad) each need a graph, and 1024 px a third: stay under the limit.
    try:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    except AttributeError:
        pass
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(**kwargs)  # diffusers: block.compile(**kwargs) for each repeated block
    else:
        for block in blocks:
            block.compile(**kwargs)
    setattr(transformer, _FLAG, True)
    return True


def is_accelerated(transformer) -> bool:
    return bool(getattr(transformer, _FLAG, False))


def restore_eager(transformer) -> None:
    """Undo ``accelerate_transformer``: every block runs eagerly again, with PyTorch's default attention (the
    fallback when compiling fails: the plainest path is the one most likely to work)."""
    GraphedInference.uninstall(transformer)
    restore_attention(transformer)
    for module in transformer.modules():  # whichever modules were compiled (diffusers' repeated blocks or ours)
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    if getattr(transformer, _FLAG, False):
        setattr(transformer, _FLAG, False)
    try:
        torch._dynamo.reset()
    except Exception:  # pragma: no cover - best effort
        pass
