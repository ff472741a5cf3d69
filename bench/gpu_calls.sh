#!/usr/bin/env bash
# The device calls of 2026-12-03 (issues 12, 13, 14, 18), one per argument, each within one 600 s device call:
#   bash bench/gpu_calls.sh steps COMMIT   FLUX.1 baseline vs shipped (after the refactor) + klein step figures
#   bash bench/gpu_calls.sh jobs COMMIT    klein 500-step job with previews, klein memory tiers as whole jobs,
#                                          FLUX.1 through diffusers' attention dispatcher
# Wheels the GPU image lacks travel in .whl/ (carry it); results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; C=${2:-unknown}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "$1" in
steps)
  timeout 250 python3 bench/flux_bench.py --out-dir "$OUT" --commit "$C" --tag=-after-refactor \
    --plan baseline@nockpt,compile+graph@nockpt --ranks 16 --resolutions 512 --budget-s 230 2>&1 | tail -6
  timeout 330 python3 bench/flux_bench.py --family flux2-klein --out-dir "$OUT" --commit "$C" \
    --plan baseline@nockpt,floor,compile+graph@nockpt,preview-compile:3,compile+graph@ckpt@512 --ranks 16 \
    --resolutions 512 1024 --budget-s 310 2>&1 | tail -14 ;;
jobs)
  timeout 200 python3 bench/flux_bench.py --family flux2-klein --out-dir "$OUT" --commit "$C" --tag=-job \
    --plan run:500:50 --ranks 16 --resolutions 512 --budget-s 190 2>&1 | tail -4
  timeout 380 python3 bench/tier_bench.py --family flux2-klein --tiers full,24gb,16gb,12gb --steps 40 --save-every 20 \
    --commit "$C" --out "$OUT/$(date +%F)-h200-flux2-klein-tiers.json" 2>&1 | cut -c1-600 ;;
esac
case "$1" in
flux1)
  timeout 280 python3 bench/flux_bench.py --out-dir "$OUT" --commit "$C" --tag=-after-refactor \
    --plan baseline@nockpt,compile+graph@nockpt --ranks 16 --resolutions 512 --budget-s 260 2>&1 | tail -6
  ONE_IMAGE_LORA_ATTENTION=flash DIFFUSERS_ATTN_BACKEND=_native_cudnn timeout 250 python3 bench/flux_bench.py \
    --out-dir "$OUT" --commit "$C" --tag=-after-refactor-dispatcher --plan compile+graph@nockpt --ranks 16 \
    --resolutions 512 --budget-s 230 2>&1 | tail -4 ;;
esac
case "$1" in
sets)  # issue 14: one picture vs a set of 4 of different shapes, the same job otherwise (full tier, FLUX.1-dev);
       # first the set's per-shape CUDA graphs against eager steps (same noise: losses and LoRA should agree)
  timeout 150 python3 bench/flux_bench.py --out-dir "$OUT" --commit "$C" --tag=-setcheck --plan setcheck:4 \
    --ranks 16 --resolutions 512 --budget-s 140 2>&1 | tail -3
  for n in ${IMAGES:-1 4}; do
    timeout $((n == 1 ? 170 : 270)) python3 bench/tier_bench.py --tiers full --steps 60 --save-every 60 --images $n \
      --commit "$C" --out "$OUT/$(date +%F)-h200-set-$n-images-graphs.json" 2>&1 | cut -c1-500
  done ;;
esac
case "$1" in
demo)  # issue 18: train the shapes-demo model (scripts/train_shapes_demo.py), about 8 minutes in all
  # The log goes to $OUT as it is written: a call cut at its limit still brings it back (a `| tail` brought nothing).
  timeout 570 python3 scripts/train_shapes_demo.py --out "$OUT" --vae-seconds 160 --transformer-seconds 270 \
    > "$OUT/demo-log.txt" 2>&1; grep -v "Loading" "$OUT/demo-log.txt" | tail -40 ;;
esac
case "$1" in
grow)  # issue 15: candidates per minute, FLUX.1-dev checkpoint source and FLUX.2 [klein] reference editing, 512 px
  for family in flux1 flux2-klein; do
    timeout 280 python3 bench/grow_bench.py --family "$family" --count 8 --commit "$C" \
      --out "$OUT/$(date +%F)-h200-grow-$family.json" > "$OUT/grow-$family-log.txt" 2>&1
    grep "ROW\|Error\|error" "$OUT/grow-$family-log.txt" | cut -c1-700
  done ;;
esac
case "$1" in
asneeded)  # issue 16 goal 5: FLUX.1 tiers with "as-needed" checkpointing as whole jobs under their caps, and the 24gb
           # tier with every block checkpointed (as shipped before) in the same call for the comparison
  timeout 240 python3 bench/tier_bench.py --tiers 24gb --steps 30 --save-every 15 --commit "$C" \
    --out "$OUT/$(date +%F)-h200-tier-24gb-as-needed.json" 2>&1 | cut -c1-1200
  timeout 200 python3 bench/tier_bench.py --tiers 24gb --checkpointing on --steps 30 --save-every 15 --commit "$C" \
    --out "$OUT/$(date +%F)-h200-tier-24gb-every-block.json" 2>&1 | cut -c1-700
  timeout 200 python3 bench/tier_bench.py --tiers ${TIERS:-12gb} --steps 30 --save-every 15 --commit "$C" \
    --out "$OUT/$(date +%F)-h200-tiers-as-needed.json" 2>&1 | cut -c1-1200 ;;
esac
case "$1" in
hires)  # issue 16 goal 2, "measure today's first": the shipped full-tier step at 1024 px, then the plain one
  timeout 200 python3 bench/flux_bench.py --out-dir "$OUT" --commit "$C" --tag=-1024 \
    --plan compile+graph@nockpt,baseline@nockpt --ranks 16 --resolutions 1024 --steps 8 --warmup 3 \
    --budget-s 185 2>&1 | tail -8 ;;
esac
case "$1" in
fp8)  # issue 16 goals 1-3: the frozen base multiplied in fp8 (trainer/model/fp8_matmul.py) against today's bf16 step,
      # in one run: bf16 step + preview round, gradient agreement, then fp8 with a transposed copy / on the fly /
      # dequantized, the fp8 preview round (PSNR vs bf16), and the fp8 step at 1024 px
  python3 - <<'PY' || exit 1
import torch, torch.nn.functional as F
from trainer.model.quantize import QuantizedLinear, use_fp8_matmuls, dequantize
lin = torch.nn.Linear(3072, 12288, device="cuda", dtype=torch.bfloat16)
q = QuantizedLinear.from_linear(lin, "fp8"); use_fp8_matmuls(q, transposed_copy=False)
x = torch.randn(1536, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    y = q(x)
g = torch.randn_like(y); y.backward(g)
ref = F.linear(x.detach(), dequantize(q, torch.bfloat16), q.bias.bfloat16())
rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
print("smoke: fwd rel", rel(y, ref), "grad rel", rel(x.grad, g @ dequantize(q, torch.bfloat16)), flush=True)
PY
  timeout 570 python3 bench/flux_bench.py --out-dir "$OUT" --commit "$C" --tag=-fp8 --ranks 16 --resolutions 512 1024 \
    --plan "compile+graph@nockpt@512,preview-compile:3,fp8check,fp8mode:copy,compile+graph@nockpt@512,preview-compile:3,fp8mode:otf,compile+graph@nockpt@512,fp8mode:dequant,compile+graph@nockpt@512,fp8mode:copy,compile+graph@nockpt@1024" \
    --budget-s 550 > "$OUT/fp8-log.txt" 2>&1
  grep -v "Warning\|warn" "$OUT/fp8-log.txt" | tail -32 | cut -c1-900 ;;
esac
case "$1" in
fp8tiers)  # issue 16 goal 5: the fp8-stored tiers with fp8 matmuls as whole jobs under their caps (FLUX.1 24gb
           # as-needed, 16gb every block; klein 12gb), as tier_bench ran them before (30 steps, saves + previews)
  timeout 230 python3 bench/tier_bench.py --tiers 24gb --steps 30 --save-every 15 --commit "$C" \
    --out "$OUT/$(date +%F)-h200-tier-24gb-fp8-matmul.json" 2>&1 | grep ROW | cut -c1-1500
  timeout 200 python3 bench/tier_bench.py --tiers 16gb --steps 30 --save-every 15 --commit "$C" \
    --out "$OUT/$(date +%F)-h200-tier-16gb-fp8-matmul.json" 2>&1 | grep ROW | cut -c1-1500
  timeout 140 python3 bench/tier_bench.py --family flux2-klein --tiers 12gb --steps 30 --save-every 15 --commit "$C" \
    --out "$OUT/$(date +%F)-h200-flux2-klein-tier-12gb-fp8-matmul.json" 2>&1 | grep ROW | cut -c1-1500 ;;
esac
