#!/usr/bin/env python3
"""Two kernel-level questions behind the step's remaining time (bench/RESULTS.md, "Where the 130 ms goes"):

attention  Flux's attention at the training shape (batch 1, 24 heads, 1536 tokens at 512 px, head dim 128) and
           the preview shape (batch 3, forward only), through each SDPA backend: flash (the default), cuDNN with
           diffusers' layout (q/k/v as permuted views of [B, S, H, D]) and with contiguous [B, H, S, D] tensors.
           Forward and forward+backward time, and the error against the flash result. cuDNN's backward hit an
           illegal memory access on the first H100 image (bench/RESULTS.md, 2026-11-22), which kills the CUDA context,
           so every cuDNN case runs in its own child process.
fp8        every frozen-base GEMM of one training step (the 19 double and 38 single blocks' Linear layers, FLUX.1-dev
           shapes) in bf16 against ``torch._scaled_mm`` with float8 e4m3 operands and one scale per row (the
           activation quantized on the fly, the weight once): the forward (x @ W^T) and the backward's
           grad_input (g @ W), summed over the step with each shape's count. The activation's quantization is
           timed with the matmul (compiled, one fused kernel per call).

    python bench/kernel_probe.py --out bench/results/<date>-<gpu>-kernels.json
Figures are medians of CUDA-event timings after warm-up. Nothing here is used by the trainer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 24, 128
TOKENS_512 = 1024 + 512  # image tokens at 512 px + T5 tokens

# (M rows = tokens through the layer, in_features, out_features, how many such layers per forward)
FLUX_GEMMS = [
    (1024, 3072, 3072, 19 * 4),   # double blocks, image stream: to_q, to_k, to_v, to_out.0
    (1024, 3072, 12288, 19),      # ff.net.0.proj
    (1024, 12288, 3072, 19),      # ff.net.2
    (512, 3072, 3072, 19 * 4),    # text stream: add_q/k/v_proj, to_add_out
    (512, 3072, 12288, 19),       # ff_context.net.0.proj
    (512, 12288, 3072, 19),       # ff_context.net.2
    (1536, 3072, 3072, 38 * 3),   # single blocks: to_q, to_k, to_v
    (1536, 3072, 12288, 38),      # proj_mlp
    (1536, 15360, 3072, 38),      # proj_out
]
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def bench(fn, warmup=5, reps=30, graph: bool = False) -> float:
    """Median ms per call. ``graph``: 20 calls captured in one CUDA graph and replayed, so launch gaps (the step
    runs from CUDA graphs in the trainer) don't count."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20):
                fn()
        times = []
        for _ in range(reps // 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 20)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ attention
def attention_case(backend: str, layout: str, batch: int, backward: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    shape = (batch, TOKENS_512, HEADS, HEAD_DIM)  # diffusers' [B, S, H, D]
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def inputs():
        qq, kk, vv = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
        views = [t.permute(0, 2, 1, 3) for t in (qq, kk, vv)]
        if layout == "contiguous":
            views = [t.contiguous() for t in views]
        return (qq, kk, vv), views

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    grad_out = torch.randn(batch, HEADS, TOKENS_512, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    def run(kind):
        leaves, (qv, kv, vv) = inputs()
        with sdpa_kernel([kinds[kind]]):
            out = F.scaled_dot_product_attention(qv, kv, vv)
            if backward:
                out.backward(grad_out)
        return out, leaves

    ref_out, ref_leaves = run("flash")
    out, leaves = run(backend)
    torch.cuda.synchronize()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    row = dict(backend=backend, layout=layout, batch=batch, backward=backward, out_rel_err=rel(out, ref_out))
    if backward:
        row["grad_rel_err"] = max(rel(a.grad, b.grad) for a, b in zip(leaves, ref_leaves))
    row["ms"] = round(bench(lambda: run(backend)), 3)  # includes cloning the inputs: compare backends, not to the floor
    flops = 4 * batch * HEADS * TOKENS_512 ** 2 * HEAD_DIM * (3.5 if backward else 1.0)
    row["tflops"] = round(flops / row["ms"] / 1e9, 1)
    return row


def attention_rows() -> list[dict]:
    rows = []
    cases = [(b, lay, bw) for b, bw in ((1, True), (1, False), (3, False)) for lay in ("views", "contiguous")]
    for backend in ("flash", "efficient", "cudnn"):
        for batch, layout, backward in cases:
            if backend != "cudnn" and layout == "contiguous":
                continue
            args = [sys.executable, __file__, "--attention-case", f"{backend},{layout},{batch},{int(backward)}"]
            done = subprocess.run(args, capture_output=True, text=True, timeout=300)
            line = [x for x in done.stdout.splitlines() if x.startswith("{")]
            if done.returncode == 0 and line:
                rows.append(json.loads(line[-1]))
            else:
                rows.append(dict(backend=backend, layout=layout, batch=batch, backward=backward,
                                 error=(done.stderr or done.stdout)[-400:]))
            print("attention", rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ fp8 GEMMs
def _rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).to(E4M3), scale


def fp8_rows() -> list[dict]:
    quantize = torch.compile(_rowwise_fp8, dynamic=False)

    def fwd_fp8(x, w8, w_scale, fast):
        x8, xs = quantize(x)
        return torch._scaled_mm(x8, w8.t(), xs, w_scale.t(), out_dtype=torch.bfloat16, use_fast_accum=fast)

    rows = []
    totals = {"bf16_fwd": 0.0, "bf16_grad_in": 0.0, "fp8_fwd": 0.0, "fp8_fwd_fastacc": 0.0, "fp8_grad_in": 0.0,
              "fp8_mm_only": 0.0}
    for m, k, n, count in FLUX_GEMMS:
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w8, ws = _rowwise_fp8(w)            # [N, K], scale per output row: forward x @ W^T
        wt8, wts = _rowwise_fp8(w.t().contiguous())  # [K, N], scale per input column of W: backward g @ W
        x8, xs = _rowwise_fp8(x)
        t = {
            "bf16_fwd": bench(lambda: F.linear(x, w), graph=True),
            "bf16_grad_in": bench(lambda: g @ w, graph=True),
            "fp8_fwd": bench(lambda: fwd_fp8(x, w8, ws, False), graph=True),
            "fp8_fwd_fastacc": bench(lambda: fwd_fp8(x, w8, ws, True), graph=True),
            "fp8_grad_in": bench(lambda: fwd_fp8(g, wt8, wts, False), graph=True),
            # the matmul alone, operands already in fp8 (the floor of this route)
            "fp8_mm_only": bench(lambda: torch._scaled_mm(x8, w8.t(), xs, ws.t(), out_dtype=torch.bfloat16,
                                                          use_fast_accum=True), graph=True),
        }
        ref = F.linear(x, w).float()
        err = float((fwd_fp8(x, w8, ws, False).float() - ref).norm() / ref.norm())
        ref_g = (g @ w).float()
        err_g = float((fwd_fp8(g, wt8, wts, False).float() - ref_g).norm() / ref_g.norm())
        row = dict(m=m, k=k, n=n, count=count, fwd_rel_err=round(err, 4), grad_in_rel_err=round(err_g, 4),
                   **{key: round(v, 4) for key, v in t.items()})
        row["bf16_fwd_tflops"] = round(2 * m * k * n / t["bf16_fwd"] / 1e9, 1)
        row["fp8_fwd_tflops"] = round(2 * m * k * n / t["fp8_fwd"] / 1e9, 1)
        for key in totals:
            totals[key] += t[key] * count
        rows.append(row)
        print("fp8", row, flush=True)
    step = {key: round(v, 2) for key, v in totals.items()}
    print("per training step (ms, forward + grad_input of the frozen base):", step, flush=True)
    return rows + [dict(kind="step_total_ms", **step)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--only", choices=("attention", "fp8"), default=None)
    p.add_argument("--attention-case", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.attention_case:
        backend, layout, batch, backward = a.attention_case.split(",")
        print(json.dumps(attention_case(backend, layout, int(batch), bool(int(backward)))))
        return
    info = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    result = dict(info=info)
    if a.only in (None, "attention"):
        result["attention"] = attention_rows()
    if a.only in (None, "fp8"):
        result["fp8"] = fp8_rows()
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
