"""The real training loop at full FLUX.1-dev size on one GPU: train_lora with previews and saves, timed.

Nothing can be downloaded, so the parts are built in code with random weights: the real FLUX.1-dev
transformer and VAE configs, and small text encoders with the real output widths (T5 4096, CLIP pooled 768)
— the text encoders run once before training, so their size does not change what is measured here. Then the
same functions as ``trainer.training.job.run_training`` run in the same order: prepare → encode → free encoders →
train_lora (compile + CUDA graphs on CUDA) with preview rounds and checkpoint saves.

    python bench/full_loop_smoke.py --steps 60 --save-every 20 --out RESULT.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flux_bench import DEV, FLUX_SCHEDULER, FLUX_VAE  # noqa: E402
from trainer.config import TrainingConfig  # noqa: E402
from trainer.training.encode import encode_example, encode_prompts, free_encoders
from trainer.dataset.prepare import prepare_image  # noqa: E402
from trainer.events import CheckpointSaved, Failed, Finished, PreviewsRendered, Progress  # noqa: E402
from trainer.training.loop import train_lora  # noqa: E402
from trainer.model.loading import ModelParts  # noqa: E402
from trainer.runs.folder import RunFolder  # noqa: E402
from trainer.training.previews import PreviewRenderer  # noqa: E402
from trainer.model.tiny import byte_level_tokenizer  # noqa: E402


def full_size_parts() -> ModelParts:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**DEV)
        vae = AutoencoderKL(**FLUX_VAE)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, projection_dim=768, num_hidden_layers=1,
                                            num_attention_heads=12, intermediate_size=256, vocab_size=1000,
                                            max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=0))
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=256, num_layers=1, num_heads=32, d_kv=128, vocab_size=1000,
                                     pad_token_id=0, eos_token_id=2))
    torch.set_default_dtype(torch.float32)
    for m in (transformer, vae, clip, t5):
        m.requires_grad_(False).eval()
    return ModelParts(transformer=transformer, vae=vae, text_encoder=clip, text_encoder_2=t5,
                     tokenizer=byte_level_tokenizer(77), tokenizer_2=byte_level_tokenizer(512),
                     scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), device=device, dtype=dtype,
                     model_path=Path("random-weights"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention backward crashed at Flux size on the 2026-11-22 H100 image (bench/RESULTS.md)

    t0 = time.perf_counter()
    parts = full_size_parts()
    build_s = time.perf_counter() - t0
    image = Image.new("RGB", (1024, 1024), (40, 110, 190))
    ImageDraw.Draw(image).ellipse((250, 200, 780, 900), fill=(230, 60, 50))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((250, 200, 780, 900), fill=255)
    cfg = TrainingConfig(rank=args.rank, steps=args.steps, save_every=args.save_every, learning_rate=1e-4,
                         trigger="ohwx", caption="a photo of [trigger], a red ball",
                         sample_prompts=("[trigger] as a watercolor", "[trigger] on a beach"), model="random-weights")
    run = RunFolder.create(Path(tempfile.mkdtemp()), cfg, image, mask)
    run.model_path = "built in code (random weights)"
    torch.cuda.reset_peak_memory_stats()

    t = time.perf_counter()
    train_image = prepare_image(image, mask, cfg.resolution)
    run.train_size = train_image.size
    prompts = encode_prompts(parts, [cfg.training_caption, *cfg.preview_prompts], cfg.max_text_tokens)
    example = encode_example(parts, train_image, cfg.training_caption, prompts, cfg.masked, cfg.background_weight)
    free_encoders(parts)
    renderer = PreviewRenderer(parts, prompts)
    encode_s = time.perf_counter() - t

    loop_start = time.perf_counter()
    step_times, preview_rounds, saves, last = [], [], 0, time.perf_counter()
    pending_round = None
    for event in train_lora(parts, example, cfg, run, renderer, lambda: False):
        now = time.perf_counter()
        if isinstance(event, Progress):
            step_times.append(now - last)
        elif isinstance(event, CheckpointSaved):
            saves += 1
            pending_round = now
        elif isinstance(event, PreviewsRendered):
            preview_rounds.append((event.step, round(now - (pending_round or last), 2), len(event.previews)))
        elif isinstance(event, Failed):
            raise SystemExit(f"FAILED: {event.message}")
        elif isinstance(event, Finished):
            break
        last = now
    loop_s = time.perf_counter() - loop_start
    steady = step_times[10:] or step_times
    row = dict(gpu=torch.cuda.get_device_name(), rank=cfg.rank, resolution=cfg.resolution,
               train_size=list(run.train_size), steps=len(step_times), build_s=round(build_s, 1),
               encode_s=round(encode_s, 1), first_step_s=round(step_times[0], 2),
               median_step_s=round(statistics.median(steady), 4), preview_rounds=preview_rounds,
               checkpoints=saves, loop_s=round(loop_s, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
               checkpoint_files=sorted(p.name for p in run.path.glob("*.safetensors")))
    print("ROW", json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
