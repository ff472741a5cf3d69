"""A whole training job under each memory tier's cap, at full FLUX.1-dev (or, ``--family flux2-klein``, FLUX.2
[klein] 4B) size, on one GPU (issues 4 and 13).

For each tier (presets/memory/) a fresh process caps itself to the tier's memory with
``torch.cuda.set_per_process_memory_fraction`` *before anything touches the GPU*, then runs the job's own code
(``trainer.training.job.train_with_parts``): full-size T5-XXL and CLIP-L (klein: Qwen3-4B) encode the prompts on the
GPU and are freed,
the VAE encodes the image, the transformer — in host memory, as ``load_parts`` leaves it — is placed as the tier
says (bf16, or quantized layer by layer to fp8 / NF4), then ``train_lora`` trains with preview rounds and
checkpoint saves. Nothing can be downloaded: every part is built in code with the real configs and random weights
(same FLOPs and bytes). Prints one ``ROW {json}`` per tier; with ``--out`` writes them as a results file.

    python bench/tier_bench.py --tiers full,24gb,16gb,12gb --steps 40 --save-every 20 --out bench/results/X.json
    python bench/tier_bench.py --tiny   # CPU smoke test of the same code path (no cap)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.flux_bench import DEV, FLUX_SCHEDULER, FLUX_VAE, KLEIN_VAE, TINY, TINY_KLEIN_VAE, TINY_VAE  # noqa: E402

GIB = 2 ** 30
# The released text encoders' configs (google/t5-v1_1-xxl as FLUX.1-dev's text_encoder_2, openai CLIP ViT-L/14).
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
# Qwen/Qwen3-4B as FLUX.2 [klein] 4B's text_encoder (hidden 2560 x 36 layers; the pipeline reads layers 9/18/27).
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000, tie_word_embeddings=True)


@torch.no_grad()
def random_fill(module: torch.nn.Module, fill_device: torch.device, seed: int = 0) -> None:
    """Random weights for a module built on the meta device, materialised in host memory: matrices ~N(0, 0.02)
    (drawn on ``fill_device`` in slices of ~64 MB, so filling respects a memory cap), vectors 1 (norm scales) or 0."""
    module.to_empty(device="cpu")
    generator = torch.Generator(device=fill_device).manual_seed(seed)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if tensor.ndim >= 2:
            rows = max(1, (1 << 25) // max(1, tensor[0].numel()))
            for r in range(0, tensor.shape[0], rows):
                part = tensor[r:r + rows]
                part.copy_(torch.randn(part.shape, generator=generator, device=fill_device, dtype=torch.float32)
                           .mul_(0.02).to(tensor.dtype))
        else:
            tensor.fill_(0.0 if name.endswith("bias") else 1.0)


def build_parts(device: torch.device, dtype: torch.dtype, tiny: bool, family_name: str = "flux1"):
    """ModelParts as ``load_parts(..., transformer_on_device=False)`` returns them: encoders and VAE on ``device``,
    the transformer in host memory."""
    if family_name != "flux1":
        return build_klein_parts(device, dtype, tiny)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from trainer.model.loading import ModelParts
    from trainer.model.tiny import byte_level_tokenizer

    t5_config = dict(T5_XXL, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16) if tiny else T5_XXL
    clip_config = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       projection_dim=32) if tiny else CLIP_L
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**(TINY if tiny else DEV))
            t5 = T5EncoderModel(T5Config(**t5_config))
        clip = CLIPTextModel(CLIPTextConfig(**clip_config))  # small: built normally (it has integer buffers)
        vae = AutoencoderKL(**(TINY_VAE if tiny else FLUX_VAE))
    finally:
        torch.set_default_dtype(torch.float32)
    random_fill(transformer, device, seed=1)
    random_fill(t5, device, seed=2)
    for module in (transformer, t5, clip, vae):
        module.requires_grad_(False).eval()
    for module in (t5, clip, vae):
        module.to(device)
    return ModelParts(transformer=transformer, vae=vae, text_encoder=clip, text_encoder_2=t5,
                     tokenizer=byte_level_tokenizer(77), tokenizer_2=byte_level_tokenizer(512),
                     scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), device=device, dtype=dtype,
                     model_path=Path("random-weights"))


def build_klein_parts(device: torch.device, dtype: torch.dtype, tiny: bool):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trainer.families import FLUX2_KLEIN
    from trainer.model.loading import ModelParts
    from trainer.model.tiny import chat_tokenizer

    qwen = dict(QWEN3_4B, vocab_size=1000, hidden_size=16, intermediate_size=37, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8) if tiny else QWEN3_4B
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            transformer = FLUX2_KLEIN.transformer_class()(**(FLUX2_KLEIN.tiny_transformer_config if tiny
                                                               else FLUX2_KLEIN.transformer_config))
            text_encoder = Qwen3ForCausalLM(Qwen3Config(**qwen))
        vae = AutoencoderKLFlux2(**(TINY_KLEIN_VAE if tiny else KLEIN_VAE))
    finally:
        torch.set_default_dtype(torch.float32)
    random_fill(transformer, device, seed=1)
    random_fill(text_encoder, device, seed=2)
    # random_fill leaves the rotary inverse frequencies (a float buffer) at 1: rebuild them as the model computes them
    rotary = text_encoder.model.rotary_emb
    fresh = type(rotary)(rotary.config)  # off the meta device: computes its frequencies
    rotary.inv_freq.copy_(fresh.inv_freq)
    rotary.original_inv_freq.copy_(fresh.original_inv_freq)
    for module in (transformer, text_encoder, vae):
        module.requires_grad_(False).eval()
    for module in (text_encoder, vae):
        module.to(device)
    return ModelParts(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=None,
                     tokenizer=chat_tokenizer(512), tokenizer_2=None,
                     scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), device=device, dtype=dtype,
                     model_path=Path("random-weights"), family=FLUX2_KLEIN)


def run_tier(tier_name: str, steps: int, save_every: int, rank: int, resolution: int, tiny: bool,
             checkpointing: bool | None = None, family_name: str = "flux1", images: int = 1) -> dict:
    from trainer.config import TrainingConfig
    from trainer.events import CheckpointSaved, Failed, Finished, PreviewsRendered, Progress, Started, Status
    from trainer.families import family_named
    from trainer.model.tiers import load_tier, tiers_dir
    from trainer.runs.folder import RunFolder
    from trainer.training.job import train_with_parts

    family = family_named(family_name)
    tier = load_tier(tier_name, tiers_dir(family))
    if checkpointing is not None:  # a variant: the tier's weights with checkpointing forced on/off
        tier = dataclasses.replace(tier, gradient_checkpointing=checkpointing, checkpoint_as_needed=False)
    cuda = torch.cuda.is_available() and not tiny
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    row = dict(impl="project", kind="tier_job", family=family.name, tier=tier.name, weights=tier.weights, rank=rank,
               resolution=resolution, checkpointing=tier.gradient_checkpointing,
               checkpoint_as_needed=tier.checkpoint_as_needed, cap_gib=tier.cap_gib,
               lean_previews=tier.lean_previews)
    if cuda:
        # Outside the Flux blocks, no cuDNN attention (its backward failed on one H100 image); inside them the
        # trainer puts it first where its self-test passes (trainer.training.accel.attention.choose_attention).
        torch.backends.cuda.enable_cudnn_sdp(False)
        total = torch.cuda.get_device_properties(0).total_memory
        if tier.cap_gib is not None:  # first thing: the whole job, loading included, runs under the cap
            torch.cuda.set_per_process_memory_fraction(tier.cap_gib * GIB / total)
        row["gpu"] = torch.cuda.get_device_name()
    from trainer.model.loading import fp8_matmuls_apply

    # after the cap: on a GPU this runs fp8_matmul's self-test, the job's first use of the device memory
    row["matmul"] = "fp8" if fp8_matmuls_apply(tier.matmul, tier.weights, device) else "bf16"

    def peak(reset: bool = True) -> tuple[float, float]:
        if not cuda:
            return 0.0, 0.0
        values = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return round(values[0], 2), round(values[1], 2)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    parts = build_parts(device, dtype, tiny, family_name)
    row["build_s"] = round(time.perf_counter() - t0, 1)
    row["build_peak_gib"] = peak()[0]
    image = Image.new("RGB", (1024, 1024), (40, 110, 190))
    ImageDraw.Draw(image).ellipse((250, 200, 780, 900), fill=(230, 60, 50))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((250, 200, 780, 900), fill=255)
    cfg = TrainingConfig(rank=rank, steps=steps, save_every=save_every, learning_rate=1e-4, resolution=resolution,
                         trigger="ohwx", caption="a photo of [trigger], a red ball", memory_tier=tier.name,
                         sample_prompts=("[trigger] as a watercolor", "[trigger] on a beach"), model="random-weights",
                         # klein: previews as the distilled model renders them (4 steps, guidance 1)
                         preview_steps=4 if tiny or family.name != "flux1" else 20,
                         **({} if family.name == "flux1" else dict(preview_guidance=1.0)))
    if images == 1:
        run = RunFolder.create(Path(tempfile.mkdtemp()), cfg, image, mask)
    else:  # a set (issue 14): the practitioners' 4 shapes (1024x1024, 512x1024, 384x1024, 768x1024), cycled
        from trainer.dataset.imageset import SetImage

        shapes = [(1024, 1024), (512, 1024), (384, 1024), (768, 1024)]
        items = [SetImage(f"image-{i}.png", image.resize(shapes[i % 4]), mask.resize(shapes[i % 4]), "")
                 for i in range(images)]
        run = RunFolder.create_set_at(Path(tempfile.mkdtemp()) / "run", cfg, items)
    row["images"] = images

    phase, phase_start = "encode", time.perf_counter()
    job_start = phase_start
    phases: dict[str, dict] = {}
    step_times, preview_rounds, saves = [], [], []
    last = time.perf_counter()
    try:
        for event in train_with_parts(parts, run, tier, lambda: False):
            sync()
            now = time.perf_counter()
            if isinstance(event, Status) and event.message.startswith(("Storing", "Moving")):
                phases["encode"] = dict(s=round(now - phase_start, 1), peak_gib=peak())
                phase, phase_start = "place", now
            elif isinstance(event, Status) and event.message.startswith("Memory:"):  # an "as-needed" tier's plan
                row.setdefault("checkpoint_plan", []).append(event.message)
            elif isinstance(event, Started):
                phases["place"] = dict(s=round(now - phase_start, 1), peak_gib=peak())
                phase, loop_start = "train", now
            elif isinstance(event, Progress):
                step_times.append(now - last)
            elif isinstance(event, CheckpointSaved):
                saves.append(round(now - last, 2))
            elif isinstance(event, PreviewsRendered):
                preview_rounds.append(dict(step=event.step, s=round(now - last, 2), images=len(event.previews)))
            elif isinstance(event, Failed):
                row["error"] = event.message
                break
            elif isinstance(event, Finished):
                # after the weights are loaded (built, here): encode + place + the training loop with its previews
                row.update(job_s=round(now - job_start, 1), loop_s=round(now - loop_start, 1))
                break
            last = now
    except torch.OutOfMemoryError as err:
        row["error"] = f"OutOfMemoryError in phase {phase}: {str(err).splitlines()[0]}"
    row["phases"] = phases
    from trainer.training.accel.attention import attention_backend
    row["attention"] = attention_backend(parts.transformer)
    row["train_peak_gib"] = peak(reset=False)  # allocated, reserved: training + previews + saves
    steady = step_times[10:] or step_times
    if step_times:
        row.update(steps=len(step_times), first_step_s=round(step_times[0], 2),
                   s_per_step=round(statistics.median(steady), 4),
                   s_per_step_last20=round(statistics.median(step_times[-20:]), 4))  # a set's shapes all captured
    per_image = [r["s"] / r["images"] for r in preview_rounds[1:]] or [r["s"] / r["images"] for r in preview_rounds]
    row.update(preview_rounds=preview_rounds, preview_s_per_image=round(statistics.median(per_image), 3)
               if per_image else None, save_s=saves,
               peak_gib=max([phases.get(p, {}).get("peak_gib", (0, 0))[0] for p in ("encode", "place")]
                            + [row["train_peak_gib"][0]]),
               checkpoint_files=sorted(p.name for p in run.path.glob("*.safetensors")))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", default="full,24gb,16gb,12gb")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny model")
    parser.add_argument("--family", default="flux1", choices=("flux1", "flux2-klein"))
    parser.add_argument("--images", type=int, default=1, help="a set of this many pictures (shapes of different "
                                                                "aspect, same area), one per step")
    parser.add_argument("--checkpointing", choices=("on", "off"), help="override the tiers' gradient checkpointing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this tier in this process
    parser.add_argument("--out", type=Path)
    parser.add_argument("--commit", help="the commit measured, when the copy's .git is not the working tree's")
    args = parser.parse_args(argv)
    common = dict(steps=args.steps, save_every=args.save_every, rank=args.rank, resolution=args.resolution,
                  images=args.images,
                  tiny=args.tiny, family_name=args.family, checkpointing=None if args.checkpointing is None else args.checkpointing == "on")
    if args.one:
        print("ROW " + json.dumps(run_tier(args.one, **common)), flush=True)
        return 0
    rows = []
    for name in args.tiers.split(","):
        # One process per tier: a cap can only be set before the allocator has grown, and nothing of one tier's
        # job (compiled code, cached blocks) may help the next one.
        command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--save-every",
                   str(args.save_every), "--rank", str(args.rank), "--resolution", str(args.resolution),
                   "--family", args.family, "--images", str(args.images)]
        if args.tiny:
            command.append("--tiny")
        if args.checkpointing:
            command += ["--checkpointing", args.checkpointing]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        row = json.loads(found[-1]) if found else dict(tier=name, error=f"exit {proc.returncode}: "
                                                                      f"{(proc.stderr or '').strip()[-1500:]}")
        row["process_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every tier: a call cut at its time limit still keeps the tiers that finished
            write_results(args, rows)
    return 0


def write_results(args, rows: list[dict]) -> None:
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, cwd=ROOT).stdout.strip() or None
    gpu = next((r.get("gpu") for r in rows if r.get("gpu")), "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(gpu=gpu, commit=commit, date=time.strftime("%Y-%m-%d"),
                                        torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
