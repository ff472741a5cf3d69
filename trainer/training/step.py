"""One training step: forward + masked loss + backward, then clip + AdamW; eager, or replayed from CUDA graphs.

``training_step`` is the maths (one noised copy of the image, its flow-matching loss). ``TrainStep`` is what
``train_lora`` runs each step. On a CUDA GPU, after a few eager warm-up steps, it captures the step as two CUDA
graphs and replays them: the cached example never changes and the noise comes from the loop's own (registered)
generator, so a replay *is* the step, with no Python or kernel-launch overhead. The loss is still checked before
the optimizer graph runs, so nothing non-finite is ever applied. Off the GPU, with ``ONE_IMAGE_LORA_CUDA_GRAPHS=0``,
or if capturing fails, it runs the plain eager step. ``adamw_options`` makes the optimizer it needs.

Measured numbers and what each change bought: ``bench/RESULTS.md``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable

import torch

from trainer.config import TrainingConfig
from trainer.families import family_of_transformer
from trainer.runtime import Runtime
from trainer.training import flow
from trainer.training.accel.compile import is_accelerated, restore_eager
from trainer.training.accel.graphs import GraphedInference, can_use_cuda_graphs, lora_layers
from trainer.training.encode import EncodedExample

log = logging.getLogger(__name__)


def training_step(transformer, example: EncodedExample, cfg: TrainingConfig, generator: torch.Generator,
                  mu: float, use_mask: bool) -> torch.Tensor:
    """Forward + loss for one noised copy of the image. Returns the loss (graph attached)."""
    latents = example.latents
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32).to(latents.dtype)
    sigmas = flow.sample_sigmas(1, mu, generator, device, cfg.logit_mean, cfg.logit_std)
    noisy = flow.noisy_latents(latents, noise, sigmas)
    h, w = example.latent_size
    family = family_of_transformer(transformer)  # what the forward takes: packing, pooled text, guidance
    inputs = family.transformer_inputs(transformer, family.pack(noisy), sigmas, example.caption, example.image_ids,
                                       cfg.guidance_scale)
    with torch.autocast(device.type, dtype=latents.dtype, enabled=device.type == "cuda"):
        out = transformer(**inputs, return_dict=False)[0]
    prediction = family.unpack(out, h, w)
    weights = example.weights if use_mask else None
    return flow.masked_mse(prediction, flow.velocity_target(latents, noise), weights, cfg.normalize_mask)


def _backward(loss: torch.Tensor, scale: float) -> None:
    # ``loss * 1.0`` is exact, but a batch-1 step must stay the very same graph as before batches existed
    (loss if scale == 1.0 else loss * scale).backward()


def adamw_options(device, runtime: Runtime | None = None) -> dict:
    """Keyword arguments for ``torch.optim.AdamW`` that suit ``TrainStep`` on ``device``: fused on CUDA, and
    capturable (its step counter on the GPU) where the step will be replayed from a CUDA graph."""
    cuda = torch.device(device).type == "cuda"
    return {"fused": cuda, **({"capturable": True} if can_use_cuda_graphs(device, runtime) else {})}


@dataclasses.dataclass
class _StepGraph:
    """One captured forward + backward: for one picture's shape, caption, positions and resolution shift."""

    example: EncodedExample  # the picture it was captured for
    mu: float
    graph: "torch.cuda.CUDAGraph"
    loss: torch.Tensor
    latent_buffer: torch.Tensor
    mask_buffer: torch.Tensor | None  # None: captured without loss weights
    ones: torch.Tensor | None

    def fits(self, example: EncodedExample, mu: float) -> bool:
        """Can this graph train on ``example``? Same caption and positions, latents of the same shape, same shift
        (augmented copies of a picture share its caption and positions, and only change the latents' values)."""
        return _fits(self.example, self.mu, example, mu)


class TrainStep:
    """``forward_backward(use_mask) -> loss``, then ``apply()`` (clip + AdamW) or ``discard()``.

    Same arithmetic as the plain step: ``training_step`` computes the loss, gradients are clipped
    to ``cfg.max_grad_norm``, then ``optimizer.step()``. Two speed-ups, both only on CUDA:
    - under bf16 autocast, peft's cast of each LoRA input to float32 is skipped (autocast casts it straight back
      to bf16 for the matmul, so the result is bit-identical; the round trip only costs memory traffic);
    - after ``warmup_steps`` eager steps of a picture the step is captured as CUDA graphs and replayed (needs an
      optimizer made with ``capturable=True``: see ``adamw_options``). A set of pictures gets one forward+backward
      graph per picture shape (each picture has its own size, caption and shift), all in one memory pool and all
      writing the same gradient tensors, which the one clip+AdamW graph reads. ``use_mask`` stays a per-step choice:
      a graph reads the loss weights from a buffer that holds the mask or ones (all-ones weights give the plain mean).
    Any failure while capturing falls back to eager steps for the rest of the run; a compile failure at the
    first step falls back to the uncompiled blocks (``restore_eager``). A batch (``scale`` below 1) runs eager.
    """

    def __init__(self, transformer, example, cfg, generator: torch.Generator, mu: float, params, optimizer,
                 *, graphs: bool | None = None, warmup_steps: int = 3, skip_lora_input_cast: bool = True,
                 step_fn: Callable | None = None, runtime: Runtime | None = None):
        self.transformer, self.example, self.cfg = transformer, example, cfg
        self.generator, self.mu, self.params, self.optimizer = generator, mu, list(params), optimizer
        self._step_fn = step_fn  # None: this module's ``training_step``, looked up at each call
        self.device = example.latents.device
        self.cuda = self.device.type == "cuda"
        capturable = any(g.get("capturable", False) for g in optimizer.param_groups)
        if graphs is None:
            graphs = can_use_cuda_graphs(self.device, runtime)
        self.graphs_wanted = bool(graphs and self.cuda and capturable and getattr(generator, "device", None) is not None
                                  and generator.device.type == "cuda")
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.graph_error: str | None = None
        self._step_graphs: list[_StepGraph] = []
        self._update = None  # the clip + AdamW graph, captured with the first forward graph
        self._warm: list[tuple[EncodedExample, float, int]] = []  # eager warm-up steps per picture before its capture
        self._lora = lora_layers(transformer) if (self.cuda and skip_lora_input_cast) else []
        self._side = None
        self._eager_pending = False
        GraphedInference.reset(transformer)  # a new run, maybe a new LoRA: previews recapture

    @property
    def graphed(self) -> bool:
        return self._update is not None

    @property
    def graph_count(self) -> int:
        """How many forward+backward graphs are captured (one per picture shape of a set)."""
        return len(self._step_graphs)

    # ---- eager
    def _forward_loss(self, example, use_mask: bool, mu: float | None = None) -> torch.Tensor:
        for m in self._lora:
            m.cast_input_dtype_enabled = False
        try:
            step_fn = self._step_fn or training_step
            return step_fn(self.transformer, example, self.cfg, self.generator, self.mu if mu is None else mu, use_mask)
        finally:
            for m in self._lora:
                m.cast_input_dtype_enabled = True

    def _eager_forward_backward(self, use_mask: bool, example=None, scale: float = 1.0, mu: float | None = None) -> float:
        example = self.example if example is None else example
        first_compiled = self.eager_steps == 0 and is_accelerated(self.transformer)
        rng_state = self.generator.get_state() if first_compiled else None
        try:
            loss = self._forward_loss(example, use_mask, mu)
            _backward(loss, scale)
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
            loss = self._forward_loss(example, use_mask, mu)
            _backward(loss, scale)
        self.eager_steps += 1
        return loss.item()

    # ---- graphs
    def _capture(self, example: EncodedExample, mu: float) -> _StepGraph:
        cfg, opt, params = self.cfg, self.optimizer, self.params
        weights = example.weights
        mask_buffer = ones = None
        # The latents live in a buffer too, so a step may train on another image of the same size (augmentation).
        latent_buffer = example.latents.detach().clone()
        static = dataclasses.replace(example, latents=latent_buffer)
        if weights is not None:
            mask_buffer = weights.detach().clone()
            ones = torch.ones_like(mask_buffer)
            static = dataclasses.replace(static, weights=mask_buffer)
        torch.cuda.synchronize()
        first = not self._step_graphs
        if first:
            opt.zero_grad(set_to_none=True)  # backward allocates the gradients inside the graph's memory pool
            grads = []
        else:
            # Later graphs (a set's other shapes) write the gradient tensors the first one allocated, which the
            # update graph reads: zero them, then backward adds into them in place.
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                raise RuntimeError("a LoRA parameter has no gradient tensor to share between graphs")
        fwd = torch.cuda.CUDAGraph()
        fwd.register_generator_state(self.generator)
        pool = None if first else self._step_graphs[0].graph.pool()  # the graphs never run at the same time
        with torch.cuda.graph(fwd, pool=pool, capture_error_mode="thread_local"):
            if grads:
                torch._foreach_zero_(grads)
            loss = self._forward_loss(static, weights is not None, mu)
            loss.backward()
        if first:
            upd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(upd, pool=fwd.pool(), capture_error_mode="thread_local"):
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
            self._update = upd
        torch.cuda.synchronize()
        entry = _StepGraph(example, mu, fwd, loss, latent_buffer, mask_buffer, ones)
        self._step_graphs.append(entry)
        return entry

    def _release_graphs(self) -> None:
        self._step_graphs, self._update = [], None
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _graph_for(self, example: EncodedExample, mu: float) -> _StepGraph | None:
        """The captured graph that trains ``example``, capturing it once the picture has had its warm-up steps."""
        entry = next((g for g in self._step_graphs if g.fits(example, mu)), None)
        if entry is not None or not self.graphs_wanted or self.graph_error is not None:
            return entry
        warm = next((i for i, (e, m, _) in enumerate(self._warm) if _fits(e, m, example, mu)), None)
        if warm is None or self._warm[warm][2] < self.warmup_steps:
            return None
        try:
            return self._capture(self._warm[warm][0], mu)
        except torch.OutOfMemoryError as err:
            self.graph_error = f"OutOfMemoryError: {err}"[:300]
        except Exception as err:  # anything the capture can't handle: stay eager
            log.warning("capturing the training step as a CUDA graph failed; staying eager", exc_info=True)
            self.graph_error = f"{type(err).__name__}: {err}"[:300]
        self._release_graphs()
        return None

    def _count_warm_up(self, example: EncodedExample, mu: float) -> None:
        for i, (e, m, n) in enumerate(self._warm):
            if _fits(e, m, example, mu):
                # capture with loss weights where the picture has them (an augmented copy may have none)
                self._warm[i] = (example if e.weights is None else e, m, n + 1)
                return
        self._warm.append((example, mu, 1))

    def forward_backward(self, use_mask: bool, example=None, scale: float = 1.0, mu: float | None = None) -> float:
        """Compute the loss and the LoRA gradients for one noised copy of ``example`` (default: the run's
        example; ``use_mask`` is then only honoured if that example has weights); returns the loss value.

        ``scale``: the gradients are those of ``scale x loss``, added to the ones already there (a batch of B images
        is B calls with ``scale=1/B`` before one ``apply``: the batch's mean loss). ``mu``: the example's own
        resolution shift (an image of another size), default the one the step was made with."""
        example = self.example if example is None else example
        mu = self.mu if mu is None else mu
        use_mask = bool(use_mask and example.weights is not None)
        if scale != 1.0:  # a graph replays one whole step, not a share of a batch
            return self._eager_once(example, use_mask, scale, mu)
        entry = self._graph_for(example, mu)
        if entry is not None and use_mask and (entry.mask_buffer is None
                                               or example.weights.shape != entry.mask_buffer.shape):
            entry = None  # this step's loss weights don't fit the graph's buffer
        if entry is not None:
            entry.latent_buffer.copy_(example.latents)
            if entry.mask_buffer is not None:
                entry.mask_buffer.copy_(example.weights if use_mask else entry.ones)
            entry.graph.replay()
            self._eager_pending = False
            return entry.loss.item()
        if self.graphs_wanted and self.graph_error is None:
            self._count_warm_up(example, mu)
            if self._update is not None:
                return self._eager_once(example, use_mask, scale, mu)
            # Warm-up steps before the first capture run on a side stream, as CUDA-graph capture requires.
            with self._side_stream():
                return self._eager_forward_backward(use_mask, example, scale, mu)
        return self._eager_once(example, use_mask, scale, mu)

    def _eager_once(self, example, use_mask: bool, scale: float = 1.0, mu: float | None = None) -> float:
        """A step the graph can't express: eager; its gradients are applied eagerly by ``apply``."""
        if self._update is not None:
            self.optimizer.zero_grad(set_to_none=False)  # keep the graph's gradient tensors; backward adds into them
        value = self._eager_forward_backward(use_mask, example, scale, mu)
        self._eager_pending = self._update is not None
        return value

    def apply(self) -> None:
        """Clip the gradients and take the optimizer step (then clear the gradients)."""
        if self._update is not None:
            self._update.replay()  # works on the graph's gradient tensors, also after an ``_eager_once`` step
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
        if self._update is None:
            self.optimizer.zero_grad(set_to_none=True)
        self._eager_pending = False

    def close(self) -> None:
        """Free the graphs' memory (the gradients live in it)."""
        if self._update is not None:
            self._release_graphs()


def _fits(example: EncodedExample, mu: float, other: EncodedExample, other_mu: float) -> bool:
    """Would one graph train both pictures (see ``_StepGraph.fits``)?"""
    return mu == other_mu and (other is example or (other.latents.shape == example.latents.shape
                                                    and other.latents.dtype == example.latents.dtype
                                                    and other.caption is example.caption
                                                    and other.image_ids is example.image_ids))
