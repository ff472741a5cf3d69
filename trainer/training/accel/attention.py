"""Attention: cuDNN's fused kernel first, where it has been seen to work on this machine.

``choose_attention`` decides (``ONE_IMAGE_LORA_ATTENTION`` through the process's ``Runtime``, and a self-test in a
child process at the job's sequence length); ``prefer_cudnn_attention`` wraps every Flux block's forward so its
attention tries cuDNN first; ``restore_attention`` takes the wrappers off. ``trainer.training.accel.compile`` only
uses it with compiled blocks (the reason is there).
"""
from __future__ import annotations

import functools
import logging
import subprocess
import sys
from typing import Callable

import torch

from trainer.runtime import Runtime, current

log = logging.getLogger(__name__)

_ATTENTION_FLAG = "_one_image_lora_attention"


def flux_blocks(transformer) -> list[torch.nn.Module]:
    """The Flux transformer's double-stream then single-stream blocks (empty for anything else)."""
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(transformer, name, None) or [])
    return blocks


# cuDNN's attention is faster than flash attention at Flux's shapes on Hopper (bench/RESULTS.md: the training
# step's attention forward + backward and the previews' batched forward), same arithmetic up to bf16 rounding.
# PyTorch ranks it below flash by default. Its backward crashed with an illegal memory access (which kills the
# CUDA context: no in-process fallback is possible) on one H100 image (bench/RESULTS.md, 2026-11-22) and worked on
# another machine: so it is tried once in a child process at the job's shape before a job relies on it.
_SELF_TEST = r"""
import sys, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
tokens = int(sys.argv[1])
torch.cuda.set_device(int(sys.argv[2]))  # the job's own GPU (one process per GPU in a multi-GPU job)
torch.manual_seed(0)
def run(backend, batch, backward):
    # Flux's layout: [B, S, H, D] tensors seen through a permute, as diffusers passes them to SDPA
    leaves = [torch.randn(batch, tokens, 24, 128, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
              for _ in range(3)]
    q, k, v = (t.permute(0, 2, 1, 3) for t in leaves)
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            out.float().square().mean().backward()
    return [out] + [t.grad for t in leaves if backward]
for batch, backward in ((1, True), (3, False)):
    torch.manual_seed(batch)
    got = run(SDPBackend.CUDNN_ATTENTION, batch, backward)
    torch.manual_seed(batch)
    ref = run(SDPBackend.FLASH_ATTENTION, batch, backward)
    for a, b in zip(got, ref):
        err = float((a.float() - b.float()).norm() / b.float().norm())
        assert err < 0.02, err
torch.cuda.synchronize()
print("cudnn attention ok")
"""
_attention_verdicts: dict[tuple[int, int], bool] = {}


def cudnn_attention_works(tokens: int, device_index: int = 0, timeout_s: float = 180.0) -> bool:
    """True if cuDNN attention ran forward + backward at ``tokens`` (and a 3-image forward) on GPU
    ``device_index`` in a child process and agreed with flash attention. Asked once per sequence length and GPU
    per process (a few seconds, most of it the child's import of torch)."""
    key = (int(tokens), int(device_index))
    if key not in _attention_verdicts:
        try:
            # The child inherits this process's environment (it reads none of the Runtime's switches).
            done = subprocess.run([sys.executable, "-c", _SELF_TEST, str(key[0]), str(key[1])], capture_output=True,
                                  text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            # Not remembered: a GPU busy with another job can make the test slow without cuDNN being broken.
            log.warning("cuDNN attention self-test did not finish (%s); using PyTorch's default attention", err)
            return False
        ok = done.returncode == 0 and "cudnn attention ok" in done.stdout
        if not ok:
            log.warning("cuDNN attention failed its self-test at %d tokens (exit %s); using PyTorch's default "
                        "attention: %s", tokens, done.returncode, (done.stderr or done.stdout)[-500:])
        _attention_verdicts[key] = ok
    return _attention_verdicts[key]


def choose_attention(device, tokens: int | tuple[int, ...] | None, runtime: Runtime | None = None) -> str:
    """``"cudnn"`` or ``"default"`` (PyTorch's own choice: flash attention on these GPUs).

    ``tokens``: the job's sequence length, or every length it trains at (a set of pictures of several shapes): cuDNN
    only if it passes at each one. A set of 4 shapes crashed in cuBLAS after cuDNN's backward on an H200 when only
    the longest length had been tested (2026-12-03).

    The ``Runtime``'s ``attention`` (``ONE_IMAGE_LORA_ATTENTION``): ``auto`` (default) runs the self-test, ``cudnn``
    skips it, ``flash`` keeps PyTorch's choice. Off CUDA, or without a sequence length to test, always the default."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "default"
    setting = (runtime or current()).attention
    if setting == "cudnn":
        return "cudnn"
    if setting != "auto" or not tokens:
        return "default"
    index = device.index if device.index is not None else torch.cuda.current_device()
    lengths = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    return "cudnn" if all(cudnn_attention_works(t, index) for t in lengths) else "default"


def _cudnn_first(forward: Callable) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    @functools.wraps(forward)
    def forward_with_cudnn_attention(*args, **kwargs):
        # Inside the block's forward, so torch.compile records it in the block's graph: the compile caches
        # then tell a cuDNN graph from a flash one (a global setting is not part of their keys).
        with sdpa_kernel(order, set_priority=True):
            return forward(*args, **kwargs)

    return forward_with_cudnn_attention


def prefer_cudnn_attention(transformer) -> None:
    """Every Flux block's attention tries cuDNN first (then flash, memory-efficient, math, as PyTorch picks)."""
    if getattr(transformer, _ATTENTION_FLAG, None) == "cudnn":
        return
    for block in flux_blocks(transformer):
        object.__setattr__(block, "forward", _cudnn_first(type(block).forward.__get__(block)))
    object.__setattr__(transformer, _ATTENTION_FLAG, "cudnn")


def attention_backend(transformer) -> str:
    return getattr(transformer, _ATTENTION_FLAG, "default")


def restore_attention(transformer) -> None:
    for block in flux_blocks(transformer):
        block.__dict__.pop("forward", None)
    transformer.__dict__.pop(_ATTENTION_FLAG, None)
