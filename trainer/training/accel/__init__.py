"""Optional speed-ups for the Flux transformer on a CUDA GPU; everything here falls back to doing nothing.

- ``compile``: regional compilation of the transformer blocks (and ``restore_eager``, its fallback);
- ``attention``: cuDNN's fused attention first in every block, where a self-test in a child process finds it works;
- ``graphs``: the preview forward replayed from CUDA graphs, and the bf16 numerics previews share with training.

The training step that uses them (CUDA-graph replay of forward + backward | clip + AdamW) is
``trainer.training.step``. Measured numbers and what each change bought: ``bench/RESULTS.md``.
"""
