"""The training loop: ``train_lora(...)`` yields typed events; the caller decides what to show.

A set of 1 to 10 cached images, batch 1 by default. Each step trains the images ``trainer.training.schedule`` gives it
(every epoch a seeded shuffle of the set; with one image always that image), each with fresh noise and a fresh noise
level from one seeded generator, so a run is reproducible on the CPU, and a resumed one continues the same order. A
batch of B images is B one-image passes whose gradients are averaged before one optimizer step (images of different
shapes can't share a tensor). Stop is checked before every step and at every denoising step of a preview round.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from trainer.runs import diskspace, lifecycle, state
from trainer.config import TrainingConfig
from trainer.dataset.augment import augmented_step, pick as pick_augmented
from trainer.training import memory_plan
from trainer.training.encode import EncodedExample
from trainer.training.distributed import DistributedContext
from trainer.training.schedule import epochs_at_step, learning_rate_note, sample_indices, scaled_learning_rate
from trainer.events import CheckpointSaved, Event, Failed, Finished, Preview, PreviewsRendered, Progress, Status
from trainer.model.lora import add_lora, save_lora
from trainer.runs.folder import RunFolder
from trainer.training.previews import PreviewRenderer
from trainer.training.accel.attention import attention_backend
from trainer.training.accel.compile import accelerate_transformer
from trainer.training.step import TrainStep, adamw_options


@dataclass
class StepTimer:
    """Steps per second over a sliding window, excluding time spent saving and rendering previews.

    From the median step of the window, not the mean: on a GPU the first step compiles the blocks (~30 s against
    ~0.12 s for the others) and a later one captures the CUDA graphs, and a mean would carry those one-off costs
    into the speed and the ETA for the next 20 steps (an ETA of minutes for a one-minute run)."""
    window: int = 20

    def __post_init__(self) -> None:
        self._times: list[float] = []

    def add(self, seconds: float) -> float:
        self._times = (self._times + [seconds])[-self.window:]
        return 1.0 / max(statistics.median(self._times), 1e-9)


def train_lora(parts, example: EncodedExample | Sequence[EncodedExample], cfg: TrainingConfig, run: RunFolder,
               renderer: PreviewRenderer, should_stop: Callable[[], bool],
               resume: "lifecycle.ResumePoint | None" = None, dist: DistributedContext | None = None) -> Iterator[Event]:
    """Train, yielding events. ``example``: the one image's cached example, or the set's, in the set's order.
    ``resume`` (from ``trainer.runs.lifecycle.prepare_resume``) continues a saved run exactly.

    With ``dist`` (several GPUs, data parallel) every process runs this loop in lockstep; only the main process
    saves checkpoints and renders previews, and stop / non-finite decisions are agreed by all processes.
    Training states are written in the background (``StateWriter``); the last one is on disk before the run's
    end (Finished / Failed) is announced. The loop writes no run.json: what it saved travels in its events
    (``CheckpointSaved`` with the losses since the previous save, ``PreviewsRendered``), which ``run_training``
    records.
    """
    writer = state.StateWriter()
    try:
        for event in _train_lora(parts, example, cfg, run, renderer, should_stop, resume, dist, writer):
            if isinstance(event, (Finished, Failed)):
                writer.wait()  # a write error (disk full) surfaces here, as the job's failure
            yield event
    finally:
        writer.close()


def _train_lora(parts, example: EncodedExample | Sequence[EncodedExample], cfg: TrainingConfig, run: RunFolder,
                renderer: PreviewRenderer, should_stop: Callable[[], bool], resume, dist: DistributedContext | None,
                writer: "state.StateWriter") -> Iterator[Event]:
    dist = dist or DistributedContext()
    examples = (example,) if isinstance(example, EncodedExample) else tuple(example)
    example = examples[0]
    images, batch = len(examples), cfg.batch_size
    captions = state.run_captions(run) if images > 1 else ()  # in the training states' fingerprint
    transformer = parts.transformer
    params = add_lora(transformer, cfg.rank, cfg.alpha, cfg.seed)
    dist.broadcast_parameters(params)
    transformer.train()
    # A tier's "as-needed" checkpointing: measure what each block keeps for backward now, before compiling, and plan
    # once the job's fixed memory is in place (below, just before the first step).
    checkpoint_cap = memory_plan.checkpoint_cap_gib(parts, cfg)
    block_bytes = memory_plan.measure(parts, transformer, examples, cfg) if checkpoint_cap is not None else None
    if cfg.gradient_checkpointing or getattr(parts, "gradient_checkpointing", False):  # asked for, or the memory tier's
        transformer.enable_gradient_checkpointing()
    # On CUDA: compile each block (quietly skipped on the CPU or without Triton) and use cuDNN attention where it
    # passes its self-test at this job's sequence length: bench/RESULTS.md has the gains.
    # A small-card tier's lean previews go without the preview CUDA graph (its memory pool would stay reserved).
    lean_previews = getattr(parts, "lean_previews", False)
    # Every sequence length the job trains at (a set's pictures have several shapes). A job of several lengths keeps
    # PyTorch's default attention: on an H200 a set of 4 shapes crashed with cuDNN attention after a self-test at the
    # longest length only (CUBLAS_STATUS_EXECUTION_FAILED in the backward, 2026-12-03), and again, in its eager
    # warm-up steps, after a self-test at every length plus a mixed-order pass (illegal memory access, 2026-12-04;
    # bench/RESULTS.md). A self-test that passes is no guarantee for several lengths in one process.
    lengths = tuple(sorted({e.image_ids.shape[-2] + e.caption.text_ids.shape[-2] for e in examples}))
    tokens = lengths if len(lengths) == 1 else None
    if accelerate_transformer(transformer, parts.device, inference_graphs=False if lean_previews else None,
                              attention_tokens=tokens):
        attention = "cuDNN" if attention_backend(transformer) == "cudnn" else "PyTorch's default"
        yield Status(f"Compiling the model for this GPU ({attention} attention): the first training step and the "
                     "first previews take up to a minute or two each; the compiled code is cached on disk for later "
                     "jobs")
    # On CUDA the LoRA gradients are all-reduced in bf16: half the bytes (1.80x vs 1.71x on 2 H200s, bench/RESULTS.md).
    model = dist.data_parallel(transformer, compress_bf16=parts.device.type == "cuda")
    learning_rate = scaled_learning_rate(cfg.learning_rate, dist.world_size, batch)  # the one rule (schedule.py)
    note = learning_rate_note(cfg.learning_rate, batch, dist.world_size,
                              "GPUs" if parts.device.type == "cuda" else "processes")
    if note:
        yield Status(note[0].upper() + note[1:])
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=cfg.weight_decay,
                                  **adamw_options(parts.device))
    generator = torch.Generator(device=parts.device).manual_seed(dist.noise_seed(cfg.seed))
    # separate stream: unmasked_probability can't shift the noise
    mask_generator = torch.Generator().manual_seed(dist.noise_seed(cfg.seed) + 1)
    # each image's own resolution shift: the set's aspect buckets have about, not exactly, the same token count
    mus = [parts.family.training_shift(parts.scheduler, parts.family.pack(e.latents).shape[1]) for e in examples]
    mu = mus[0]
    checkpoint_steps = set(cfg.checkpoint_steps)
    save_dtype = parts.dtype
    timer = StepTimer()
    losses_since_save: list[tuple[int, float]] = []  # kept with the next checkpoint in run.json (resume shows them)
    save_size = diskspace.save_bytes(sum(p.numel() for p in params), torch.finfo(save_dtype).bits // 8,
                                     diskspace.preview_bytes(cfg.resolution, len(cfg.preview_prompts)))
    start = 0
    if resume is not None and resume.state is not None:
        start = resume.step
        state.apply_weights(resume.state, transformer, optimizer)
        if not lifecycle.has_previews(run, start):  # killed while rendering them: render them now
            yield Status(f"Rendering previews for step {start}")
            event = _render_previews(start, cfg, run, renderer, should_stop)
            if event is None:
                yield Finished(run_dir=run.path, last_step=start, stopped=True)
                return
            yield event
        # After any preview rendering, so the streams continue exactly where the saved run left them.
        for warning in state.apply_rng(resume.state, generator, mask_generator, cfg.seed):
            yield Status(warning)
        yield Status(f"Resumed from the checkpoint at step {start}")

    # One step = forward + backward, then clip + AdamW; after a few eager steps on CUDA it is replayed as CUDA
    # graphs, one forward graph per picture shape of a set (not with several GPUs, whose all-reduce runs inside
    # backward). A batch trains eager: it adds several passes' gradients into one step. On the CPU it is the plain
    # eager step.
    stepper = TrainStep(model, example, cfg, generator, mu, params, optimizer,
                        graphs=False if dist.enabled or batch > 1 else None)

    if cfg.preview_at_start and start == 0 and dist.is_main:
        yield Status("Rendering base-model previews (step 0)")
        event = _render_previews(0, cfg, run, renderer, should_stop)
        if event is not None:
            yield event
        elif not dist.enabled:  # with several processes the stop is agreed at the first step's check
            yield Finished(run_dir=run.path, last_step=0, stopped=True)
            return

    plan = None
    if block_bytes is not None:
        plan = memory_plan.choose(parts, transformer, block_bytes, params, checkpoint_cap, cfg.resolution)
        yield Status(f"Memory: {plan.describe()} (under {checkpoint_cap:.1f} GiB)")

    step = start
    for step in range(start + 1, cfg.steps + 1):
        if dist.any(should_stop()):
            yield Finished(run_dir=run.path, last_step=step - 1, stopped=True)
            return
        started = time.perf_counter()
        picked = sample_indices(images, cfg.seed, step, batch, dist.world_size, dist.rank)
        rng = (generator.get_state(), mask_generator.get_state())
        try:
            losses = [_forward_backward(stepper, examples[i], cfg, mask_generator, 1.0 / len(picked), mus[i])
                      for i in picked]
        except torch.OutOfMemoryError:
            if plan is None or plan.recomputed == len(plan.checkpointed) or stepper.graphed or dist.enabled:
                raise  # (several processes can't retry one step alone)
            # The plan kept more than this card holds after all: recompute every block and take the step again,
            # with the same noise (the step's memory is fixed once it is replayed from a graph, so only early steps).
            stepper.discard()
            plan = None
            transformer.enable_gradient_checkpointing()
            torch.cuda.empty_cache()
            generator.set_state(rng[0])
            mask_generator.set_state(rng[1])
            yield Status("Memory: out of memory keeping activations; recomputing every block from now on")
            losses = [_forward_backward(stepper, examples[i], cfg, mask_generator, 1.0 / len(picked), mus[i])
                      for i in picked]
        loss_value = dist.average(losses[0] if len(losses) == 1 else statistics.fmean(losses))
        if not math.isfinite(loss_value):
            # Stop before the optimizer touches the weights: nothing non-finite is ever saved.
            stepper.discard()
            stepper.close()
            yield Failed(f"The loss became {loss_value} at step {step}, so training stopped before saving it. "
                         "Lower the learning rate; the checkpoints saved so far are intact.", "not_finite", step - 1)
            return
        stepper.apply()  # with several GPUs, DDP averaged the LoRA gradients in buckets during backward
        if parts.device.type == "cuda":
            torch.cuda.synchronize()
        rate = timer.add(time.perf_counter() - started)
        epoch = epochs_at_step(step, images, batch, dist.world_size)
        yield Progress(step=step, total_steps=cfg.steps, loss=loss_value, steps_per_second=rate,
                       eta_seconds=(cfg.steps - step) / rate, epoch=epoch)
        losses_since_save.append((step, loss_value))

        if step in checkpoint_steps:
            if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
                yield Failed(f"The LoRA weights became non-finite at step {step}, so they were not saved. Lower the "
                             "learning rate; the checkpoints saved so far are intact.", "not_finite", step - 1)
                return
            if dist.enabled:
                same, checksum = dist.identical_everywhere(params)
                if not same:
                    raise RuntimeError(f"the LoRA differs between GPUs at step {step}; data-parallel sync failed")
                yield Status(f"LoRA identical in all {dist.world_size} processes at step {step} (checksum {checksum:.6f})")
            if not dist.is_main:  # the main process saves and renders; the others wait for it at the next step
                continue
            diskspace.check_before_save(run.path, save_size, step)  # DiskFullError: stop before writing anything
            path = run.checkpoint_path(step)
            metadata = _checkpoint_metadata(cfg, run, step)
            if images > 1 or batch > 1 or dist.enabled:  # a one-image file says what it always said
                metadata.update(images=str(images), batch_size=str(batch), gpus=str(dist.world_size),
                                epoch=f"{epoch:.4g}", trained_learning_rate=f"{learning_rate:g}")
            size = save_lora(transformer, path, dtype=save_dtype, extra_metadata=metadata)
            writer.save(run.path, step, transformer, optimizer, generator, mask_generator, cfg, captions)
            saved = CheckpointSaved(step=step, path=path, size_bytes=size, losses=tuple(losses_since_save), epoch=epoch)
            losses_since_save = []
            yield saved
            yield Status(f"Rendering previews for step {step}")
            event = _render_previews(step, cfg, run, renderer, should_stop)
            if event is not None:
                yield event
            elif not dist.enabled:  # with several processes the stop is agreed at the next step's check
                yield Finished(run_dir=run.path, last_step=step, stopped=True)
                return
    stepper.close()
    yield Finished(run_dir=run.path, last_step=step, stopped=False)


def _forward_backward(stepper: TrainStep, example: EncodedExample, cfg: TrainingConfig,
                      mask_generator: torch.Generator, scale: float, mu: float) -> float:
    """One image's pass of a step: whether it trains masked, or on another background (draws from the mask
    stream in this order, as one-image runs always did), then its gradients (times ``scale``) are added."""
    use_mask = example.weights is not None and (
        cfg.unmasked_probability == 0.0 or torch.rand((), generator=mask_generator).item() >= cfg.unmasked_probability)
    step_example = example
    if augmented_step(example, cfg, mask_generator):  # the subject on another background, whole image trained
        step_example, use_mask = pick_augmented(example, mask_generator), False
    return stepper.forward_backward(use_mask, step_example, scale, mu)


def _render_previews(step: int, cfg: TrainingConfig, run: RunFolder, renderer: PreviewRenderer,
                     should_stop: Callable[[], bool]) -> PreviewsRendered | None:
    width, height = run.train_size
    images = renderer.render_round(list(cfg.preview_prompts), cfg.preview_seed, width, height, cfg.preview_steps,
                                   cfg.preview_guidance, should_stop)
    if images is None:
        return None
    previews = []
    for index, (prompt, image) in enumerate(zip(cfg.preview_prompts, images)):
        path = run.preview_path(step, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        previews.append(Preview(path=path, prompt=prompt, seed=cfg.preview_seed))
    return PreviewsRendered(step=step, previews=tuple(previews), rendered_with=renderer.rendered_with)


def _checkpoint_metadata(cfg: TrainingConfig, run: RunFolder, step: int) -> dict[str, str]:
    """What a checkpoint says about itself (safetensors metadata is strings only). Never a token."""
    return {"base_model": run.model, "step": str(step), "rank": str(cfg.rank), "alpha": str(cfg.alpha),
            "resolution": str(cfg.resolution), "trigger_word": cfg.trigger, "caption": cfg.training_caption,
            "learning_rate": str(cfg.learning_rate), "software": "one-image-lora"}
