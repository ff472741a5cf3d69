"""Frozen base weights of the Flux transformer stored in 8-bit float or 4-bit NF4 while the LoRA trains on top.

Memory tiers: the bf16 transformer alone is 23.8 GB; with its block Linear layers stored as ``fp8`` it is
12.0 GB, as ``nf4`` 6.4 GB (computed from FLUX.1-dev's layer shapes), for training on 24 / 16 / 12 GB GPUs.
The LoRA itself is unchanged (peft's ``lora.Linear`` wraps a :class:`QuantizedLinear` exactly as it wraps an
``nn.Linear``; its A/B weights stay float32 and trainable) and saved checkpoints have the same keys as on a
bf16 model.

Storages (``STORAGES``):

* ``bf16`` -- no quantization: the model's own dtype.
* ``fp8`` -- ``float8_e4m3fn`` codes with one float32 scale per output row (row absmax / 448, the largest e4m3
  value), so every row uses the whole fp8 range. A plain cast would keep only a bit or two of weights near
  2**-9 (fp8's smallest subnormal) and flush smaller ones to zero: a row of ~1e-4 is lost entirely (tested).
  1 byte per weight.
* ``nf4`` -- 4-bit NormalFloat codes (the 16 levels of QLoRA, Dettmers et al. 2023: quantiles of a normal
  distribution, as in bitsandbytes) in blocks of 64 consecutive weights, each block with its absmax as a bf16
  scale; two codes per byte. 4.25 bits per weight. (bf16 scales instead of float32: 0.37 GB less on FLUX.1-dev,
  and their 0.4 % rounding is far below nf4's own ~10 % error; the block is normalised by the *rounded* scale.)

Both are pure torch: they run on the CPU (tests) and compile with ``torch.compile`` on CUDA (dequantizing is a
dtype view / a gather from a 256-entry table and a multiply, no data-dependent Python control flow).

Memory during training: a :class:`QuantizedLinear` runs through :class:`_QuantizedMatmul`, an autograd Function
that dequantizes the weight to the activations' dtype for ``F.linear`` and dequantizes it *again* in backward
to compute ``grad_input``. It saves only the packed codes and scales (which are alive anyway), never the
dequantized weight nor the input (the base weight gets no gradient): with a plain ``F.linear(x, dequantize(w))``
autograd would keep every layer's full-precision weight alive from forward to backward and the saving would
vanish exactly when it is needed. Under torch.compile the same trap reappears one level down: AOTAutograd
merges the forward's and the backward's (identical) dequantization and its partitioner then saves the
dequantized weight. So the backward's dequantize-and-matmul is an opaque custom op (``_grad_input``) the
compiler cannot look into; the forward's dequantization stays traceable and inductor fuses it into one kernel
before the matmul. (The backward's runs as plain torch ops: 3-4 passes over the weight instead of one.)

Which layers: ``quantize_linears`` quantizes the Linear layers inside the transformer blocks
(``transformer_blocks.N.`` / ``single_transformer_blocks.N.``: on FLUX.1-dev every one of them has at least
9.4 M weights; together 11.83 of its 11.90 billion). The ten layers outside the blocks -- the x / context /
timestep / guidance / pooled-text embedders, ``norm_out.linear`` and the final ``proj_out``, 64 M weights,
128 MB in bf16 -- stay in full precision: they are the network's input and output and the conditioning path every block
reads, where an error is not averaged over 57 blocks, and quantizing them would save under 0.1 GB. The rule is
by position rather than by size so that the tiny test model (every layer small) is treated like the real one.
LoRA's own ``lora_A`` / ``lora_B`` layers are never quantized.

Matmuls: a fp8 layer dequantizes by default (``matmul = "dequantize"``); ``use_fp8_matmuls`` switches the fp8 layers
whose shapes allow it to multiply in fp8 instead (``trainer.model.fp8_matmul``: the codes and scales as stored here,
the activations quantized per row), optionally with a transposed copy of the codes for the backward's GEMM.

Integration order: load the transformer on the CPU, then ``quantize_linears(transformer, storage, "cuda")``
moves it to the GPU one layer at a time (peak = quantized layers + one full-precision layer); ``add_lora``
can come before or after.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.model import fp8_matmul

STORAGES = ("bf16", "fp8", "nf4")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
NF4_BLOCK = 64
# The 16 NF4 levels (QLoRA; bitsandbytes' ``get_4bit_type("nf4")`` / its dequantize kernels), ascending.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)

_CHUNK = 1 << 22  # values quantized at once: bounds the transient memory of quantizing one big layer
# A Linear inside a transformer block (both FLUX families name their blocks so); a family picks its own rule.
BLOCK_LAYER = re.compile(r"(^|\.)(single_)?transformer_blocks\.\d+\.")


def _nf4_pair_table() -> torch.Tensor:
    """(256, 2) float32: byte b -> (level[b >> 4], level[b & 15]), so one gather decodes both codes of a byte."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([levels[b >> 4], levels[b & 15]], dim=1)


# --- quantizing (once, on the target device) ---------------------------------------------------------------

@torch.no_grad()
def _quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = weight.shape
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(out_f, dtype=torch.float32, device=weight.device)
    rows = max(1, _CHUNK // max(in_f, 1))
    for r in range(0, out_f, rows):
        w = weight[r:r + rows].float()
        amax = w.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        # clamp: values beyond 448 would become NaN in e4m3fn (it has no infinity)
        codes[r:r + rows] = (w / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)
        scale[r:r + rows] = s
    return codes, scale


@torch.no_grad()
def _quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = weight.reshape(-1)
    n = flat.numel()
    padded = n + (-n) % NF4_BLOCK
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = number of midpoints below the value
    codes = torch.empty(padded // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(padded // NF4_BLOCK, dtype=torch.bfloat16, device=weight.device)
    step = max(NF4_BLOCK, _CHUNK - _CHUNK % NF4_BLOCK)
    for start in range(0, padded, step):
        chunk = flat[start:start + step].float()
        if chunk.numel() % NF4_BLOCK:  # the last chunk of a layer whose size is not a multiple of 64
            chunk = F.pad(chunk, (0, NF4_BLOCK - chunk.numel() % NF4_BLOCK))
        blocks = chunk.view(-1, NF4_BLOCK)
        amax = blocks.abs().amax(dim=1).to(torch.bfloat16)
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        # normalise by the rounded (stored) scale, so dequantizing multiplies by exactly what was divided by
        normed = (blocks / amax.float()[:, None]).clamp_(-1.0, 1.0)
        idx = torch.bucketize(normed, midpoints, out_int32=True).to(torch.uint8).view(-1)
        codes[start // 2:(start + chunk.numel()) // 2] = (idx[0::2] << 4) | idx[1::2]
        absmax[start // NF4_BLOCK:(start + chunk.numel()) // NF4_BLOCK] = amax
    return codes, absmax


# --- dequantizing (every forward and backward) -----------------------------------------------------------

def _dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return data.view(FP8_DTYPE).to(dtype) * scale.to(dtype)[:, None]


def _dequantize_nf4(data: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, out_f: int, in_f: int,
                    dtype: torch.dtype) -> torch.Tensor:
    values = table.to(dtype).index_select(0, data.to(torch.int32))  # (bytes, 2): both codes of every byte
    values = values.view(-1, NF4_BLOCK) * absmax.to(dtype)[:, None]
    return values.view(-1)[:out_f * in_f].view(out_f, in_f)


def _dequantize(storage: str, data: torch.Tensor, scale: torch.Tensor, table: torch.Tensor | None,
                out_f: int, in_f: int, dtype: torch.dtype) -> torch.Tensor:
    if storage == "fp8":
        return _dequantize_fp8(data, scale, dtype)
    return _dequantize_nf4(data, scale, table, out_f, in_f, dtype)


@torch.library.custom_op("one_image_lora::quantized_linear_grad_input", mutates_args=())
def _grad_input(grad_out: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, table: torch.Tensor | None,
                storage: str, out_f: int, in_f: int) -> torch.Tensor:
    """``grad_out @ dequantize(W)``, re-dequantizing W. An opaque op, so that under torch.compile the backward
    visibly depends only on the packed W: the compiler's partitioner then has no reason to keep the forward's
    dequantized weight (with the dequantization traced in both passes it merges the two and saves the full
    weight -- measured: every byte of it, with inductor and with aot_eager)."""
    return grad_out.matmul(_dequantize(storage, data, scale, table, out_f, in_f, grad_out.dtype))


@_grad_input.register_fake
def _(grad_out, data, scale, table, storage, out_f, in_f):
    return grad_out.new_empty(*grad_out.shape[:-1], in_f)


class _QuantizedMatmul(torch.autograd.Function):
    """``F.linear(x, dequantize(W), bias)`` that keeps only the packed W for backward (see the module docstring).

    ``x`` and ``bias`` arrive already in the compute dtype. Gradients: ``x`` (re-dequantizing W, in the opaque
    ``_grad_input`` op) and ``bias`` if it requires one (it is frozen in this project); never ``W`` or its
    scales. The forward's dequantization stays traceable, so inductor fuses it into one kernel.
    """

    @staticmethod
    def forward(ctx, x, data, scale, table, bias, storage: str, out_f: int, in_f: int):
        weight = _dequantize(storage, data, scale, table, out_f, in_f, x.dtype)
        ctx.save_for_backward(data, scale, table)
        ctx.storage, ctx.out_f, ctx.in_f = storage, out_f, in_f
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        data, scale, table = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(grad_out, data, scale, table, ctx.storage, ctx.out_f, ctx.in_f)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_out.reshape(-1, ctx.out_f).sum(0)
        return grad_x, None, None, None, grad_bias, None, None, None


class QuantizedLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored as fp8 or nf4 (see the module docstring).

    It is an ``nn.Linear`` instance so that peft wraps it with its LoRA ``Linear``. ``weight`` is the packed
    uint8 buffer (so ``weight.device`` is right; uint8 so that ``module.to(dtype)`` never converts it and
    diffusers' ``model.dtype`` never reads it), ``scale`` its float scales; ``compute_dtype = float32`` is what
    peft's ``_get_base_layer_device_and_dtype`` reads instead of the weight's dtype, so it moves the LoRA A/B
    weights to float32 (the dtype this project trains them in), never to a quantized dtype. The bias keeps the
    linear's own dtype and is frozen. Build with :meth:`from_linear`.
    """

    compute_dtype = torch.float32
    matmul = "dequantize"  # or "fp8": set by use_fp8_matmuls

    def __init__(self, in_features: int, out_features: int, storage: str, data: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None):
        if storage not in ("fp8", "nf4"):
            raise ValueError(f"QuantizedLinear stores 'fp8' or 'nf4', not {storage!r}")
        torch.nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-precision weight
        self.in_features, self.out_features, self.storage = in_features, out_features, storage
        self.register_buffer("weight", data)
        self.register_buffer("scale", scale)
        # The nf4 decoding table: a (tiny) buffer so it lives on the layer's device (no host copy in forward,
        # which CUDA-graph capture would refuse), not saved in the state dict.
        self.register_buffer("table", _nf4_pair_table().to(data.device) if storage == "nf4" else None,
                             persistent=False)
        # fp8 matmuls' backward reads the codes transposed; None: transposed on the fly (not in the state dict)
        self.register_buffer("weight_t", None, persistent=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, storage: str, device=None) -> "QuantizedLinear":
        """Quantize ``linear`` on ``device`` (default: where its weight is). Only this one layer's weight is
        copied to ``device`` in full precision, and dropped again once quantized."""
        if isinstance(linear, QuantizedLinear):
            raise TypeError("this layer is already quantized")
        if storage not in ("fp8", "nf4"):
            raise ValueError(f"storage must be 'fp8' or 'nf4' to quantize, not {storage!r}")
        device = torch.device(device) if device is not None else linear.weight.device
        weight = linear.weight.detach().to(device)
        data, scale = (_quantize_fp8 if storage == "fp8" else _quantize_nf4)(weight)
        del weight
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(linear.in_features, linear.out_features, storage, data, scale, bias)

    def reset_parameters(self) -> None:
        raise RuntimeError("a QuantizedLinear holds frozen quantized weights; it cannot be re-initialised")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compute in the activations' dtype, or in autocast's (bf16 on the GPU): the weight is dequantized straight
        # to it, so autocast has nothing left to cast.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.matmul == "fp8":
            return fp8_matmul.fp8_linear(x.to(dtype), self.weight, self.scale, self.weight_t, bias)
        return _QuantizedMatmul.apply(x.to(dtype), self.weight, self.scale, self.table, bias, self.storage,
                                      self.out_features, self.in_features)

    def extra_repr(self) -> str:
        matmul = ", matmul=fp8" if self.matmul == "fp8" else ""
        return f"{super().extra_repr()}, storage={self.storage}{matmul}"


def dequantize(layer: torch.nn.Linear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's weight in full precision (``dtype``): decoded for a QuantizedLinear, a copy otherwise."""
    layer = getattr(layer, "base_layer", layer)  # a peft LoRA wrapper: its base layer
    if isinstance(layer, QuantizedLinear):
        with torch.no_grad():
            return _dequantize(layer.storage, layer.weight, layer.scale, layer.table, layer.out_features,
                               layer.in_features, dtype)
    return layer.weight.detach().to(dtype, copy=True)


def use_fp8_matmuls(module: torch.nn.Module, transposed_copy: bool = False) -> dict:
    """Switch every fp8-stored QuantizedLinear in ``module`` whose shapes fit (``fp8_matmul.fits``) to fp8 matmuls,
    in place. ``transposed_copy``: keep the transposed codes for backward (one more byte per weight: worth it where
    memory allows, the full tier; without it each backward transposes them). Returns ``{"fp8_matmuls", "kept"}``:
    how many layers now multiply in fp8 and how many fp8 layers keep dequantizing (shapes that don't fit)."""
    report = {"fp8_matmuls": 0, "kept": 0}
    for layer in module.modules():
        if not isinstance(layer, QuantizedLinear) or layer.storage != "fp8":
            continue
        if not fp8_matmul.fits(layer.in_features, layer.out_features):
            report["kept"] += 1
            continue
        layer.matmul = "fp8"
        layer.weight_t = fp8_matmul.transposed_codes(layer.weight) if transposed_copy else None
        report["fp8_matmuls"] += 1
    return report


def _is_lora_path(name: str) -> bool:
    return "lora_" in name


def outside_blocks(name: str, layer: torch.nn.Module) -> bool:
    """The default ``skip``: keep layers outside the transformer blocks in full precision (module docstring)."""
    return BLOCK_LAYER.search(name) is None


def _linear_bytes(layer: torch.nn.Linear) -> int:
    if isinstance(layer, QuantizedLinear):
        transposed = 0 if layer.weight_t is None else layer.weight_t.nbytes
        return layer.weight.nbytes + layer.scale.nbytes + transposed
    return layer.weight.nbytes


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the stored base weights of every Linear layer in ``module`` (quantized: codes + scales), biases
    and LoRA layers not counted."""
    return sum(_linear_bytes(m) for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not _is_lora_path(n))


def quantize_linears(module: torch.nn.Module, storage: str, device, *,
                     skip: Callable[[str, torch.nn.Module], bool] = outside_blocks) -> dict:
    """Replace, in place, each Linear layer of ``module`` by a QuantizedLinear quantized on ``device``, then move
    the rest of ``module`` to ``device``. Layers are moved one at a time, so a CPU model can be walked onto a GPU
    that could not hold it in full precision.

    Skipped: layers already quantized, LoRA's own layers (any path containing ``lora_``), and those for which
    ``skip(name, layer)`` is true (default: outside the transformer blocks). With peft's LoRA already added the
    wrapped ``base_layer`` is what gets replaced. ``storage="bf16"`` only moves the module.

    Returns ``{"storage", "quantized", "kept", "bytes_before", "bytes_after", "kept_bytes"}``: how many layers
    were quantized and their weight bytes before and after, how many base Linear layers stayed in full precision
    and their bytes.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, not {storage!r}")
    device = torch.device(device)
    report = {"storage": storage, "quantized": 0, "kept": 0, "bytes_before": 0, "bytes_after": 0, "kept_bytes": 0}
    # Names first, modules looked up one at a time: no list holds on to the replaced full-precision layers.
    names = [n for n, m in module.named_modules()
             if n and isinstance(m, torch.nn.Linear) and not _is_lora_path(n)]  # n == "": the root cannot be replaced
    for name in names:
        layer = module.get_submodule(name)
        if isinstance(layer, QuantizedLinear):
            continue
        if storage == "bf16" or skip(name, layer):
            report["kept"] += 1
            report["kept_bytes"] += _linear_bytes(layer)
            continue
        quantized = QuantizedLinear.from_linear(layer, storage, device)
        report["quantized"] += 1
        report["bytes_before"] += _linear_bytes(layer)
        report["bytes_after"] += _linear_bytes(quantized)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, quantized)
        del layer, quantized
    module.to(device)
    return report
