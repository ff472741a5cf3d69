"""Optional speed-ups for the Flux transformer on a CUDA GPU; everything here falls back to doing nothing.

``accelerate_transformer`` compiles each transformer block in place ("regional compilation": the 19 double
and 38 single blocks share two compiled graphs, so compiling costs seconds to a minute, not the many minutes a
whole-model compile takes). Blocks are compiled with ``nn.Module.compile``, which keeps parameter names (and
so saved LoRA keys) unchanged; compilation itself is lazy and happens on the first forward. On a CPU, without
Triton, or with ``ONE_IMAGE_LORA_COMPILE=0`` it returns ``False`` and leaves the blocks as they are, so the CPU
tiny-demo path and the tests never compile. Compiled blocks also put cuDNN's attention first where a self-test
in a child process finds it works (``choose_attention``). ``restore_eager`` undoes both (used as the fallback
when compiling fails at the first step).

``TrainStep`` is ``train_lora``'s step (forward + masked loss + backward | clip + AdamW). On a CUDA GPU, after a
few eager warm-up steps, it captures the step as two CUDA graphs and replays them: the cached example never
changes and the noise comes from the loop's own (registered) generator, so a replay *is* the step, with no
Python or kernel-launch overhead. The loss is still checked before the optimizer graph runs, so nothing
non-finite is ever applied. Off the GPU, with ``ONE_IMAGE_LORA_CUDA_GRAPHS=0``, or if capturing fails, it runs
the plain eager step.

``accelerate_transformer`` also routes the transformer's no-grad, eval-mode forward (the preview sampler's 20
calls per image) through ``GraphedInference``: captured once per input shape as a CUDA graph and replayed. The
LoRA is updated in place by the optimizer, so a replay always sees the current weights.

Measured numbers and what each change bought: ``bench/RESULTS.md``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import subprocess
import sys
import weakref
from typing import Callable

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "ONE_IMAGE_LORA_COMPILE"  # "0" turns compilation off (debugging, or a GPU where it misbehaves)
GRAPHS_SWITCH = "ONE_IMAGE_LORA_CUDA_GRAPHS"  # "0" turns CUDA-graph replay of the training step off
ATTENTION_SWITCH = "ONE_IMAGE_LORA_ATTENTION"  # auto (default) | cudnn | flash: see choose_attention
_FLAG = "_one_image_lora_compiled"
_ATTENTION_FLAG = "_one_image_lora_attention"


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def _blocks(transformer) -> list[torch.nn.Module]:
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(transformer, name, None) or [])
    return blocks


def can_compile(device) -> bool:
    """True where block compilation is expected to work and pay: a CUDA device with Triton, not switched off."""
    if _switched_off(ENV_SWITCH):
        return False
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401  (inductor's GPU code generator)
    except ImportError:
        return False
    return hasattr(torch, "compile")


def accelerate_transformer(transformer, device, *, force: bool = False, inference_graphs: bool | None = None,
                           attention_tokens: int | None = None, **compile_kwargs) -> bool:
    """Compile every Flux block in place; ``True`` if it did. Quietly ``False`` where it can't (CPU, no Triton).

    ``force`` compiles on any device (tests use it on the CPU with ``backend="aot_eager"``). Extra keyword
    arguments go to ``torch.compile`` (default: inductor, static shapes, graph breaks allowed). On CUDA it also
    installs ``GraphedInference`` for the no-grad forward (previews) unless ``inference_graphs=False``, and
    puts cuDNN attention first where ``choose_attention`` finds it works at ``attention_tokens`` (the job's
    sequence length: image + text tokens).
    """
    if inference_graphs is None:
        inference_graphs = can_use_cuda_graphs(device)
    if inference_graphs:
        GraphedInference.install(transformer)
    if not (force or can_compile(device)):
        return False
    blocks = _blocks(transformer)
    if not blocks:
        return False
    if getattr(transformer, _FLAG, False):
        return True
    # cuDNN attention only with compiled blocks: the choice is then made once, while each block is traced, and
    # the compiled code never touches PyTorch's process-wide attention settings again (uncompiled, every call
    # would set and restore them, racing with other threads: a second job on another GPU, a Compare render). A
    # compile failure at the first step falls back to uncompiled blocks and PyTorch's default attention together.
    if choose_attention(device, attention_tokens) == "cudnn":
        prefer_cudnn_attention(transformer)
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
    """Undo ``accelerate_transformer``: every block runs eagerly again, with PyTorch's default attention (the
    fallback when compiling fails: the plainest path is the one most likely to work)."""
    GraphedInference.uninstall(transformer)
    restore_attention(transformer)
    for block in _blocks(transformer):
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
    if getattr(transformer, _FLAG, False):
        setattr(transformer, _FLAG, False)
    try:
        torch._dynamo.reset()
    except Exception:  # pragma: no cover - best effort
        pass


# ---------------------------------------------------------------------------------------------------------
# Attention: cuDNN's fused kernel first, where it has been seen to work on this machine

# cuDNN's attention is faster than flash attention at Flux's shapes on Hopper (bench/RESULTS.md: the training
# step's attention forward + backward and the previews' batched forward), same arithmetic up to bf16 rounding.
# PyTorch ranks it below flash by default. Its backward crashed with an illegal memory access (which kills the
# CUDA context: no in-process fallback is possible) on one H100 image (shared/PERFORMANCE.md) and worked on
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


def choose_attention(device, tokens: int | None) -> str:
    """``"cudnn"`` or ``"default"`` (PyTorch's own choice: flash attention on these GPUs).

    ``ONE_IMAGE_LORA_ATTENTION``: ``auto`` (default) runs the self-test, ``cudnn`` skips it, ``flash`` (or
    ``default``) keeps PyTorch's choice. Off CUDA, or without a sequence length to test, always the default."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "default"
    setting = os.environ.get(ATTENTION_SWITCH, "auto").strip().lower()
    if setting == "cudnn":
        return "cudnn"
    if setting != "auto" or not tokens:
        return "default"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "cudnn" if cudnn_attention_works(tokens, index) else "default"


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
    for block in _blocks(transformer):
        object.__setattr__(block, "forward", _cudnn_first(type(block).forward.__get__(block)))
    object.__setattr__(transformer, _ATTENTION_FLAG, "cudnn")


def attention_backend(transformer) -> str:
    return getattr(transformer, _ATTENTION_FLAG, "default")


def restore_attention(transformer) -> None:
    for block in _blocks(transformer):
        block.__dict__.pop("forward", None)
    transformer.__dict__.pop(_ATTENTION_FLAG, None)


# ---------------------------------------------------------------------------------------------------------
# Previews: the no-grad forward replayed from CUDA graphs

class GraphedInference:
    """Stands in for ``transformer.forward``: a no-grad, eval-mode call with ``return_dict=False`` on CUDA
    tensors is captured as a CUDA graph per input signature (after ``warmup`` eager calls) and replayed, with
    the inputs copied into the graph's static buffers and the output cloned out. Every other call (training,
    grad enabled, CPU, unusual arguments) goes to the original forward. Parameters are read in place at every
    replay, so LoRA updates are seen. A failed capture turns it off for good (eager from then on)."""

    ATTR = "_one_image_lora_graphed_inference"

    def __init__(self, transformer, forward, max_graphs: int = 2, warmup: int = 2):
        self.transformer, self.forward = transformer, forward
        self.max_graphs, self.warmup = max_graphs, warmup
        self.graphs: dict = {}
        self.seen: dict = {}
        self.error: str | None = None
        self.replays = 0
        self._side = None
        self._watch: list = []

    @classmethod
    def install(cls, transformer) -> "GraphedInference":
        existing = transformer.__dict__.get(cls.ATTR)
        if existing is not None:
            return existing
        wrapper = cls(transformer, transformer.forward)
        object.__setattr__(transformer, cls.ATTR, wrapper)
        object.__setattr__(transformer, "forward", wrapper)
        return wrapper

    @classmethod
    def reset(cls, transformer) -> None:
        """Drop the captured graphs (call after adding or removing a LoRA on this transformer)."""
        wrapper = transformer.__dict__.get(cls.ATTR)
        if wrapper is not None:
            wrapper.graphs.clear()
            wrapper.seen.clear()

    @classmethod
    def uninstall(cls, transformer) -> None:
        wrapper = transformer.__dict__.pop(cls.ATTR, None)
        if wrapper is not None:
            transformer.__dict__.pop("forward", None)
            wrapper.graphs.clear()

    def _eligible(self, args, kwargs) -> bool:
        if args or self.error is not None or torch.is_grad_enabled() or self.transformer.training:
            return False
        if kwargs.get("return_dict", True) or kwargs.get("joint_attention_kwargs") \
                or kwargs.get("controlnet_block_samples") is not None \
                or kwargs.get("controlnet_single_block_samples") is not None:
            return False
        tensors = [v for v in kwargs.values() if torch.is_tensor(v)]
        if not tensors or not all(v.is_cuda for v in tensors):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def __call__(self, *args, **kwargs):
        if not self._eligible(args, kwargs):
            return self.forward(*args, **kwargs)
        tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
        others = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
        key = (tuple(sorted((k, tuple(v.shape), v.dtype, v.device) for k, v in tensors.items())),
               tuple(sorted((k, repr(v)) for k, v in others.items())))
        if self.graphs and any(ref() is None or ref().data_ptr() != ptr for ref, ptr in self._watch):
            self.graphs.clear()  # the LoRA was replaced: the graphs point at freed weights
        entry = self.graphs.get(key)
        if entry is None:
            if self._side is None:
                self._side = torch.cuda.Stream()
            if self.seen.get(key, 0) < self.warmup:
                # Warm-up calls (the first one also compiles) run eagerly on a side stream, as capture requires.
                self.seen[key] = self.seen.get(key, 0) + 1
                self._side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._side):
                    out = self.forward(**kwargs)
                torch.cuda.current_stream().wait_stream(self._side)
                return out
            try:
                entry = self._capture(key, tensors, others)
            except Exception as err:
                log.warning("capturing the preview forward as a CUDA graph failed; previews stay eager", exc_info=True)
                self.error = f"{type(err).__name__}: {err}"[:300]
                self.graphs.clear()
                return self.forward(**kwargs)
        static_in, static_out, graph = entry
        for k, v in tensors.items():
            static_in[k].copy_(v)
        graph.replay()
        self.replays += 1
        return tuple(t.clone() for t in static_out)

    def _capture(self, key, tensors, others):
        while len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        static_in = {k: v.clone() for k, v in tensors.items()}
        self._watch = [(weakref.ref(p), p.data_ptr()) for m in _lora_layers(self.transformer) for p in m.parameters()
                       if p.requires_grad]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.forward(**static_in, **others)
        out = tuple(out)
        if not all(torch.is_tensor(t) for t in out):
            raise TypeError("unexpected output from the transformer")
        self.graphs[key] = (static_in, out, graph)
        return self.graphs[key]


# ---------------------------------------------------------------------------------------------------------
# The training step, eager or replayed from CUDA graphs

def can_use_cuda_graphs(device) -> bool:
    return (torch.device(device).type == "cuda" and torch.cuda.is_available() and not _switched_off(GRAPHS_SWITCH)
            and hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda.CUDAGraph, "register_generator_state"))


def adamw_options(device) -> dict:
    """Keyword arguments for ``torch.optim.AdamW`` that suit ``TrainStep`` on ``device``: fused on CUDA, and
    capturable (its step counter on the GPU) where the step will be replayed from a CUDA graph."""
    cuda = torch.device(device).type == "cuda"
    return {"fused": cuda, **({"capturable": True} if can_use_cuda_graphs(device) else {})}


def _lora_layers(transformer) -> list[torch.nn.Module]:
    return [m for m in transformer.modules() if hasattr(m, "cast_input_dtype_enabled") and hasattr(m, "lora_A")]


@contextlib.contextmanager
def preview_autocast(transformer, device, dtype):
    """The preview sampler's forward in the training step's numerics: bf16 autocast with peft's fp32 cast skipped.

    Without it the fp32 LoRA weights make every LoRA matmul of a preview run in float32 (~70 ms per denoising step
    on an H100 at 512 px, bench/RESULTS.md). On the CPU or in float32 it does nothing.
    """
    if torch.device(device).type != "cuda" or dtype != torch.bfloat16:
        yield
        return
    layers = _lora_layers(transformer)
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        with torch.autocast("cuda", dtype=dtype):
            yield
    finally:
        for m in layers:
            m.cast_input_dtype_enabled = True


class TrainStep:
    """``forward_backward(use_mask) -> loss``, then ``apply()`` (clip + AdamW) or ``discard()``.

    Same arithmetic as ``trainer.training.loop``'s step: ``loop.training_step`` computes the loss, gradients are clipped
    to ``cfg.max_grad_norm``, then ``optimizer.step()``. Two speed-ups, both only on CUDA:
    - under bf16 autocast, peft's cast of each LoRA input to float32 is skipped (autocast casts it straight back
      to bf16 for the matmul, so the result is bit-identical; the round trip only costs memory traffic);
    - after ``warmup_steps`` eager steps the step is captured as CUDA graphs and replayed (needs an optimizer
      made with ``capturable=True``: see ``adamw_options``). ``use_mask`` stays a per-step choice: the graph
      reads the loss weights from a buffer that holds the mask or ones (all-ones weights give the plain mean).
    Any failure while capturing falls back to eager steps for the rest of the run; a compile failure at the
    first step falls back to the uncompiled blocks (``restore_eager``).
    """

    def __init__(self, transformer, example, cfg, generator: torch.Generator, mu: float, params, optimizer,
                 *, graphs: bool | None = None, warmup_steps: int = 3, skip_lora_input_cast: bool = True,
                 step_fn: Callable | None = None):
        if step_fn is None:
            from trainer.training.loop import training_step as step_fn
        self.transformer, self.example, self.cfg = transformer, example, cfg
        self.generator, self.mu, self.params, self.optimizer = generator, mu, list(params), optimizer
        self._step_fn = step_fn
        self.device = example.latents.device
        self.cuda = self.device.type == "cuda"
        capturable = any(g.get("capturable", False) for g in optimizer.param_groups)
        if graphs is None:
            graphs = can_use_cuda_graphs(self.device)
        self.graphs_wanted = bool(graphs and self.cuda and capturable and getattr(generator, "device", None) is not None
                                  and generator.device.type == "cuda")
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.graph_error: str | None = None
        self._graphs = None
        self._lora = _lora_layers(transformer) if (self.cuda and skip_lora_input_cast) else []
        self._side = None
        self._eager_pending = False
        GraphedInference.reset(transformer)  # a new run, maybe a new LoRA: previews recapture

    @property
    def graphed(self) -> bool:
        return self._graphs is not None

    # ---- eager
    def _forward_loss(self, example, use_mask: bool) -> torch.Tensor:
        for m in self._lora:
            m.cast_input_dtype_enabled = False
        try:
            return self._step_fn(self.transformer, example, self.cfg, self.generator, self.mu, use_mask)
        finally:
            for m in self._lora:
                m.cast_input_dtype_enabled = True

    def _eager_forward_backward(self, use_mask: bool, example=None) -> float:
        example = self.example if example is None else example
        first_compiled = self.eager_steps == 0 and is_accelerated(self.transformer)
        rng_state = self.generator.get_state() if first_compiled else None
        try:
            loss = self._forward_loss(example, use_mask)
            loss.backward()
        except torch.OutOfMemoryError:
            raise
        except Exception:
            if rng_state is None:
                raise
            # The first step compiles the blocks: if that fails, run them uncompiled rather than fail the job
            # (same noise as the failed attempt, so the run is what an uncompiled run would have been).
            log.warning("compiling the transformer blocks failed; training uncompiled", exc_info=True)
            self.optimizer.zero_grad(set_to_none=True)
            restore_eager(self.transformer)
            self.generator.set_state(rng_state)
            loss = self._forward_loss(example, use_mask)
            loss.backward()
        self.eager_steps += 1
        return loss.item()

    # ---- graphs
    def _capture(self) -> None:
        cfg, opt, params = self.cfg, self.optimizer, self.params
        weights = self.example.weights
        mask_buffer = ones = None
        # The latents live in a buffer too, so a step may train on another image of the same size (augmentation).
        latent_buffer = self.example.latents.detach().clone()
        example = dataclasses.replace(self.example, latents=latent_buffer)
        if weights is not None:
            mask_buffer = weights.detach().clone()
            ones = torch.ones_like(mask_buffer)
            example = dataclasses.replace(example, weights=mask_buffer)
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)  # backward allocates the gradients inside the graph's memory pool
        fwd, upd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        fwd.register_generator_state(self.generator)
        with torch.cuda.graph(fwd, capture_error_mode="thread_local"):
            loss = self._forward_loss(example, weights is not None)
            loss.backward()
        with torch.cuda.graph(upd, pool=fwd.pool(), capture_error_mode="thread_local"):
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
        torch.cuda.synchronize()
        self._graphs = (fwd, upd, loss, mask_buffer, ones, latent_buffer)

    def _release_graphs(self) -> None:
        self._graphs = None
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _fits_graph(self, example) -> bool:
        """Can the captured graph train on ``example``? Same caption and positions, latents of the same shape."""
        mine = self.example
        return example is mine or (example.latents.shape == mine.latents.shape
                                   and example.latents.dtype == mine.latents.dtype
                                   and example.caption is mine.caption and example.image_ids is mine.image_ids)

    def forward_backward(self, use_mask: bool, example=None) -> float:
        """Compute the loss and the LoRA gradients for one noised copy of ``example`` (default: the run's
        example; ``use_mask`` is then only honoured if that example has weights); returns the loss value."""
        example = self.example if example is None else example
        use_mask = bool(use_mask and example.weights is not None)
        if not self._fits_graph(example) or (use_mask and example.weights.shape != self.example.weights.shape):
            return self._eager_once(example, use_mask)
        if self._graphs is None and self.graphs_wanted and self.graph_error is None \
                and self.eager_steps >= self.warmup_steps:
            try:
                self._capture()
            except torch.OutOfMemoryError as err:
                self.graph_error = f"OutOfMemoryError: {err}"[:300]
                self._release_graphs()
            except Exception as err:  # anything the capture can't handle: stay eager
                log.warning("capturing the training step as a CUDA graph failed; staying eager", exc_info=True)
                self.graph_error = f"{type(err).__name__}: {err}"[:300]
                self._release_graphs()
        if self._graphs is not None:
            fwd, _, loss, mask_buffer, ones, latent_buffer = self._graphs
            if mask_buffer is None and use_mask:
                return self._eager_once(example, use_mask)
            latent_buffer.copy_(example.latents)
            if mask_buffer is not None:
                mask_buffer.copy_(example.weights if use_mask else ones)
            fwd.replay()
            self._eager_pending = False
            return loss.item()
        if self.graphs_wanted and self.graph_error is None:
            # Warm-up steps before the capture run on a side stream, as CUDA-graph capture requires.
            with self._side_stream():
                return self._eager_forward_backward(use_mask, example)
        return self._eager_forward_backward(use_mask, example)

    def _eager_once(self, example, use_mask: bool) -> float:
        """A step the graph can't express: eager; its gradients are applied eagerly by ``apply``."""
        if self._graphs is not None:
            self.optimizer.zero_grad(set_to_none=False)  # keep the graph's gradient tensors; backward adds into them
        value = self._eager_forward_backward(use_mask, example)
        self._eager_pending = self._graphs is not None
        return value

    def apply(self) -> None:
        """Clip the gradients and take the optimizer step (then clear the gradients)."""
        if self._graphs is not None:
            self._graphs[1].replay()  # works on the graph's gradient tensors, also after an ``_eager_once`` step
            self._eager_pending = False
            return
        if self.graphs_wanted and self.graph_error is None:
            with self._side_stream():
                self._eager_apply()
            return
        self._eager_apply()

    @contextlib.contextmanager
    def _side_stream(self):
        if self._side is None:
            self._side = torch.cuda.Stream()
        current = torch.cuda.current_stream()
        self._side.wait_stream(current)
        try:
            with torch.cuda.stream(self._side):
                yield
        finally:
            current.wait_stream(self._side)

    def _eager_apply(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """Drop the gradients of the last ``forward_backward`` (e.g. the loss was not finite)."""
        if self._graphs is None:
            self.optimizer.zero_grad(set_to_none=True)
        self._eager_pending = False

    def close(self) -> None:
        """Free the graphs' memory (the gradients live in it)."""
        if self._graphs is not None:
            self._release_graphs()

