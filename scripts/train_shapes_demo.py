#!/usr/bin/env python
"""Train ``shapes-demo``: a small FLUX.1-shaped text-to-image model that draws the scenes of
``trainer/model/demo_scenes.py`` (coloured shapes and figures on plain, striped, checkered, dotted or gradient
backgrounds), so a CPU user sees a LoRA pull the previews toward their subject instead of coloured noise.

Every part is the real FLUX.1 pipeline's class (FluxTransformer2DModel, AutoencoderKL, CLIP + T5 text encoders,
the flow-matching scheduler), only small, so the app loads and trains it with exactly the code it uses for
FLUX.1-dev. The text encoders stay at their seeded random weights, frozen, as FLUX's are during LoRA training: the
transformer learns to read them. Two stages, each on a time budget (the learning rate follows a cosine over the
budget, so a faster GPU simply trains more steps):

1. the autoencoder (8x downsampling, 16 latent channels, as FLUX's), on L1 + L2 reconstruction with a small KL;
2. the transformer, with the trainer's own rectified-flow objective (``trainer/training/flow.py``: logit-normal
   sigmas shifted by image size, velocity target), an exponential moving average of its weights kept and saved.

Run on the GPU machine (bench/gpu_calls.sh demo); ``--smoke`` runs every stage for a few steps on a CPU.
Writes ``OUT/shapes-demo/`` (the diffusers folder), two tar files of it (each under the device's 16 MiB return
limit), a sample grid and ``train_log.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.model import demo_scenes  # noqa: E402
from trainer.training import flow  # noqa: E402

# Training buckets (width, height): the square and four other shapes of about the same area, all multiples of 16,
# so an uploaded portrait or landscape photo lands on a size the model has seen.
BUCKETS = ((256, 256), (320, 208), (208, 320), (288, 224), (224, 288))
BUCKET_SHARE = (0.6, 0.1, 0.1, 0.1, 0.1)
TEXT_TOKENS = 48  # T5 tokens: the longest two-shape caption is ~40
MAX_THINGS = 2
SEED = 20261203

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=3, num_single_layers=4, attention_head_dim=32,
                   num_attention_heads=6, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
                   axes_dims_rope=(8, 12, 12))
VAE = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64, 96, 96],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           latent_channels=16, norm_num_groups=32, layers_per_block=1, sample_size=256,
           use_quant_conv=False, use_post_quant_conv=False)
SIZE = 256
VAE_CROP = None  # train the autoencoder on random crops of this size (None: whole pictures)


def use_cpu_profile() -> None:
    """The model trainable on a 2-core CPU in well under an hour (when no GPU is lent): 128 px scenes of one thing,
    a smaller autoencoder and transformer, 24 text tokens. It is also the cheaper model to fine-tune on a CPU."""
    global BUCKETS, BUCKET_SHARE, TEXT_TOKENS, MAX_THINGS, SIZE
    BUCKETS, BUCKET_SHARE = ((128, 128), (144, 112), (112, 144)), (0.7, 0.15, 0.15)
    TEXT_TOKENS, MAX_THINGS, SIZE = 24, 1, 128
    TRANSFORMER.update(num_layers=2, num_single_layers=3, num_attention_heads=4)
    VAE.update(block_out_channels=[16, 32, 64, 64], norm_num_groups=8, sample_size=128)
    global VAE_CROP
    VAE_CROP = 64  # the autoencoder is convolutional: 64 px crops teach it edges and patterns at a quarter the cost


def build_pipeline():
    """Every part at its seeded initial weights (the text encoders keep theirs)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from trainer.model.tiny import byte_level_tokenizer

    torch.manual_seed(SEED)
    corpus = demo_scenes.vocabulary_corpus()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, projection_dim=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=0))
    text_encoder_2 = T5EncoderModel(T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                             vocab_size=1000, pad_token_id=0, eos_token_id=2))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=AutoencoderKL(**VAE, shift_factor=0.0, scaling_factor=1.0),
                        text_encoder=text_encoder, tokenizer=byte_level_tokenizer(77, corpus),
                        text_encoder_2=text_encoder_2, tokenizer_2=byte_level_tokenizer(TEXT_TOKENS, corpus),
                        transformer=FluxTransformer2DModel(**TRANSFORMER))


def _draw(job: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    index, width, height = job
    image, caption = demo_scenes.example(SEED * 7 + index, width, height, MAX_THINGS)
    return np.asarray(image), caption


def draw_dataset(count: int, workers: int) -> list[tuple[torch.Tensor, list[str]]]:
    """``count`` scenes split over the buckets: per bucket a uint8 (N, 3, H, W) tensor and the captions."""
    jobs, start = [], 0
    sizes = [max(2, int(round(count * share))) for share in BUCKET_SHARE]
    for (width, height), n in zip(BUCKETS, sizes):
        jobs.append([(start + i, width, height) for i in range(n)])
        start += n
    out = []
    with mp.get_context("fork").Pool(workers) as pool:
        for bucket_jobs in jobs:
            drawn = pool.map(_draw, bucket_jobs, chunksize=64)
            pixels = torch.from_numpy(np.stack([d[0] for d in drawn])).permute(0, 3, 1, 2).contiguous()
            out.append((pixels, [d[1] for d in drawn]))
    return out


def to_unit(pixels: torch.Tensor, device) -> torch.Tensor:
    return pixels.to(device, non_blocking=True).float() / 127.5 - 1.0


def cosine(progress: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))) * 0.95 + 0.05


def pick_bucket(rng: np.random.Generator, data) -> int:
    return int(rng.choice(len(data), p=np.array(BUCKET_SHARE) / sum(BUCKET_SHARE)))


def train_vae(vae, data, seconds: float, batch: int, device, log: list, max_steps: int | None) -> None:
    vae.train().to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng(1)
    start, step = time.time(), 0
    while True:
        progress = (time.time() - start) / seconds
        if progress >= 1 or (max_steps and step >= max_steps):
            break
        for group in opt.param_groups:
            group["lr"] = 1e-3 * cosine(progress)
        pixels, _ = data[pick_bucket(rng, data)]
        x = to_unit(pixels[torch.from_numpy(rng.integers(0, len(pixels), batch))], device)
        if VAE_CROP:
            top = int(rng.integers(0, x.shape[-2] - VAE_CROP + 1)) // 8 * 8
            left = int(rng.integers(0, x.shape[-1] - VAE_CROP + 1)) // 8 * 8
            x = x[..., top:top + VAE_CROP, left:left + VAE_CROP]
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
        reconstruction = reconstruction.float()
        kl = posterior.kl().mean()
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            entry = {"stage": "vae", "step": step, "s": round(time.time() - start, 1), "loss": round(loss.item(), 5)}
            log.append(entry)
            print(entry, flush=True)
        step += 1
    log.append({"stage": "vae", "steps": step, "seconds": round(time.time() - start, 1)})
    vae.eval()


@torch.no_grad()
def encode_latents(vae, data, device, batch: int = 256):
    """Each bucket's latents (the posterior's mode, as the trainer caches them) and the normalisation FLUX uses."""
    raw = []
    for pixels, _ in data:
        chunks = [vae.encode(to_unit(pixels[i:i + batch], device)).latent_dist.mode().float()
                  for i in range(0, len(pixels), batch)]
        raw.append(torch.cat(chunks))
    flat = torch.cat([r.flatten() for r in raw])
    shift, scale = flat.mean().item(), 1.0 / flat.std().item()
    return [((r - shift) * scale).to(torch.bfloat16) for r in raw], shift, scale


@torch.no_grad()
def encode_captions(pipe, data, device, batch: int = 512):
    """T5 sequence embeddings and CLIP pooled embeddings for every caption (and the empty one, for dropout)."""
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    out = []
    for _, captions in list(data) + [(None, [""])]:
        embeds, pooled = [], []
        for i in range(0, len(captions), batch):
            e, p, _ = pipe.encode_prompt(prompt=captions[i:i + batch], prompt_2=None, device=device,
                                         max_sequence_length=TEXT_TOKENS)
            embeds.append(e.to(torch.bfloat16))
            pooled.append(p.to(torch.bfloat16))
        out.append((torch.cat(embeds), torch.cat(pooled)))
    return out[:-1], out[-1]


def no_cudnn_attention():
    """PyTorch's attention without its cuDNN kernel: on the H200 (torch 2.11) the first backward through it at this
    model's sequence length (256 + 48 tokens) failed with CUBLAS_STATUS_EXECUTION_FAILED (2026-12-03)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def train_transformer(transformer, latents, texts, empty, seconds: float, batch: int, device, log: list,
                      max_steps: int | None, lr: float = 6e-4):
    transformer.train().to(device)
    params = [p for p in transformer.parameters()]
    ema = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    rng = np.random.default_rng(2)
    gen = torch.Generator(device=device).manual_seed(3)
    text_ids = torch.zeros(TEXT_TOKENS, 3, device=device)
    ids = {}
    start, step = time.time(), 0
    while True:
        progress = (time.time() - start) / seconds
        if progress >= 1 or (max_steps and step >= max_steps):
            break
        for group in opt.param_groups:
            group["lr"] = lr * cosine(progress)
        b = pick_bucket(rng, latents)
        index = torch.from_numpy(rng.integers(0, len(latents[b]), batch)).to(device)
        x0 = latents[b][index].float()
        embeds, pooled = texts[b][0][index].float(), texts[b][1][index].float()
        drop = torch.from_numpy(rng.random(batch) < 0.1).to(device)  # 10 % empty captions: the prompt-free prior
        embeds = torch.where(drop[:, None, None], empty[0].float().expand_as(embeds), embeds)
        pooled = torch.where(drop[:, None], empty[1].float().expand_as(pooled), pooled)
        h, w = x0.shape[-2:]
        if (h, w) not in ids:
            ids[(h, w)] = flow.latent_image_ids(h, w, device, torch.float32)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        sigmas = flow.sample_sigmas(batch, flow.resolution_shift((h // 2) * (w // 2)), gen, device)
        x_t = flow.noisy_latents(x0, noise, sigmas)
        # The guidance embedding gets a random value: this model is not guidance-distilled, so it learns to
        # ignore it and any preview guidance setting draws the same picture.
        guidance = torch.empty(batch, device=device).uniform_(1.0, 5.0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), no_cudnn_attention():
            prediction = transformer(hidden_states=flow.pack_latents(x_t), timestep=sigmas, guidance=guidance,
                                     pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                     img_ids=ids[(h, w)], return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), flow.pack_latents(flow.velocity_target(x0, noise)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        decay = min(0.9995, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, [p.float() for p in params], alpha=1 - decay)
        if step % 250 == 0:
            entry = {"stage": "transformer", "step": step, "s": round(time.time() - start, 1),
                     "loss": round(loss.item(), 5)}
            log.append(entry)
            print(entry, flush=True)
        step += 1
    log.append({"stage": "transformer", "steps": step, "seconds": round(time.time() - start, 1)})
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    transformer.eval()


SAMPLE_PROMPTS = (
    "a large red circle in the center, on a blue background",
    "a large yellow star in the center, on a black background",
    "a small green square on the left and a small white triangle on the right, on a purple background",
    "a large blue figure in the center, on a yellow and white striped background",
    "a large pink ring at the top, on a teal and black checkered background",
    "a large orange diamond in the center, on a white to green gradient background",
    "a large white cross on the right, on a red background with white dots",
    "a large purple figure on the left, on a gray background",
)


def sample_grid(folder: Path, out: Path, device, steps: int = 20) -> dict:
    """Render the sample prompts from the saved folder with the real pipeline; a grid and two colour checks."""
    from diffusers import FluxPipeline
    from PIL import Image

    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in SAMPLE_PROMPTS if MAX_THINGS > 1 or " and a " not in p]
    images = pipe(prompts, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=3.5,
                  generator=torch.Generator(device).manual_seed(0), max_sequence_length=TEXT_TOKENS).images
    grid = Image.new("RGB", (SIZE * 4, SIZE * 2))
    for i, image in enumerate(images):
        grid.paste(image, ((i % 4) * SIZE, (i // 4) * SIZE))
    grid.save(out / "shapes-demo-samples.png")
    # The first two prompts: the centre should have the subject's colour and the corners the background's.
    checks = {}
    for image, subject, background in ((images[0], "red", "blue"), (images[1], "yellow", "black")):
        a = np.asarray(image).astype(np.float32)
        q = SIZE // 8
        centre, corner = a[3 * q:5 * q, 3 * q:5 * q].mean((0, 1)), a[:q, :q].mean((0, 1))
        checks[f"{subject} on {background}"] = {
            "centre_error": float(np.abs(centre - demo_scenes.COLOURS[subject]).mean()),
            "corner_error": float(np.abs(corner - demo_scenes.COLOURS[background]).mean())}
    return checks


def tar_parts(folder: Path, out: Path) -> list[str]:
    """The folder as two tar files, the transformer in one and the rest in the other (each under 16 MiB)."""
    names = []
    for name, keep in (("shapes-demo-transformer.tar", lambda p: p.parts[0] == "transformer"),
                       ("shapes-demo-rest.tar", lambda p: p.parts[0] != "transformer")):
        with tarfile.open(out / name, "w") as tar:
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder)
                if path.is_file() and keep(rel):
                    tar.add(path, arcname=str(Path("shapes-demo") / rel))
        names.append(name)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--vae-seconds", type=float, default=150)
    parser.add_argument("--transformer-seconds", type=float, default=330)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage on the CPU")
    parser.add_argument("--cpu-profile", action="store_true", help="the smaller 128 px model (use_cpu_profile)")
    args = parser.parse_args(argv)
    if args.cpu_profile:
        use_cpu_profile()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    max_steps = 3 if args.smoke else None
    if args.smoke:
        args.images, args.vae_batch, args.batch = 40, 2, 2
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.time()
    data = draw_dataset(args.images, workers=min(16, os.cpu_count() or 1))  # forked before CUDA starts
    log: list = [{"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "images": args.images}]
    log.append({"stage": "draw", "seconds": round(time.time() - t0, 1)})
    print(log[-1], flush=True)

    pipe = build_pipeline()
    train_vae(pipe.vae, data, args.vae_seconds, args.vae_batch, device, log, max_steps)
    latents, shift, scale = encode_latents(pipe.vae, data, device)
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    texts, empty = encode_captions(pipe, data, device)
    pipe.vae.to("cpu")  # safe in host memory should a CUDA error end the transformer stage
    del data
    try:
        train_transformer(pipe.transformer, latents, texts, empty, args.transformer_seconds, args.batch, device, log,
                          max_steps)
    except Exception as err:  # keep what trained so far: the autoencoder alone is worth bringing back
        log.append({"stage": "transformer", "error": f"{type(err).__name__}: {err}"[:500]})
        print(log[-1], flush=True)

    folder = args.out / "shapes-demo"
    pipe.to("cpu")
    pipe.transformer.to(torch.bfloat16)  # halves the files; the app loads them in its own dtype
    pipe.vae.to(torch.bfloat16)
    pipe.save_pretrained(folder, safe_serialization=True)
    try:
        with no_cudnn_attention():
            log.append({"stage": "samples", **sample_grid(folder, args.out, device)})
    except Exception as err:
        log.append({"stage": "samples", "error": f"{type(err).__name__}: {err}"[:500]})
    log.append({"total_seconds": round(time.time() - t0, 1), "files": tar_parts(folder, args.out)})
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log[-2:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
