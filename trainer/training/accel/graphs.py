"""Previews: the no-grad forward replayed from CUDA graphs, in the training step's numerics.

``GraphedInference`` stands in for the transformer's no-grad, eval-mode forward (the preview sampler's 20 calls per
image): captured once per input shape as a CUDA graph and replayed. The LoRA is updated in place by the optimizer,
so a replay always sees the current weights. ``can_use_cuda_graphs`` says whether CUDA graphs are used at all
(also for the training step, ``trainer.training.step.TrainStep``); ``preview_autocast`` runs the preview forward
under bf16 autocast without peft's fp32 round trip of the LoRA inputs.
"""
from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from trainer.runtime import Runtime, current

log = logging.getLogger(__name__)


def can_use_cuda_graphs(device, runtime: Runtime | None = None) -> bool:
    """True on a CUDA device whose PyTorch can replay a graph with a registered generator, unless the process's
    ``Runtime`` turned CUDA graphs off (``ONE_IMAGE_LORA_CUDA_GRAPHS=0``)."""
    return (torch.device(device).type == "cuda" and torch.cuda.is_available()
            and (runtime or current()).cuda_graphs
            and hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda.CUDAGraph, "register_generator_state"))


def lora_layers(transformer) -> list[torch.nn.Module]:
    """peft's LoRA layers of ``transformer`` (those whose fp32 input cast can be switched off)."""
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
    layers = lora_layers(transformer)
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        with torch.autocast("cuda", dtype=dtype):
            yield
    finally:
        for m in layers:
            m.cast_input_dtype_enabled = True


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
        self._watch = [(weakref.ref(p), p.data_ptr()) for m in lora_layers(self.transformer) for p in m.parameters()
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
