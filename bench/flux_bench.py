#!/usr/bin/env python3
"""Speed and memory of one Flux LoRA training step, plain baseline vs this project, in one run.

Builds the full-size transformer of the model family (``--family``: FLUX.1-dev by default, or FLUX.2 [klein] 4B)
with random bf16 weights directly on the GPU (same FLOPs and bytes as the real model: no weights can be downloaded
on the GPU machines), a synthetic cached example shaped like the family's (FLUX.1: 16-channel latent, 512 T5 tokens
x 4096, pooled 768; klein: 128-channel 2x2-patched latent, 512 Qwen3 tokens x 7680, no pooled text), a mask, and
times:
  baseline  the plain diffusers + peft step the team measures every speed-up against (LORA_FP32=1: fp32 LoRA under bf16
            autocast, fused AdamW, no compile) for rank 16 and 4, 512 and 1024 px, with/without checkpointing;
  project   ``trainer.training.step.training_step`` + loss.item() + backward + clip + AdamW, exactly as ``train_lora``
            runs it ("none"), and ``trainer.training.step.TrainStep`` (the shipped fast step) in its variants:
              step           TrainStep eager (skips peft's fp32 round trip of LoRA inputs under autocast)
              graph          TrainStep replaying the step from two CUDA graphs (forward+backward | clip+AdamW)
              compile        blocks compiled by ``trainer.training.accel.compile.accelerate_transformer``, loop step
              compile+graph  both (the fast path);  suffix -castcopy (keep peft's cast)
            The compiled variants' attention is what the trainer picks (``trainer.training.accel.attention.choose_attention``: cuDNN
            after its self-test); ONE_IMAGE_LORA_ATTENTION=flash|cudnn|auto in the environment overrides it, so
            compare backends in separate processes. Rows say which one ran (``attention``).
            for rank 16 and 4, 512 and 1024 px, with/without checkpointing (``--plan`` picks which);
  preview   one 20-step preview through ``trainer.training.previews.PreviewRenderer`` with a real-config VAE (random
            weights), eager and compiled;
  profile   kernel time per step by category (torch.profiler);
  tiers     which configurations fit under 24 / 16 / 12 GB (``torch.cuda.set_per_process_memory_fraction``);
  fp8check  the frozen base in fp8 (trainer.model.fp8_matmul): the LoRA gradient over a short bf16 run against the
            same steps with fp8 matmuls and with dequantized fp8 storage, then the base stays fp8 for what follows;
  fp8mode:M which matmul the quantized base runs from then on (copy: fp8 with a transposed copy, the full tier;
            otf: fp8 transposing on the fly, the small tiers; dequant: fp8 storage turned into bf16, as before);
            preview rows after it compare their image with the bf16 one (PSNR);
  floor     the FLOPs of one training step counted by ``torch.utils.flop_counter`` and a bf16 GEMM's measured
            rate: the step's floor (FLOPs / rate), to say how far the shipped step is from it.
Each figure is the median of several CUDA-synchronised steps after warm-up. Rows are written to the JSON file
after every case (a run cut short keeps what it measured); a short table is printed last.

GPU:  python bench/flux_bench.py --out-dir bench/results --commit $(git rev-parse HEAD)
      python bench/flux_bench.py --family flux2-klein --plan baseline,compile+graph,floor,preview-compile,run:500:50
CPU smoke test (tiny model, a few minutes on 2 cores):  python bench/flux_bench.py --tiny --out-dir /tmp/bench
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# --- the plain baseline step's model and LoRA targets (the team's reference script, kept as it was written)
DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
           guidance_embeds=True, axes_dims_rope=(16, 56, 56))
REF_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "proj_mlp", "proj_out"]
# FLUX.1-dev's AutoencoderKL config (vae/config.json), random weights.
FLUX_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024, act_fn="silu",
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
                mid_block_add_attention=True, force_upcast=True)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# CPU smoke-test sizes (a Flux of this shape runs a step in well under a second on a CPU)
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
            guidance_embeds=True)
TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[8, 16, 32, 32],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=64,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
# FLUX.2 [klein]'s AutoencoderKLFlux2 (black-forest-labs/FLUX.2-klein-4B vae/config.json), random weights.
KLEIN_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=32, norm_num_groups=32,
                 patch_size=(2, 2), batch_norm_eps=1e-4, batch_norm_momentum=0.1, use_quant_conv=True,
                 use_post_quant_conv=True, sample_size=1024)
TINY_KLEIN_VAE = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                      sample_size=64, use_quant_conv=False, use_post_quant_conv=False)
GIB = 2 ** 30
TIERS_GB = (24, 16, 12)
DEFAULT_PLAN = ("baseline,none,preview,graph@r16@nockpt,compile@nockpt,compile@ckpt,compile+graph,"
                "preview-compile,run:500:50,tiers")
TINY_PLAN = "baseline@r4,none@r4,step@r4@nockpt,preview,compile@r4@nockpt,preview-compile,run:4:2"


class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        from trainer.families import FLUX1, family_named

        self.family = family_named(args.family)
        self.flux1 = self.family is FLUX1
        if self.flux1:  # the team's reference configs, kept as the FLUX.1 figures were measured with them
            self.model_cfg = TINY if args.tiny else DEV
        else:
            self.model_cfg = dict(self.family.tiny_transformer_config if args.tiny else self.family.transformer_config)
        self.txt_len = 12 if args.tiny else 512
        # FLUX.1 caches 16-channel latents at 1/8 size (packed 2x2 at the forward); klein caches them already in
        # 2x2 patches: 128 channels at 1/16.
        self.latent_ch = self.model_cfg["in_channels"] // 4 if self.flux1 else self.model_cfg["in_channels"]
        self.latent_div = 8 if self.flux1 else 16
        self.preview_guidance = args.preview_guidance if args.preview_guidance is not None else \
            (3.5 if self.flux1 else 1.0)  # klein: the distilled model's 4 steps at guidance 1 (docs/PRACTICE.md §9)
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.info: dict = {}
        self.transformer = None
        self.out_path: Path | None = None
        if self.cuda:  # the fp8 plan items recompile the blocks once per matmul mode: room for every variant
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.row_tags: dict = {}  # merged into every row (the fp8 plan items: which matmul the base runs)
        self.preview_images: dict = {}  # the last image of each preview case, by row tags (fp8 vs bf16 PSNR)

    # ---------------------------------------------------------------- plumbing
    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def log(self, *a):
        print(f"[{time.time() - self.t0:7.1f}s]", *a, flush=True)

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> dict:
        if not self.cuda:
            return dict(peak_gib=None, reserved_gib=None)
        return dict(peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                    reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))

    def build_transformer(self):
        if self.transformer is not None:
            self.transformer = None
            self.free()
        t = time.time()
        torch.manual_seed(0)
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = self.family.transformer_class()(**self.model_cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        model.requires_grad_(False)
        model.train()
        self.transformer = model
        n = sum(p.numel() for p in model.parameters())
        mem = torch.cuda.memory_allocated() / GIB if self.cuda else 0.0
        self.log(f"built transformer: {n / 1e9:.2f}B params in {time.time() - t:.1f}s; allocated {mem:.1f} GiB")
        self.info.setdefault("transformer_params_B", round(n / 1e9, 3))
        return model

    def preview_parts(self):
        """What PreviewRenderer needs: the transformer in hand plus a VAE of the real config (random weights)."""
        from diffusers import AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

        torch.manual_seed(0)
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                if self.flux1:
                    vae = AutoencoderKL(**(TINY_VAE if self.tiny else FLUX_VAE))
                else:
                    vae = AutoencoderKLFlux2(**(TINY_KLEIN_VAE if self.tiny else KLEIN_VAE))
        finally:
            torch.set_default_dtype(torch.float32)
        vae.requires_grad_(False).eval()
        return SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                               transformer=self.transformer, device=self.device, dtype=self.dtype, family=self.family)

    def resolution_list(self):
        return [64, 128] if self.tiny else self.args.resolutions

    def example(self, res: int):
        """Synthetic cached example, shaped exactly like ``encode_example``'s output."""
        from trainer.training.encode import EncodedExample
        from trainer.dataset.prepare import latent_weights

        g = torch.Generator().manual_seed(res)
        h = w = res // self.latent_div
        latents = torch.randn(1, self.latent_ch, h, w, generator=g).to(self.device, self.dtype)
        mask = torch.zeros(1, 1, res, res)
        mask[..., res // 8: res - res // 8, res // 4: res - res // 4] = 1.0  # a centered subject, ~56% of the frame
        weights = latent_weights(mask, h, w, 0.0).to(self.device)
        caption = self.prompt_embedding("a photo of sks", g)
        return EncodedExample(latents=latents, weights=weights,
                              image_ids=self.family.image_ids(h, w, self.device, self.dtype), caption=caption)

    def prompt_embedding(self, prompt: str, g: torch.Generator):
        """Random text conditioning shaped like the family's encoder output (FLUX.1: T5 tokens + pooled CLIP, 3-D
        ids; klein: stacked Qwen3 tokens, 4-D integer ids, the empty prompt's embeds for CFG)."""
        from trainer.training.encode import PromptEmbedding

        def tokens():
            return torch.randn(1, self.txt_len, self.model_cfg["joint_attention_dim"], generator=g).to(self.device,
                                                                                                      self.dtype)
        if self.flux1:
            return PromptEmbedding(
                prompt=prompt, embeds=tokens(),
                pooled=torch.randn(1, self.model_cfg["pooled_projection_dim"], generator=g).to(self.device, self.dtype),
                text_ids=torch.zeros(self.txt_len, 3, device=self.device, dtype=self.dtype))
        ids = torch.zeros(1, self.txt_len, 4, dtype=torch.long, device=self.device)
        ids[..., 3] = torch.arange(self.txt_len, device=self.device)
        return PromptEmbedding(prompt=prompt, embeds=tokens(), pooled=None, text_ids=ids, negative=tokens())

    def timed(self, step, n: int, warmup: int, max_s: float) -> tuple[list[float], float]:
        """Run ``warmup`` untimed steps (first one timed separately: compile/caching), then up to ``n`` timed."""
        t = time.perf_counter()
        step()
        self.sync()
        first = time.perf_counter() - t
        for _ in range(max(0, warmup - 1)):
            step()
        self.sync()
        times = []
        start = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - t)
            if i >= 4 and time.perf_counter() - start > max_s:
                break
        return times, first

    def add_row(self, **row):
        row = {**self.row_tags, **row}
        self.rows.append(row)
        keys = ("impl", "accel", "rank", "resolution", "checkpointing", "s_per_step", "peak_gib", "error")
        self.log("ROW", {k: row.get(k) for k in keys if k in row})
        self.write()

    def write(self):
        if self.out_path is None:
            return
        doc = dict(gpu=self.info.get("gpu"), commit=self.args.commit, date=self.info.get("date"), info=self.info,
                   rows=self.rows)
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.out_path)

    def case(self, fn, base: dict, est_s: float):
        """Run one measurement; OOM and other failures become rows, never a crash."""
        if self.left() < est_s:
            self.add_row(**base, error=f"skipped: {self.left():.0f}s of the time budget left, needs ~{est_s:.0f}s")
            return None
        self.free()
        self.reset_peak()
        try:
            extra = fn()
            self.add_row(**base, **extra, **self.peaks(), tier=self.tier_of(self.peaks()))
            return extra
        except torch.OutOfMemoryError:
            self.add_row(**base, error="OOM", **self.peaks())
        except Exception as err:  # record and go on
            self.log(traceback.format_exc(limit=8))
            self.add_row(**base, error=f"{type(err).__name__}: {str(err)[:300]}")
        finally:
            self.free()
        return None

    @staticmethod
    def tier_of(peaks: dict) -> str | None:
        """Smallest card class the measured peak (reserved, +0.6 GiB CUDA context) fits; derived, not capped."""
        r = peaks.get("reserved_gib")
        if r is None:
            return None
        need = r + 0.6
        for gb in sorted(TIERS_GB + (40, 48, 80)):
            if need <= gb * 1e9 / GIB * 0.97:
                return f"{gb}GB"
        return ">80GB"

    # ---------------------------------------------------------------- baseline (the reference script)
    def baseline_inputs(self, res):
        h = w = res // self.latent_div  # the cached latent's size; the family packs it into res/16 squared tokens
        img = torch.randn(1, (res // 16) ** 2, self.model_cfg["in_channels"], device=self.device, dtype=self.dtype)
        caption = self.prompt_embedding("baseline", torch.Generator().manual_seed(1))
        return img, caption, self.family.image_ids(h, w, self.device, self.dtype)

    def run_baseline(self, grid):
        from peft import LoraConfig

        model = self.build_transformer()
        # FLUX.1: the reference script's list; klein: the family's targets (what its peers' scripts train), so the
        # baseline and the project's step train the same LoRA.
        targets = REF_TARGETS if self.flux1 else self.family.lora_target_modules
        for rank in sorted({r for r, _, _ in grid}, reverse=True):
            name = f"r{rank}"
            model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=targets), adapter_name=name)
            model.set_adapter(name)
            params = [p for n, p in model.named_parameters() if name in n]
            for p in params:
                p.requires_grad_(True)
                p.data = p.data.float()  # LORA_FP32=1
            opt = torch.optim.AdamW(params, lr=1e-4, fused=self.cuda)
            for r, res, ckpt in grid:
                if r != rank:
                    continue
                x = self.baseline_inputs(res)

                def step(x=x):
                    img, caption, img_ids = x
                    t = torch.rand(1, device=self.device, dtype=self.dtype)
                    inputs = self.family.transformer_inputs(model, img, t, caption, img_ids, 1.0)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                        out = model(**inputs, return_dict=False)[0]
                    loss = (out.float() - img.float()).pow(2).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                def measure(step=step, ckpt=ckpt):
                    if ckpt:
                        model.enable_gradient_checkpointing()
                    else:
                        model.disable_gradient_checkpointing()
                    times, first = self.timed(step, self.args.steps, self.args.warmup, self.args.max_case_s)
                    return self.summary(times, first)

                base = dict(impl="baseline", accel="none", rank=rank, resolution=res, checkpointing=ckpt,
                            lora_params_M=round(sum(p.numel() for p in params) / 1e6, 2))
                self.case(measure, base, est_s=self.est(res, ckpt, eager=True))
                x = None
            model.disable_gradient_checkpointing()
            opt.zero_grad(set_to_none=True)
            model.delete_adapters(name)
            del opt, params
            self.free()
        self.transformer = None
        del model
        self.free()

    def est(self, res, ckpt, eager):
        """Rough seconds a case needs (for the time budget): warm-up + timed steps at the expected rate."""
        if self.tiny:
            return 1.0
        per = (0.5 if res <= 512 else 1.1) * (1.8 if ckpt else 1.0) * (1.0 if eager else 0.5)
        return min(self.args.max_case_s, per * self.args.steps) + per * self.args.warmup + 3

    @staticmethod
    def summary(times, first):
        return dict(s_per_step=round(statistics.median(times), 4), s_min=round(min(times), 4),
                    s_max=round(max(times), 4), n_steps=len(times), first_step_s=round(first, 2))

    # ---------------------------------------------------------------- the project's step
    def project_setup(self, rank, res, ckpt):
        from trainer.training import flow
        from trainer.config import TrainingConfig
        from trainer.model.lora import add_lora

        model = self.transformer
        cfg = TrainingConfig(rank=rank, resolution=res, gradient_checkpointing=ckpt, learning_rate=1e-4)
        params = add_lora(model, cfg.rank, cfg.alpha, cfg.seed)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        model.train()
        example = self.example(res)
        tokens = self.family.pack(example.latents).shape[1]
        # FLUX.1-dev scheduler defaults; klein: the sampler's empirical shift (as the trainer computes it)
        mu = flow.resolution_shift(tokens) if self.flux1 else self.family.training_shift(None, tokens)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        return SimpleNamespace(cfg=cfg, params=params, example=example, mu=mu, generator=generator,
                               lora_params_M=round(sum(p.numel() for p in params) / 1e6, 2))

    def project_teardown(self, s):
        from trainer.model.lora import remove_lora
        from trainer.training.accel.graphs import GraphedInference

        GraphedInference.reset(self.transformer)
        for p in s.params:
            p.grad = None
        remove_lora(self.transformer)
        self.transformer.disable_gradient_checkpointing()
        s.__dict__.clear()
        self.free()

    def eager_step(self, s):
        """``train_lora``'s loop body, verbatim in effect (loss.item() check, clip, fused AdamW, synchronise)."""
        from trainer.training.step import training_step

        model, cfg = self.transformer, s.cfg
        opt = torch.optim.AdamW(s.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=self.cuda)
        s.nonfinite = 0

        def step():
            loss = training_step(model, s.example, cfg, s.generator, s.mu, True)
            value = loss.item()
            if not math.isfinite(value):
                s.nonfinite += 1
                opt.zero_grad(set_to_none=True)
                return
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.cuda:
                torch.cuda.synchronize()
        s.opt = opt
        return step

    def trainstep_step(self, s, graphs: bool, skip_cast: bool):
        """``trainer.training.step.TrainStep`` (what the trainer ships): eager or CUDA-graphed, as ``train_lora`` would call it."""
        from trainer.training.step import TrainStep, adamw_options

        cfg = s.cfg
        opts = adamw_options(self.device)
        if not graphs:
            opts.pop("capturable", None)
        opt = torch.optim.AdamW(s.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **opts)
        runner = TrainStep(self.transformer, s.example, cfg, s.generator, s.mu, s.params, opt, graphs=graphs,
                           skip_lora_input_cast=skip_cast)
        s.opt, s.runner, s.nonfinite = opt, runner, 0

        def step():
            value = runner.forward_backward(True)
            if math.isfinite(value):
                runner.apply()
            else:
                s.nonfinite += 1
                runner.discard()
            if self.cuda:
                torch.cuda.synchronize()
        return step

    @staticmethod
    def parse_label(label: str) -> dict:
        """none | step | graph | compile | compile+graph, with the modifier -castcopy (peft's fp32 input cast kept)."""
        return dict(compile="compile" in label, graphs="graph" in label, skip_cast="castcopy" not in label,
                    loop=label in ("none", "compile"))

    def run_project(self, grid, accel: str):
        if self.transformer is None:
            self.build_transformer()
        flags = self.parse_label(accel)
        from trainer.training.accel.attention import attention_backend
        from trainer.training.accel.compile import is_accelerated

        for rank, res, ckpt in grid:
            base = dict(impl="project", accel=accel, rank=rank, resolution=res, checkpointing=ckpt,
                        compiled=is_accelerated(self.transformer), attention=attention_backend(self.transformer))
            holder = {}

            def measure(rank=rank, res=res, ckpt=ckpt):
                s = holder["s"] = self.project_setup(rank, res, ckpt)
                extra = dict(lora_params_M=s.lora_params_M)
                if flags["loop"]:
                    step = self.eager_step(s)
                else:
                    step = self.trainstep_step(s, flags["graphs"], flags["skip_cast"])
                times, first = self.timed(step, self.args.steps, max(self.args.warmup, 5 if flags["graphs"] else 0),
                                          self.args.max_case_s)
                extra.update(self.summary(times, first), nonfinite_losses=s.nonfinite)
                runner = getattr(s, "runner", None)
                if runner is not None:
                    extra.update(graphed=runner.graphed, graph_error=runner.graph_error)
                    if flags["graphs"] and not runner.graphed:
                        extra["error"] = f"not graphed: {runner.graph_error}"
                return extra

            est = self.est(res, ckpt, eager=not (flags["compile"] or flags["graphs"]))
            if flags["compile"] and (rank, res) not in self.compiled_shapes:
                est += 50
            out = self.case(measure, base, est_s=est)
            if out is not None and flags["compile"]:
                self.compiled_shapes.add((rank, res))
            if "s" in holder:
                s = holder.pop("s")
                runner = s.__dict__.pop("runner", None)
                if runner is not None:
                    runner.close()
                s.__dict__.pop("opt", None)
                self.project_teardown(s)

    # ---------------------------------------------------------------- profile
    def run_profile(self, accel: str = "step"):
        """Where the GPU time of one step goes (kernel time by category), for the step variant ``accel``."""
        from torch.profiler import ProfilerActivity, profile

        if not self.cuda:
            return
        flags = self.parse_label(accel)
        s = self.project_setup(16, self.resolution_list()[0], False)
        try:
            step = self.eager_step(s) if flags["loop"] else self.trainstep_step(s, False, flags["skip_cast"])
            for _ in range(3):
                step()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    step()
            self.report_profile(prof, accel, per=2)
        except Exception as err:
            self.log("profile failed:", repr(err)[:300])
        finally:
            s.__dict__.pop("opt", None)
            s.__dict__.pop("runner", None)
            self.project_teardown(s)

    def report_profile(self, prof, name: str, per: int):
        """Kernel time by category (ms per ``per`` repetitions) into ``info`` and a top-60 kernel list on disk."""
        cats: dict[str, float] = {}
        lines = []
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0)
            if not us or e.device_type.name != "CUDA":
                continue
            n = e.key.lower()
            if "flash" in n or "fmha" in n or "attention" in n or "cudnn" in n:
                c = "attention"
            elif "gemm" in n or "xmma" in n or "cutlass" in n or "sm90" in n or "cublas" in n or "matmul" in n:
                c = "gemm"
            elif n.startswith("triton"):
                c = "triton (fused elementwise/norm)"
            elif "adam" in n or "foreach" in n or "multi_tensor" in n:
                c = "optimizer/clip"
            elif "elementwise" in n or "vectorized" in n or "reduce" in n or "copy" in n or "cat" in n:
                c = "aten elementwise/copy"
            else:
                c = "other"
            cats[c] = cats.get(c, 0.0) + us / per / 1e3
            lines.append((us / per / 1e3, e.count // per, e.key[:110]))
        lines.sort(reverse=True)
        total = sum(cats.values())
        self.info[f"profile_{name}_ms_per_step"] = {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
        self.info[f"profile_{name}_kernel_ms_total"] = round(total, 2)
        self.log(f"profile {name}: kernel time {total:.1f} ms:", self.info[f"profile_{name}_ms_per_step"])
        out = Path(self.args.out_dir) / f"profile-{name.replace('+', '_').replace(':', '_')}.txt"
        out.write_text("\n".join(f"{ms:9.3f} ms {cnt:6d}x  {k}" for ms, cnt, k in lines[:60]))

    # ---------------------------------------------------------------- preview
    def run_preview(self, accel: str, n: int = 3, batch: int = 1):
        from trainer.training.previews import PreviewRenderer
        from trainer.training.accel.attention import attention_backend

        if self.transformer is None:
            self.build_transformer()
        res = 64 if self.tiny else 512
        steps = 4 if self.tiny else self.args.preview_steps
        base = dict(impl="project", accel=accel, kind="preview", rank=16 if not self.tiny else 4, resolution=res,
                    checkpointing=False, preview_steps=steps, batch=batch, guidance=self.preview_guidance,
                    attention=attention_backend(self.transformer))

        def measure():
            s = self.project_setup(base["rank"], res, False)  # the LoRA is attached during previews
            parts = self.preview_parts()
            prompt = s.example.caption
            renderer = PreviewRenderer(parts, {prompt.prompt: prompt})
            prompts = [prompt.prompt] * batch
            times = []
            t = time.perf_counter()
            img = renderer.render_batch(prompts, 1, res, res, steps, self.preview_guidance)[0]
            self.sync()
            first = time.perf_counter() - t
            for _ in range(n):
                t = time.perf_counter()
                img = renderer.render_batch(prompts, 1, res, res, steps, self.preview_guidance)[0]
                self.sync()
                times.append((time.perf_counter() - t) / batch)
            if self.cuda and "profile" in accel:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    renderer.render_batch(prompts, 1, res, res, steps, self.preview_guidance)
                    self.sync()
                self.report_profile(prof, f"preview_{accel}_b{batch}", per=steps)
            # The VAE decode alone (part of each preview above).
            lat = torch.randn(1, parts.vae.config.latent_channels, res // 8, res // 8, device=self.device,
                              dtype=self.dtype)
            with torch.no_grad():
                parts.vae.decode(lat).sample
                self.sync()
                t = time.perf_counter()
                parts.vae.decode(lat).sample
                self.sync()
                decode = time.perf_counter() - t
            assert img is not None and img.size == (res, res), img
            wrapper = self.transformer.__dict__.get("_one_image_lora_graphed_inference")
            graph_info = dict(inference_graph_replays=wrapper.replays if wrapper else 0,
                              inference_graph_error=wrapper.error if wrapper else None)
            graph_info.update(self.compare_preview(img, batch))
            self.transformer.train()
            self.project_teardown(s)
            del renderer, parts
            return dict(s_per_image=round(statistics.median(times), 3), first_image_s=round(first, 2),
                        vae_decode_s=round(decode, 3), n_images=len(times), **graph_info)

        self.case(measure, base, est_s=15 if accel.startswith("none") else 60)

    def compare_preview(self, img, batch: int) -> dict:
        """Keep this case's last image; against the bf16 case of the same batch (if one ran): PSNR and the mean
        absolute pixel difference (the fp8 matmuls' effect on a preview: same seed, same LoRA)."""
        import numpy as np

        matmul = self.row_tags.get("matmul", "bf16")
        self.preview_images[(matmul, batch)] = np.asarray(img, dtype=np.float64)
        ref = self.preview_images.get(("bf16", batch))
        if matmul == "bf16" or ref is None:
            return {}
        diff = self.preview_images[(matmul, batch)] - ref
        mse = float((diff ** 2).mean())
        return dict(vs_bf16_psnr_db=round(10 * math.log10(255 ** 2 / mse), 2) if mse > 0 else None,
                    vs_bf16_mean_abs_px=round(float(abs(diff).mean()), 3))

    # ---------------------------------------------------------------- fp8 matmuls for the frozen base (issue 16)
    def set_matmul(self, mode: str) -> dict:
        """fp8mode:copy | otf | dequant -- how the (already quantized) base multiplies from here on: fp8 with a
        transposed copy of the codes (the full tier), fp8 transposing on the fly (the fp8-stored small tiers),
        or fp8 storage dequantized to bf16 (the small tiers before fp8 matmuls). Later rows carry the mode."""
        from trainer.model.quantize import QuantizedLinear, use_fp8_matmuls

        if mode == "dequant":
            for layer in self.transformer.modules():
                if isinstance(layer, QuantizedLinear):
                    layer.matmul, layer.weight_t = "dequantize", None
            report = {}
        else:
            report = use_fp8_matmuls(self.transformer, transposed_copy=mode == "copy")
        self.row_tags = dict(matmul="fp8" if mode != "dequant" else "bf16-dequant", fp8_mode=mode)
        self.free()
        self.log("matmul mode", mode, report)
        return report

    def run_fp8check(self, grid, check_steps: int = 10):
        """Gradient agreement of the fp8 base with today's bf16 step, then the base quantized in place for the
        plan items after it. ``check_steps`` steps of a bf16 training run (AdamW after each, the trainer's
        learning rate); at each, the LoRA gradient in bf16, then -- once the block layers are fp8 -- with the same
        LoRA, noise and timestep, with fp8 matmuls and with the fp8 storage dequantized to bf16 (the small tiers
        before). Cosine of the whole LoRA gradient, of its A and B halves, and the loss's relative difference."""
        from trainer.model.quantize import QuantizedLinear, quantize_linears
        from trainer.training.step import training_step

        if self.transformer is None:
            self.build_transformer()
        if any(isinstance(m, QuantizedLinear) for m in self.transformer.modules()):
            return
        rank, res, _ = grid[0]
        base = dict(impl="project", accel="check", kind="fp8check", rank=rank, resolution=res, checkpointing=False,
                    check_steps=check_steps)

        def grads_of(s):
            loss = training_step(self.transformer, s.example, s.cfg, s.generator, s.mu, True)
            loss.backward()
            return float(loss), [p.grad.detach().float().clone() for p in s.params]

        def cosine(a, b):
            dot = sum(float((x * y).sum()) for x, y in zip(a, b))
            na = sum(float((x * x).sum()) for x in a) ** 0.5
            nb = sum(float((y * y).sum()) for y in b) ** 0.5
            return dot / (na * nb) if na > 0 and nb > 0 else None  # None: LoRA A's gradient at step 0 (B = 0)

        def measure():
            s = self.project_setup(rank, res, False)
            names = [n for n, p in self.transformer.named_parameters() if p.requires_grad]
            half = {k: [i for i, n in enumerate(names) if f"lora_{k}" in n] for k in ("A", "B")}
            opt = torch.optim.AdamW(s.params, lr=s.cfg.learning_rate, weight_decay=s.cfg.weight_decay, fused=self.cuda)
            record = []
            for _ in range(check_steps):
                start = [p.detach().clone() for p in s.params]
                state = s.generator.get_state()
                loss, grads = grads_of(s)
                record.append((start, state, loss, [g.cpu() for g in grads]))
                opt.step()
                opt.zero_grad(set_to_none=True)
            del opt
            t = time.perf_counter()
            report = quantize_linears(self.transformer, "fp8", self.device, skip=self.family.keeps_full_precision)
            self.sync()
            out = dict(quantize_s=round(time.perf_counter() - t, 2), quantized_layers=report["quantized"],
                       learning_rate=s.cfg.learning_rate)
            for mode in ("copy", "dequant"):
                self.set_matmul(mode)
                rows = []
                for start, state, loss_ref, ref in record:
                    for p, p0 in zip(s.params, start):
                        p.data.copy_(p0)
                        p.grad = None
                    s.generator.set_state(state)
                    loss, grads = grads_of(s)
                    grads = [g.cpu() for g in grads]
                    rows.append((cosine(grads, ref), *(cosine([grads[i] for i in half[k]], [ref[i] for i in half[k]])
                                                       for k in ("A", "B")), abs(loss - loss_ref) / abs(loss_ref)))
                key = "fp8" if mode == "copy" else "dequant"
                out[f"{key}_grad_cosine"] = [round(r[0], 5) for r in rows]
                out[f"{key}_grad_cosine_min"] = round(min(r[0] for r in rows), 5)
                for i, k in ((1, "A"), (2, "B")):
                    out[f"{key}_grad_cosine_{k}_min"] = round(min(r[i] for r in rows if r[i] is not None), 5)
                out[f"{key}_loss_rel_diff_max"] = round(max(r[3] for r in rows), 5)
            out["losses_bf16"] = [round(r[2], 5) for r in record]
            self.row_tags = {}
            for p in s.params:
                p.grad = None
            self.project_teardown(s)
            return out

        self.case(measure, base, est_s=60 + 3 * check_steps)

    # ---------------------------------------------------------------- correctness of the graphed training step
    def run_stepcheck(self, set_of: int = 1):
        """TrainStep replayed from CUDA graphs vs TrainStep eager, from the same LoRA, optimizer and generator state,
        over steps that mix masked, unmasked and augmented (other latents) examples. Same kernels and, if the
        graph-safe RNG matches eager, the same noise: the losses and the final LoRA should agree closely.

        ``set_of`` > 1: a set of pictures of that many shapes (aspect buckets of about the same area, each with its
        own caption and shift), steps going from one to another as a shuffled epoch does: one graph per shape."""
        import dataclasses

        from trainer.training.step import TrainStep

        if not self.cuda:
            return
        res = self.resolution_list()[0]
        base = dict(impl="project", accel="check", kind="stepcheck" if set_of == 1 else f"setcheck:{set_of}",
                    rank=16, resolution=res, checkpointing=False, compiled=self.info.get("compiled", False))

        if self.transformer is None:
            self.build_transformer()

        def measure():
            s = self.project_setup(16, res, False)
            ex = s.example
            g = torch.Generator(device=self.device).manual_seed(5)
            aug = dataclasses.replace(ex, latents=torch.randn(ex.latents.shape, generator=g, device=self.device,
                                                              dtype=self.dtype), weights=None)
            pictures = [(ex, s.mu)] + [self.other_shape(ex, k, g) for k in range(1, set_of)]
            if set_of == 1:
                seq = [(True, ex, s.mu)] * 4 + [(True, ex, s.mu), (False, ex, s.mu), (True, aug, s.mu),
                                                (True, ex, s.mu), (False, aug, s.mu), (True, ex, s.mu)]
            else:  # 5 epochs, each in its own shuffled order: every shape warms up (3 steps), is captured, replays
                order = torch.Generator().manual_seed(1)
                seq = [(True, *pictures[int(i)]) for _ in range(5) for i in torch.randperm(set_of, generator=order)]
            init = [p.detach().clone() for p in s.params]
            gstate = s.generator.get_state()

            def run(graphs):
                for p, p0 in zip(s.params, init):
                    p.data.copy_(p0)
                    p.grad = None
                s.generator.set_state(gstate)
                opt = torch.optim.AdamW(s.params, lr=s.cfg.learning_rate, weight_decay=s.cfg.weight_decay, fused=True,
                                        **({"capturable": True} if graphs else {}))
                runner = TrainStep(self.transformer, ex, s.cfg, s.generator, s.mu, s.params, opt, graphs=graphs)
                losses = []
                for use_mask, e, mu in seq:
                    losses.append(runner.forward_backward(use_mask, e, mu=mu))
                    runner.apply()
                torch.cuda.synchronize()
                final = [p.detach().clone() for p in s.params]
                out = (losses, final, runner.graphed, runner.graph_error, runner.graph_count)
                runner.close()
                del opt
                return out

            le, fe, _, _, _ = run(False)
            lg, fg, graphed, err, count = run(True)
            loss_rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(le, lg)]
            num = sum(float((a - b).float().norm() ** 2) for a, b in zip(fe, fg)) ** 0.5
            den = sum(float((a - b).float().norm() ** 2) for a, b in zip(fe, init)) ** 0.5
            res_ = dict(graphed=graphed, graph_error=err, graphs=count, losses_eager=[round(v, 5) for v in le],
                        losses_graph=[round(v, 5) for v in lg], max_loss_rel_diff=max(loss_rel),
                        lora_update_rel_diff=num / max(den, 1e-30))
            s.__dict__.pop("opt", None)
            self.project_teardown(s)
            return res_

        self.case(measure, base, est_s=30 + 10 * set_of)

    def other_shape(self, ex, k: int, g: torch.Generator):
        """Picture ``k`` of a synthetic set: an aspect bucket of about ``ex``'s area (taller each time), its own
        caption, positions and shift, shaped like ``encode_example``'s output."""
        from trainer.training import flow
        from trainer.training.encode import EncodedExample

        h0, w0 = ex.latents.shape[-2:]
        step = 2  # FLUX.1 packs 2x2 latent patches; klein's latents come patchified
        h = h0 + step * k
        w = max(step, (h0 * w0 // h) // step * step)
        latents = torch.randn(1, ex.latents.shape[1], h, w, generator=g, device=self.device, dtype=self.dtype)
        weights = (torch.rand(1, 1, h, w, generator=g, device=self.device) > 0.4).float()
        caption = self.prompt_embedding(f"a photo of sks, view {k}", torch.Generator().manual_seed(k))
        other = EncodedExample(latents=latents, weights=weights, image_ids=self.family.image_ids(h, w, self.device,
                                                                                                self.dtype),
                               caption=caption)
        tokens = self.family.pack(latents).shape[1]
        mu = flow.resolution_shift(tokens) if self.flux1 else self.family.training_shift(None, tokens)
        return other, mu

    # ---------------------------------------------------------------- correctness of the preview graphs
    def run_graphcheck(self):
        """GraphedInference vs the plain forward on the same inputs: fresh inputs, and after an in-place LoRA
        update (a replay must see the new weights). Relative L2 error; should be ~0 (same kernels)."""
        from trainer.training.accel.graphs import GraphedInference

        if not self.cuda:
            return
        self.ensure_compiled()
        base = dict(impl="project", accel="check", kind="graphcheck", rank=16, resolution=self.resolution_list()[0],
                    checkpointing=False)

        def measure():
            s = self.project_setup(16, base["resolution"], False)
            model = self.transformer
            wrapper = GraphedInference.install(model)
            for p in s.params:  # make the LoRA do something (B starts at zero)
                p.data.add_(torch.randn_like(p) * 0.02)
            ex = s.example

            def inputs(seed):
                g = torch.Generator(device=self.device).manual_seed(seed)
                tokens = self.family.pack(torch.randn(ex.latents.shape, generator=g, device=self.device,
                                                      dtype=self.dtype))
                t = torch.rand(1, generator=g, device=self.device).to(self.dtype)
                return dict(**self.family.transformer_inputs(model, tokens, t, ex.caption, ex.image_ids, 3.5),
                            joint_attention_kwargs=None, return_dict=False)

            def rel(a, b):
                return float((a.float() - b.float()).norm() / b.float().norm())

            errs = {}
            model.eval()
            with torch.no_grad():
                for i in range(5):  # 2 eager warm-ups, capture, replays
                    x = inputs(i)
                    out = model(**x)[0]
                    ref = wrapper.forward(**x)[0]
                    errs[f"call{i}"] = rel(out, ref)
                for p in s.params:
                    p.data.add_(torch.randn_like(p) * 0.02)
                x = inputs(99)
                out = model(**x)[0]
                ref = wrapper.forward(**x)[0]
                errs["after_lora_update"] = rel(out, ref)
            model.train()
            res = dict(rel_err={k: v for k, v in errs.items() if v is not None}, replays=wrapper.replays,
                       graphs=len(wrapper.graphs), graph_error=wrapper.error)
            s.__dict__.pop("opt", None)
            self.project_teardown(s)
            if wrapper.error or not wrapper.replays or max(res["rel_err"].values()) > 1e-2:
                res["error"] = f"graph check failed: {res}"
            return res

        self.case(measure, base, est_s=60)

    # ---------------------------------------------------------------- a whole run, as train_lora runs it
    def run_full(self, steps: int, every: int, n_prompts: int = 3, rank: int = 16, ckpt: bool = False):
        """A complete training run with the fast path: previews of ``n_prompts`` images at step 0 and at every
        checkpoint (each ``every`` steps), LoRA saved at each checkpoint; wall-clock from a cold compile."""
        import tempfile

        from trainer.model.lora import save_lora
        from trainer.training.previews import PreviewRenderer
        from trainer.training.step import TrainStep, adamw_options

        res = self.resolution_list()[0]
        base = dict(impl="project", accel="run", kind="full_run", rank=rank, resolution=res, checkpointing=ckpt,
                    steps=steps, save_every=every, preview_images=n_prompts,
                    preview_steps=self.args.preview_steps, guidance=self.preview_guidance)

        def measure():
            t_all = time.perf_counter()
            self.ensure_compiled()
            s = self.project_setup(rank, res, ckpt)
            cfg = s.cfg.replace(steps=steps, save_every=every)
            parts = self.preview_parts()
            g = torch.Generator().manual_seed(7)
            prompts = {f"prompt {i}": self.prompt_embedding(f"prompt {i}", g) for i in range(n_prompts)}
            renderer = PreviewRenderer(parts, prompts)
            opt = torch.optim.AdamW(s.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                    **adamw_options(self.device))
            runner = TrainStep(self.transformer, s.example, cfg, s.generator, s.mu, s.params, opt)
            tmp = Path(tempfile.mkdtemp(prefix="bench-run-"))
            preview_times, step_times, save_times = [], [], []
            setup_s = time.perf_counter() - t_all

            def previews(step):
                for i, prompt in enumerate(prompts):
                    t = time.perf_counter()
                    img = renderer.render(prompt, cfg.preview_seed, res, res, 4 if self.tiny else self.args.preview_steps,
                                          self.preview_guidance)
                    img.save(tmp / f"{step:06d}-{i}.png")
                    preview_times.append(time.perf_counter() - t)

            previews(0)
            losses = []
            for step in range(1, steps + 1):
                t = time.perf_counter()
                value = runner.forward_backward(s.example.weights is not None)
                if not math.isfinite(value):
                    runner.discard()
                    raise RuntimeError(f"loss {value} at step {step}")
                runner.apply()
                self.sync()
                step_times.append(time.perf_counter() - t)
                losses.append(value)
                if step in set(cfg.checkpoint_steps):
                    t = time.perf_counter()
                    save_lora(self.transformer, tmp / f"lora-{step:06d}.safetensors", dtype=self.dtype)
                    save_times.append(time.perf_counter() - t)
                    previews(step)
            total = time.perf_counter() - t_all
            finite = all(bool(torch.isfinite(p).all()) for p in s.params)
            out = dict(total_s=round(total, 1), setup_s=round(setup_s, 2),
                       steps_total_s=round(sum(step_times), 1), first_step_s=round(step_times[0], 2),
                       median_step_s=round(statistics.median(step_times), 4),
                       steps_after_first_s=round(sum(step_times[1:]), 1),
                       previews_total_s=round(sum(preview_times), 1), n_previews=len(preview_times),
                       first_preview_s=round(preview_times[0], 2),
                       median_preview_s=round(statistics.median(preview_times), 3),
                       saves_total_s=round(sum(save_times), 2), n_saves=len(save_times), graphed=runner.graphed,
                       graph_error=runner.graph_error, loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                       inference_graph_replays=getattr(self.transformer.__dict__.get("_one_image_lora_graphed_inference"),
                                                       "replays", 0),
                       lora_finite=finite)
            runner.close()
            s.__dict__.pop("opt", None)
            self.transformer.train()
            self.project_teardown(s)
            del renderer, parts, opt, runner
            return out

        self.case(measure, base, est_s=60 if self.tiny else 200)

    # ---------------------------------------------------------------- the floor
    def gemm_rate(self, m: int, k: int, n: int) -> float:
        """Measured bf16 matmul rate (FLOP/s) at one shape, median of 20 CUDA-synchronised calls."""
        a = torch.randn(m, k, device=self.device, dtype=self.dtype)
        b = torch.randn(k, n, device=self.device, dtype=self.dtype)
        for _ in range(5):
            a @ b
        self.sync()
        times = []
        for _ in range(20):
            t = time.perf_counter()
            a @ b
            self.sync()
            times.append(time.perf_counter() - t)
        return 2 * m * k * n / statistics.median(times)

    def run_floor(self):
        """FLOPs of one training step (forward + backward into the LoRA + clip + AdamW) counted by PyTorch's
        ``FlopCounterMode`` on the eager model (matmuls and attention: what the floor is made of), divided by the
        bf16 GEMM rate measured on this GPU: at a large square GEMM (the chip's practical peak) and at the step's own
        widest projection (its tokens x width x the fused single-block projection)."""
        from torch.utils.flop_counter import FlopCounterMode

        from trainer.training.accel.compile import is_accelerated

        if self.transformer is None:
            self.build_transformer()
        if is_accelerated(self.transformer):
            self.log("floor: the transformer is compiled; FLOPs are counted on eager modules only, put floor first")
        width = self.model_cfg["num_attention_heads"] * self.model_cfg["attention_head_dim"]
        peak = self.gemm_rate(8192, 8192, 8192) if self.cuda else None
        for res in self.resolution_list():
            base = dict(impl="floor", accel="none", kind="floor", rank=16, resolution=res, checkpointing=False)

            def measure(res=res):
                s = self.project_setup(16, res, False)
                step = self.eager_step(s)
                step()  # warm (lazy inits outside the count)
                with FlopCounterMode(display=False) as counter:
                    step()
                flops = counter.get_total_flops()
                tokens = (res // 16) ** 2 + self.txt_len
                fused_out = int(width * (3 + 2 * self.model_cfg.get("mlp_ratio", 4.0)))
                shape_rate = self.gemm_rate(tokens, width, fused_out) if self.cuda else None
                s.__dict__.pop("opt", None)
                self.project_teardown(s)
                out = dict(step_tflop=round(flops / 1e12, 2), tokens=tokens)
                if self.cuda:
                    out.update(peak_gemm_tflops=round(peak / 1e12, 1), shape_gemm_tflops=round(shape_rate / 1e12, 1),
                               floor_s_at_peak=round(flops / peak, 4), floor_s_at_shape=round(flops / shape_rate, 4))
                return out

            self.case(measure, base, est_s=30)

    # ---------------------------------------------------------------- memory tiers
    def run_tiers(self, grid, accel):
        """Actual capped runs: does the configuration fit (2 steps) under a card of ``gb`` GB?"""
        if not self.cuda:
            return
        if self.transformer is None:
            self.build_transformer()
        total = torch.cuda.get_device_properties(0).total_memory
        for gb in TIERS_GB:
            for rank, res, ckpt in grid:
                base = dict(impl="project", accel=accel, kind="tier", tier_cap_gb=gb, rank=rank, resolution=res,
                            checkpointing=ckpt)
                if self.left() < 20:
                    self.add_row(**base, error="skipped: time budget")
                    continue
                torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 1e9 / total))
                s = None
                try:
                    self.free()
                    self.reset_peak()
                    s = self.project_setup(rank, res, ckpt)
                    step = self.eager_step(s)
                    step()
                    step()
                    self.add_row(**base, fits=True, **self.peaks())
                except torch.OutOfMemoryError:
                    self.add_row(**base, fits=False, error="OOM", **self.peaks())
                except Exception as err:
                    self.add_row(**base, fits=None, error=f"{type(err).__name__}: {str(err)[:200]}")
                finally:
                    torch.cuda.set_per_process_memory_fraction(1.0)
                    try:
                        if s is not None:
                            s.__dict__.pop("opt", None)
                            self.project_teardown(s)
                    except Exception:
                        pass
                    # An OOM inside peft's add_adapter leaves the model half-wrapped: start from a fresh one.
                    compiled = self.info.get("compiled")
                    self.transformer = None
                    self.free()
                    self.build_transformer()
                    if compiled:
                        self.info["compiled"] = False

    def ensure_compiled(self):
        from trainer.training.accel.attention import attention_backend
        from trainer.training.accel.compile import accelerate_transformer, is_accelerated

        if self.transformer is None:
            self.build_transformer()
        if is_accelerated(self.transformer):
            return
        kwargs = dict(force=self.tiny)
        if self.tiny:
            kwargs["backend"] = self.args.tiny_backend
        if self.args.compile_mode:
            kwargs["mode"] = self.args.compile_mode
        # The attention self-test runs at the longest sequence this bench will time (the trainer: at the job's).
        tokens = max((res // 16) ** 2 for res in self.resolution_list()) + self.txt_len
        done = accelerate_transformer(self.transformer, self.device, attention_tokens=tokens, **kwargs)
        self.info["compiled"] = done
        self.info["attention"] = attention_backend(self.transformer)
        self.log("accelerate_transformer ->", done, "attention:", self.info["attention"])

    # ---------------------------------------------------------------- driver
    def run(self):
        a = self.args
        if self.cuda:
            # The baseline is the reference script's step: PyTorch's default attention, cuDNN off as it has it. The
            # project's compiled blocks put cuDNN back first inside each block where its self-test passes.
            torch.backends.cuda.enable_cudnn_sdp(False)
        import diffusers
        import peft

        gpu = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        self.info.update(gpu=gpu, family=self.family.name, date=datetime.date.today().isoformat(), torch=torch.__version__,
                         diffusers=diffusers.__version__, peft=peft.__version__, python=platform.python_version(),
                         tiny=self.tiny, steps=a.steps, warmup=a.warmup, plan=a.plan,
                         cudnn_sdp=False if self.cuda else None, git_here=_git_head())
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            self.info.update(gpu_total_gib=round(p.total_memory / GIB, 1), sm_count=p.multi_processor_count)
        slug = "cpu-tiny" if self.tiny else _slug(gpu)
        out_dir = Path(a.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        family = "" if self.flux1 else f"-{self.family.name}"
        self.out_path = out_dir / f"{self.info['date']}-{slug}{family}{a.tag}.json"
        self.log("info", json.dumps(self.info))
        self.compiled_shapes: set = set()

        ranks = a.ranks
        resolutions = self.resolution_list()
        full = [(r, res, c) for res in resolutions for r in ranks for c in (False, True)]
        for item in [x.strip() for x in a.plan.split(",") if x.strip()]:
            label, *filters = item.split("@")
            grid = [g for g in full if all(_match(g, f) for f in filters)]
            self.log("plan item", item, "->", grid)
            if label == "baseline":
                self.run_baseline(grid)
            elif label.startswith("preview"):
                # preview | preview-compile, optionally +profile and :N (a batch of N prompts per call, as a
                # preview round renders them; the figure is per image)
                name, _, batch = label.partition(":")
                if "compile" in name:
                    self.ensure_compiled()
                accel = ("compile" if "compile" in name else "none") + ("+profile" if "profile" in name else "")
                self.run_preview(accel, batch=int(batch or 1))
            elif label.startswith("profile"):
                acc = label.split(":", 1)[1] if ":" in label else "step"
                if "compile" in acc:
                    self.ensure_compiled()
                self.run_profile(acc)
            elif label == "floor":
                self.run_floor()
            elif label == "fp8check":
                self.run_fp8check(grid)
            elif label.startswith("fp8mode:"):
                self.set_matmul(label.partition(":")[2])
            elif label == "stepcheck":
                self.run_stepcheck()
            elif label.startswith("setcheck"):  # setcheck:N, a set of N picture shapes
                self.run_stepcheck(set_of=int(label.partition(":")[2] or 4))
            elif label == "graphcheck":
                self.run_graphcheck()
            elif label.startswith("run"):
                steps, every = (int(x) for x in (label.split(":", 1)[1] if ":" in label else "500:50").split(":"))
                self.run_full(steps, every, rank=ranks[0])
            elif label == "tiers":
                from trainer.training.accel.compile import is_accelerated

                tier_grid = [(4, resolutions[0], True)]
                self.run_tiers(tier_grid, "compile" if self.transformer is not None and is_accelerated(self.transformer) else "none")
            else:
                if self.parse_label(label)["compile"]:
                    self.ensure_compiled()
                if self.parse_label(label)["graphs"] and not self.cuda:
                    continue
                self.run_project(grid, label)
        self.write()
        self.log("wrote", self.out_path)
        print_table(self.rows, self.info, a.commit)


def print_table(rows, info, commit):
    print(f"\n{info.get('gpu')}  commit {commit or '?'}  {info.get('date')}  torch {info.get('torch')} "
          f"diffusers {info.get('diffusers')} peft {info.get('peft')}")
    print(f"{'impl':8} {'accel':14} {'rank':>4} {'res':>5} {'ckpt':>5} {'s/step':>8} {'peak GiB':>9} {'tier':>6}  note")
    for r in rows:
        if r.get("kind") == "tier":
            continue
        val = r.get("s_per_step", r.get("s_per_image"))
        note = r.get("error") or ""
        if r.get("kind") == "full_run":
            val = r.get("total_s")
            note = (f"FULL RUN {r.get('steps')} steps: total {r.get('total_s')} s = steps {r.get('steps_total_s')} s "
                    f"(first {r.get('first_step_s')} s, median {r.get('median_step_s')} s) + {r.get('n_previews')} previews "
                    f"{r.get('previews_total_s')} s (first {r.get('first_preview_s')} s) + saves {r.get('saves_total_s')} s; "
                    f"graphed={r.get('graphed')} " + note)
        if r.get("kind") == "floor":
            val = r.get("floor_s_at_peak")
            note = (f"FLOOR {r.get('step_tflop')} TFLOP/step; GEMM {r.get('peak_gemm_tflops')} TFLOP/s peak, "
                    f"{r.get('shape_gemm_tflops')} at the step's shape -> {r.get('floor_s_at_shape')} s " + note)
        if r.get("kind") == "preview":
            note = f"preview {r.get('preview_steps')} steps, s/image; VAE decode {r.get('vae_decode_s')} s " + note
        if r.get("first_step_s") is not None and "compile" in r.get("accel", ""):
            note += f" first step {r['first_step_s']} s"
        if r.get("capture_s") is not None:
            note += f" capture {r['capture_s']} s"
        v = f"{val:8.3f}" if isinstance(val, (int, float)) else f"{'-':>8}"
        p = r.get("peak_gib")
        p = f"{p:9.1f}" if isinstance(p, (int, float)) else f"{'-':>9}"
        print(f"{r['impl']:8} {r.get('accel', ''):14} {r['rank']:>4} {r['resolution']:>5} {str(r['checkpointing']):>5} "
              f"{v} {p} {str(r.get('tier') or ''):>6}  {note.strip()}")
    tiers = [r for r in rows if r.get("kind") == "tier"]
    if tiers:
        print("memory caps (set_per_process_memory_fraction):")
        for r in tiers:
            print(f"  {r['tier_cap_gb']} GB  rank {r['rank']} {r['resolution']} px ckpt={r['checkpointing']}: "
                  f"{'fits' if r.get('fits') else 'does not fit'} (peak {r.get('peak_gib')} GiB)")


def _match(grid_item, f: str) -> bool:
    rank, res, ckpt = grid_item
    if f.startswith("r"):
        return rank == int(f[1:])
    if f.isdigit():
        return res == int(f)
    if f == "ckpt":
        return ckpt
    if f == "nockpt":
        return not ckpt
    raise SystemExit(f"unknown plan filter @{f}")


def _slug(name: str) -> str:
    n = name.lower()
    for key in ("h100", "h200", "a100", "l40s", "4090", "3090"):
        if key in n:
            return key
    return "".join(c if c.isalnum() else "-" for c in n).strip("-")[:24] or "gpu"


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny Flux")
    p.add_argument("--family", default="flux1", choices=("flux1", "flux2-klein"),
                   help="the model family whose full-size transformer is measured")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="", help="suffix for the JSON file name")
    p.add_argument("--commit", default=os.environ.get("BENCH_COMMIT") or _git_head())
    p.add_argument("--plan", default=DEFAULT_PLAN,
                   help="comma list run in order: baseline | none | step | graph | compile | compile+graph "
                        "(+ -castcopy) | preview[-compile][+profile][:batch] | profile[:variant] | run[:steps:every] | tiers | "
                        "fp8check (gradients vs bf16, then the base stays fp8) | fp8mode:copy|otf|dequant; "
                        "each may be filtered with @r16 @r4 @512 @1024 @ckpt @nockpt")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 4])
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--steps", type=int, default=12, help="timed steps per case (fewer if a case runs past --max-case-s)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-case-s", type=float, default=12.0)
    p.add_argument("--preview-steps", type=int, default=None,
                   help="sampler steps per preview (FLUX.1 20; klein 4, the distilled model's)")
    p.add_argument("--preview-guidance", type=float, default=None, help="FLUX.1 3.5; klein 1.0 (distilled)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip cases that would not finish within this")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--tiny-backend", default="aot_eager", help="torch.compile backend for the CPU smoke test")
    args = p.parse_args(argv)
    if args.tiny and args.plan == DEFAULT_PLAN:
        args.plan = TINY_PLAN
    if args.preview_steps is None:
        args.preview_steps = 20 if args.family == "flux1" else 4
    Bench(args).run()


if __name__ == "__main__":
    main()
