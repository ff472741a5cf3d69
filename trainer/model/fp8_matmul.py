"""The frozen base's matmuls in 8-bit float ("W8A8"): fp8 weights times activations quantized on the fly.

Why: the fp8-stored tiers (``trainer.model.quantize``) turned every weight back into bf16 inside each matmul, forward
and backward, so a 24 GB card paid for the weight three times (read fp8, write bf16, read bf16) and then ran a bf16
GEMM. Cards with fp8 tensor cores (compute capability 8.9 and newer: RTX 40xx, L4, L40, H100/H200) multiply fp8
operands at twice the bf16 rate, and the weight is already fp8. So a layer in ``fp8`` matmul mode runs
``torch._scaled_mm`` on:

* the weight's own codes and its per-output-row scales (``quantize``'s storage, unchanged), and
* the activations quantized per row (one float32 scale per token: row absmax / 448), fused by inductor into the
  kernel that produced them.

Backward: the base weight is frozen, so only ``grad_input = grad_out @ W`` is computed. cuBLASLt's fp8 GEMMs take both
operands reduction-dim-contiguous ("TN"), so this needs ``W`` transposed: the full tier keeps a transposed copy of the
codes (fp8 + its transpose is the same memory as bf16), the small tiers transpose the codes on the fly (one fp8 pass
over the layer, cheaper than the bf16 dequantization it replaces). W's per-row scales lie along this GEMM's reduction
dimension, where ``_scaled_mm`` takes no scale, so they are folded into ``grad_out`` (one multiply per column) before
it is quantized per row like the activations. Both operands are e4m3: with a scale per row, e4m3's 3 mantissa bits
keep the gradient better than e5m2's 2 (the range e5m2 buys is what the per-row scale already gives).

What it costs in accuracy: e4m3 rounds each operand to ~2-3 % (bf16: 0.4 %), but the errors are independent across the
reduction, and the LoRA's gradient, summed over every layer and token, agrees with the bf16 step's to the cosine the
benchmark prints (bench/RESULTS.md); a tiny model's loss curve is compared in ``tests/test_fp8_matmul.py``.

Where it does not apply, the layer keeps dequantizing (``fits``): feature counts that are not multiples of 16
(cuBLASLt's rule), GPUs without fp8 tensor cores (``supported``), and ``ONE_IMAGE_LORA_FP8_MATMUL=0``. The CPU runs the
same ``torch._scaled_mm`` path when asked (PyTorch implements the row-scaled fp8 GEMM there too): the tests do.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
ALIGN = 16  # cuBLASLt's fp8 GEMMs: both feature counts a multiple of 16
MIN_CAPABILITY = (8, 9)  # Ada Lovelace: the first NVIDIA GPUs with fp8 tensor cores


_probed: dict[str, bool] = {}  # device -> did ``probe`` pass there (once per process)


def supported(device) -> bool:
    """Does the trainer multiply in fp8 on ``device``? A CUDA GPU of compute capability 8.9+ (an RTX 3090 or A10G,
    8.6, cannot) on which ``probe`` passes. Not the CPU: ``fp8_linear`` runs there (the tests), but the tiny model
    gains nothing from it."""
    device = torch.device(device)
    if not (device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY):
        return False
    key = str(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    if key not in _probed:
        _probed[key] = probe(device)
    return _probed[key]


def probe(device) -> bool:
    """One small row-scaled fp8 product with a bias on ``device``, checked against float32 maths. Measured only on
    an H200 (compute capability 9.0): on an 8.9 card, a PyTorch build or driver without the row-scaled kernels
    raises here, and the layers then keep dequantizing (with a log line) rather than fail the job."""
    try:
        g = torch.Generator().manual_seed(0)
        a, b, bias = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
        a_codes, a_scale = quantize_rows(a.to(device))
        b_codes, b_scale = quantize_rows(b.to(device))
        out = _row_scaled_mm(a_codes, a_scale, b_codes, b_scale.view(-1), bias.to(device, torch.bfloat16),
                             torch.bfloat16).float().cpu()
        want = (a_codes.float() * a_scale).cpu() @ (b_codes.float() * b_scale).cpu().T + bias.bfloat16().float()
        error = float((out - want).norm() / want.norm())
    except Exception as err:  # not a failure of the job: the bf16 way still works
        log.warning("fp8 matmuls are not available on %s (%s: %s); the base multiplies in bf16", device,
                    type(err).__name__, str(err)[:200])
        return False
    if not error < 0.01:  # bf16 output rounding is ~0.3 %; a wrong scale or layout is far off
        log.warning("fp8 matmuls on %s gave a relative error of %.3g in a self-test; the base multiplies in bf16",
                    device, error)
        return False
    return True


def fits(in_features: int, out_features: int) -> bool:
    """Shapes the fp8 GEMM takes, forward (K = in) and backward (K = out) alike."""
    return in_features % ALIGN == 0 and out_features % ALIGN == 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes e4m3 [M, K], scale float32 [M, 1]) with ``codes * scale ≈ x``: each row spans e4m3's whole range.
    A row of zeros gets scale 1 (codes 0). Pure torch: under torch.compile inductor fuses it into the producer."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    # clamp: a value rounding past 448 would be NaN in e4m3fn (it has no infinity)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def transposed_codes(codes: torch.Tensor) -> torch.Tensor:
    """The [in, out] copy of a layer's [out, in] fp8 codes (stored as uint8) that the backward's GEMM reads."""
    return codes.t().contiguous()


def _row_scaled_mm(a_codes: torch.Tensor, a_scale: torch.Tensor, b_codes_nk: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(a_codes * a_scale) @ (b_codes_nk * b_scale[:, None]).T`` (+ bias): A [M, K] row-scaled, B given as [N, K]."""
    return torch._scaled_mm(a_codes, b_codes_nk.view(E4M3).t(), scale_a=a_scale, scale_b=b_scale.view(1, -1),
                            bias=bias, out_dtype=out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with ``W = codes * scale[:, None]`` frozen, both GEMMs in fp8 (module docstring).

    Saves only the weight's codes and scales (alive anyway) and the transposed copy when there is one: never the
    input (the base weight gets no gradient) nor anything in bf16.
    """

    @staticmethod
    def forward(ctx, x, codes, scale, codes_t, bias, out_f: int, in_f: int):
        lead = x.shape[:-1]
        x_codes, x_scale = quantize_rows(x.reshape(-1, in_f))
        out = _row_scaled_mm(x_codes, x_scale, codes, scale, bias, x.dtype)
        ctx.save_for_backward(codes, scale, codes_t)
        ctx.out_f, ctx.in_f = out_f, in_f
        return out.view(*lead, out_f)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale, codes_t = ctx.saved_tensors
        grad_x = grad_bias = None
        flat = grad_out.reshape(-1, ctx.out_f)
        if ctx.needs_input_grad[0]:
            g_codes, g_scale = quantize_rows(flat.float() * scale)  # W's row scales, folded into grad_out's columns
            w_t = codes_t if codes_t is not None else transposed_codes(codes)  # [in, out]: K = out contiguous
            ones = torch.ones(ctx.in_f, device=grad_out.device, dtype=torch.float32)
            grad_x = _row_scaled_mm(g_codes, g_scale, w_t, ones, None, grad_out.dtype)
            grad_x = grad_x.view(*grad_out.shape[:-1], ctx.in_f)
        if ctx.needs_input_grad[4]:
            grad_bias = flat.sum(0)
        return grad_x, None, None, None, grad_bias, None, None


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, codes_t: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W = codes.view(e4m3) * scale[:, None]`` (codes uint8 [out, in], scale float32 [out]);
    ``codes_t``: the transposed codes if kept, else the backward transposes them itself. Output in ``x``'s dtype."""
    out_f, in_f = codes.shape
    return _Fp8Matmul.apply(x, codes, scale, codes_t, bias, out_f, in_f)
