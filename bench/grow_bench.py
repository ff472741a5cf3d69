"""Candidates per minute for the Grow step (issue 15), at full size with random weights, on one GPU.

Two sources, each through the shipped code (``trainer.grow``: the variation plan, ``LoraPipeline.render``):
- ``flux1``: a FLUX.1-dev checkpoint source: a rank-16 LoRA (random, non-zero) loaded by diffusers' own loader onto
  the full-size bf16 transformer; 512 px, the run's preview settings (20 steps, guidance 3.5), T5-XXL + CLIP-L encode.
- ``flux2-klein``: reference editing: FLUX.2 [klein] 4B given the subject (on a plain background) as the reference,
  as the distilled model renders (4 steps, guidance 1.0), Qwen3-4B encodes; then a klein checkpoint source (a rank-16
  LoRA, no reference), the same settings.
Each candidate's prompt is new (a variation), so its text encoding is part of its time, as in the app.

The GPU image has no onnxruntime/rembg, so the automatic mask and the scores of each candidate (``choose_mask``,
copy score, likeness) are timed apart with ``--postprocess`` on any machine with the project installed: they cost
the same whatever model drew the candidate.

    python bench/grow_bench.py --family flux1 --count 8 --out bench/results/X.json      # GPU
    python bench/grow_bench.py --postprocess --count 4                                  # CPU: mask + scores
    python bench/grow_bench.py --tiny --count 2                                         # CPU smoke test
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
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CAPTION = "a photo of [trigger], a small ceramic figure with a red scarf"


def subject(size: int = 512):
    """(picture, its exact mask): the novel subject the tests use (a crowned figure on a checkered background)."""
    from trainer.model.demo_scenes import novel_subject

    return novel_subject(size)


def render_times(family: str, count: int, resolution: int, tiny: bool) -> list[dict]:
    """One row per source the family offers: a checkpoint (both families), reference editing (klein)."""
    from bench.tier_bench import build_parts

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    parts = build_parts(device, dtype, tiny, family)
    parts.transformer.to(device)
    build_s = time.perf_counter() - started
    sources = ("checkpoint",) if family == "flux1" else ("reference", "checkpoint")
    return [dict(source_times(parts, family, source, count, resolution, tiny, device), build_s=round(build_s, 1))
            for source in sources]


def source_times(parts, family: str, source: str, count: int, resolution: int, tiny: bool, device) -> dict:
    from trainer.grow.job import REFERENCE_GRAY
    from trainer.grow.variations import plan_variations
    from trainer.model.lora import add_lora, remove_lora, save_lora
    from trainer.review.inference import LoraPipeline, RenderSettings

    variations = plan_variations(CAPTION, count=count)
    image, mask = subject(resolution)
    # the run's preview settings: FLUX.1-dev 20 steps at guidance 3.5; klein (distilled) 4 steps at guidance 1
    steps, guidance = (20, 3.5) if family == "flux1" else (4, 1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        lora, references = None, []
        if source == "checkpoint":
            add_lora(parts.transformer, 16, 16.0, seed=0)
            with torch.no_grad():
                for name, p in parts.transformer.named_parameters():
                    if ".lora_B" in name:
                        p.normal_(0.0, 0.01)
            lora = Path(tmp) / "lora.safetensors"
            save_lora(parts.transformer, lora, dtype=torch.bfloat16)
            remove_lora(parts.transformer)
            prompts = [v.caption.replace("[trigger]", "ohwx") for v in variations]
        else:
            plain = Image.new("RGB", image.size, REFERENCE_GRAY)
            plain.paste(image, mask=mask)
            references = [plain]
            prompts = [v.instruction for v in variations]
        engine = LoraPipeline(parts)
        settings = RenderSettings(width=resolution, height=resolution, steps=1 if tiny else steps,
                                  guidance=guidance, max_text_tokens=512)
        times = []
        for index, prompt in enumerate(prompts):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.render(prompt, 1000 + index, settings, lora=lora, references=references)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del engine
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"family": family, "source": source, "resolution": resolution,
            "denoise_steps": settings.steps, "guidance": guidance, "candidates": count,
            "first_candidate_s": round(times[0], 3),
            "candidate_render_s_median_after_first": round(steady, 3),
            "render_candidates_per_minute": round(60.0 / steady, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def postprocess_times(count: int, resolution: int) -> dict:
    """The automatic mask (u2netp, refined) and both scores of one candidate, as ``render_candidates`` does them."""
    from trainer.dataset.choice import choose_mask
    from trainer.dataset.imageset import SetImage
    from trainer.grow.candidates import likeness
    from trainer.review.advisor import nearest_copy

    image, mask = subject(resolution)
    originals = [SetImage("image.png", image, mask, CAPTION)]
    times = []
    for index in range(count):
        candidate = image.rotate(5 * (index + 1), fillcolor=(200, 200, 200))  # another picture each time
        t0 = time.perf_counter()
        got = choose_mask(candidate).mask
        nearest_copy(candidate, [image])
        likeness(candidate, got, originals)
        times.append(time.perf_counter() - t0)
    return {"postprocess_s_median": round(statistics.median(times), 3), "postprocess_s_first": round(times[0], 3),
            "resolution": resolution, "device": "cpu", "cpu_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux1", choices=("flux1", "flux2-klein"))
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of the code path")
    parser.add_argument("--postprocess", action="store_true", help="time the mask + scores per candidate (CPU)")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = [postprocess_times(args.count, args.resolution)] if args.postprocess else \
        render_times(args.family, args.count, 64 if args.tiny else args.resolution, args.tiny)
    for row in rows:
        row.update(commit=args.commit, date=time.strftime("%Y-%m-%d"), torch=torch.__version__)
        print("ROW " + json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
