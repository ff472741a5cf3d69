"""Data-parallel throughput on several GPUs: the project's LoRA step on the full-size FLUX.1-dev transformer.

Run under torchrun, once with 1 process and once with N (random weights, identical on every GPU because
they are drawn from the same seed; nothing is downloaded):

    torchrun --standalone --nproc_per_node=1 bench/multi_gpu_bench.py --out R1.json
    torchrun --standalone --nproc_per_node=2 bench/multi_gpu_bench.py --out R2.json

Each process trains with batch 1; throughput is images/s = processes / s_per_step. The LoRA is checked to
be identical on every GPU after the timed steps (the same check the trainer runs at every checkpoint).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flux_bench import DEV  # noqa: E402  the FLUX.1-dev transformer config
from trainer.training import distributed  # noqa: E402
from trainer.training.schedule import scaled_learning_rate  # noqa: E402
from trainer.config import TrainingConfig  # noqa: E402
from trainer.training.encode import EncodedExample, PromptEmbedding
from trainer.dataset.prepare import latent_weights  # noqa: E402
from trainer.training.flow import latent_image_ids, resolution_shift  # noqa: E402
from trainer.model.lora import add_lora  # noqa: E402
from trainer.training.step import training_step  # noqa: E402


def synthetic_example(device, res: int = 512) -> EncodedExample:
    g = torch.Generator().manual_seed(res)
    h = w = res // 8
    mask = torch.zeros(1, 1, res, res)
    mask[..., res // 8: -res // 8, res // 4: -res // 4] = 1.0
    caption = PromptEmbedding("a photo of sks", torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16),
                              torch.randn(1, 768, generator=g).to(device, torch.bfloat16),
                              torch.zeros(512, 3, device=device, dtype=torch.bfloat16))
    return EncodedExample(latents=torch.randn(1, 16, h, w, generator=g).to(device, torch.bfloat16),
                          weights=latent_weights(mask, h, w).to(device),
                          image_ids=latent_image_ids(h, w, device, torch.bfloat16), caption=caption)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--mode", choices=("ddp", "ddp-bf16", "flat"), default="ddp",
                        help="ddp: the trainer's bucketed all-reduce during backward; flat: one all-reduce after")
    args = parser.parse_args()

    torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention backward crashed at Flux size on the 2026-11-22 H100 image (bench/RESULTS.md)
    ctx = distributed.context_from_environment()
    distributed.initialise(ctx)
    device = ctx.device
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)  # the same seed on every GPU: the same "pretrained" weights everywhere
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**DEV)
    torch.set_default_dtype(torch.float32)
    transformer.requires_grad_(False)
    cfg = TrainingConfig(rank=args.rank, learning_rate=1e-4)
    params = add_lora(transformer, cfg.rank, cfg.alpha, cfg.seed)
    ctx.broadcast_parameters(params)
    transformer.train()
    model = transformer if args.mode == "flat" else ctx.data_parallel(transformer, compress_bf16=args.mode == "ddp-bf16")
    optimizer = torch.optim.AdamW(params, lr=scaled_learning_rate(cfg.learning_rate, ctx.world_size),
                                  weight_decay=cfg.weight_decay, fused=True)
    generator = torch.Generator(device=device).manual_seed(ctx.noise_seed(cfg.seed))
    example = synthetic_example(device)
    mu = resolution_shift(1024)

    def step():
        loss = training_step(model, example, cfg, generator, mu, True)
        ctx.average(loss.item())
        loss.backward()
        if args.mode == "flat":
            ctx.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    ctx.barrier()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    same, checksum = ctx.identical_everywhere(params)
    median = statistics.median(times)
    row = dict(impl="project", mode=args.mode, processes=ctx.world_size, rank=args.rank, resolution=512, checkpointing=False,
               s_per_step=round(median, 4), images_per_s=round(ctx.world_size / median, 3),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2), lora_identical=same,
               lora_checksum=checksum, gpu=torch.cuda.get_device_name(device), steps_timed=len(times))
    if ctx.is_main:
        print("ROW", json.dumps(row), flush=True)
        if args.out:
            args.out.write_text(json.dumps(row, indent=1))
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main()
