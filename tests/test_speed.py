"""trainer.training.accel on the CPU: the cuDNN-first wrapper, its compile path, the self-test's failure, the
regional compile through diffusers (and its fallback), and the Runtime's switches.

cuDNN attention itself needs an NVIDIA GPU; its speed and its agreement with flash attention at Flux's shapes are
measured by bench/kernel_probe.py and bench/flux_bench.py (bench/RESULTS.md). Here the wrapper runs on the CPU,
where SDPA ignores the cuDNN entry and uses its own kernels: what is checked is that every block's attention runs
under the cuDNN-first priority, that nothing else changes, and that the wrapper survives torch.compile.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from tests.test_quantize import flux_inputs, flux_loss, tiny_transformer
from trainer.runtime import Runtime
from trainer.training.accel import attention, compile as regional


def _priority_seen_by_attention(transformer) -> list[int]:
    """The first SDPA backend in PyTorch's priority order, read as each block's attention module starts."""
    seen = []
    handles = [block.attn.register_forward_pre_hook(lambda *_: seen.append(torch._C._get_sdp_priority_order()[0]))
               for block in attention.flux_blocks(transformer)]
    try:
        flux_loss(transformer, seed=1)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_cudnn_first_wrapper_sets_the_priority_inside_every_block_and_changes_nothing_else():
    transformer = tiny_transformer()
    blocks = attention.flux_blocks(transformer)
    cudnn = SDPBackend.CUDNN_ATTENTION.value
    outside = torch._C._get_sdp_priority_order()
    assert outside[0] != cudnn  # PyTorch's own order puts flash first
    assert set(_priority_seen_by_attention(transformer)) == {outside[0]}

    inputs, _ = flux_inputs(3)
    before = transformer(**inputs)[0]
    attention.prefer_cudnn_attention(transformer)
    assert attention.attention_backend(transformer) == "cudnn"
    seen = _priority_seen_by_attention(transformer)
    assert len(seen) == len(blocks) and set(seen) == {cudnn}
    assert torch._C._get_sdp_priority_order() == outside  # restored after each block
    torch.testing.assert_close(transformer(**inputs)[0], before, rtol=0, atol=0)

    # Gradients flow through the wrapper (training, and gradient checkpointing's recomputation, call it too).
    transformer.enable_gradient_checkpointing()
    flux_loss(transformer, seed=2).backward()
    assert all(p.grad is not None for p in blocks[0].parameters())

    attention.restore_attention(transformer)
    assert attention.attention_backend(transformer) == "default"
    assert set(_priority_seen_by_attention(transformer)) == {outside[0]}


def test_cudnn_first_wrapper_is_traced_by_torch_compile():
    """The choice must be inside the compiled graphs (dynamo records the ``sdpa_kernel`` context), so it is made
    when a block is traced and the compile caches key on it; the compiled model computes the same; and the compile
    fallback (``restore_eager``) removes the wrapper."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    reference = tiny_transformer()
    transformer = tiny_transformer()
    attention.prefer_cudnn_attention(transformer)
    assert regional.accelerate_transformer(transformer, "cpu", force=True, backend=recording_backend)
    inputs, _ = flux_inputs(4)
    torch.testing.assert_close(transformer(**inputs)[0], reference(**inputs)[0], rtol=1e-5, atol=1e-6)
    assert graphs and all("sdpa_kernel" in code for code in graphs)
    regional.restore_eager(transformer)
    assert attention.attention_backend(transformer) == "default"
    assert all("forward" not in block.__dict__ for block in attention.flux_blocks(transformer))

    graphs.clear()
    plain = tiny_transformer()
    assert regional.accelerate_transformer(plain, "cpu", force=True, backend=recording_backend)
    plain(**inputs)
    assert graphs and not any("sdpa_kernel" in code for code in graphs)
    torch._dynamo.reset()


def test_off_cuda_the_choice_is_always_the_default(use_runtime):
    for setting in ("auto", "cudnn", "flash"):
        assert attention.choose_attention("cpu", 1536, Runtime(attention=setting)) == "default"
        use_runtime(attention=setting)  # the process's Runtime, when none is given
        assert attention.choose_attention("cpu", 1536) == "default"


def test_the_self_test_verdicts(monkeypatch, use_runtime):
    """A child that crashes (as cuDNN's backward did on one H100 image) or says nothing means the default attention,
    remembered per sequence length and GPU; a child that never finishes is not remembered; one that prints its ok
    line means cuDNN. (The child itself needs a GPU: bench/RESULTS.md has it passing on an H200.)"""
    import subprocess

    compile(attention._SELF_TEST, "<self-test>", "exec")  # at least valid Python
    calls, answers = [], []

    def fake_run(args, **kwargs):
        calls.append(args[-2:])
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return subprocess.CompletedProcess(args, answer[0], stdout=answer[1], stderr="")

    monkeypatch.setattr(attention.subprocess, "run", fake_run)
    monkeypatch.setattr(attention, "_attention_verdicts", {})
    answers[:] = [(-11, ""), subprocess.TimeoutExpired("python", 1), (0, "cudnn attention ok\n"), (0, "")]
    assert attention.cudnn_attention_works(64, 0) is False  # crashed (killed by a signal)
    assert attention.cudnn_attention_works(64, 0) is False and calls == [["64", "0"]]  # remembered
    assert attention.cudnn_attention_works(80, 1) is False  # timed out: not remembered...
    assert attention.cudnn_attention_works(80, 1) is True and calls[-1] == ["80", "1"]  # ...so asked again
    assert attention.cudnn_attention_works(96, 0) is False  # finished without the ok line
    assert attention._attention_verdicts == {(64, 0): False, (80, 1): True, (96, 0): False}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend, to reach the verdict
    use_runtime(attention="auto")
    assert attention.choose_attention("cuda:0", 64) == "default"
    assert attention.choose_attention("cuda:1", 80) == "cudnn"
    assert attention.choose_attention("cuda:0", None) == "default"  # no sequence length to test at
    # a set of pictures of several shapes: cuDNN only if every length passed (80 on GPU 1 did, 96 on GPU 0 did not)
    monkeypatch.setitem(attention._attention_verdicts, (96, 1), False)
    assert attention.choose_attention("cuda:1", (80,)) == "cudnn"
    assert attention.choose_attention("cuda:1", (80, 96)) == "default"
    use_runtime(attention="cudnn")  # the user's override skips the test
    assert attention.choose_attention("cuda:0", 64) == "cudnn"
    use_runtime(attention="flash")
    assert attention.choose_attention("cuda:1", 80) == "default"
    assert len(calls) == 4  # choose_attention asked nothing new: every verdict came from memory


def test_which_captured_step_graph_trains_which_picture():
    """A set gets one forward+backward graph per picture: a graph fits a picture with the same caption and
    positions, latents of the same shape and the same shift (an augmented copy of it), never another picture of the
    set, even one of the same shape; a picture's warm-up steps are counted together with its augmented copies', and
    the capture takes the copy that has loss weights."""
    import dataclasses

    from trainer.training import step as step_module
    from trainer.training.encode import EncodedExample, PromptEmbedding

    def picture(h, w, prompt):
        caption = PromptEmbedding(prompt, torch.zeros(1, 4, 8), torch.zeros(1, 8), torch.zeros(4, 3))
        return EncodedExample(torch.randn(1, 16, h, w), torch.ones(1, 1, h, w), torch.zeros(h * w // 4, 3), caption)

    square, tall = picture(64, 64, "a"), picture(72, 56, "b")
    same_shape_other_caption = dataclasses.replace(picture(64, 64, "c"), image_ids=square.image_ids)
    augmented = dataclasses.replace(square, latents=torch.randn(1, 16, 64, 64), weights=None)
    fits = step_module._fits
    assert fits(square, 1.15, augmented, 1.15) and fits(square, 1.15, square, 1.15)
    assert not fits(square, 1.15, tall, 1.15)
    assert not fits(square, 1.15, same_shape_other_caption, 1.15)
    assert not fits(square, 1.15, square, 1.2)  # the shift is baked into a graph

    params = [torch.nn.Parameter(torch.zeros(3))]
    stepper = step_module.TrainStep(torch.nn.Linear(1, 1), square, None, torch.Generator(), 1.15, params,
                                    torch.optim.AdamW(params), graphs=False)
    for example, mu in ((augmented, 1.15), (tall, 1.2), (square, 1.15), (augmented, 1.15)):
        stepper._count_warm_up(example, mu)
    assert [(e is square, e is tall, n) for e, _, n in stepper._warm] == [(True, False, 3), (False, True, 1)]
    assert stepper.graph_count == 0 and not stepper.graphed


def test_regional_compile_uses_diffusers_repeated_blocks_and_falls_back_to_the_block_lists(monkeypatch):
    """Flux names its two block classes in ``_repeated_blocks``: diffusers' ``compile_repeated_blocks`` compiles
    exactly ``transformer_blocks`` + ``single_transformer_blocks``, static shapes by default; a model that names none
    gets the same blocks compiled by us; ``restore_eager`` uncompiles either."""
    from diffusers import FluxTransformer2DModel

    assert set(FluxTransformer2DModel._repeated_blocks) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    calls = []
    real = FluxTransformer2DModel.compile_repeated_blocks

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "compile_repeated_blocks", spy)
    for repeated in (None, ()):  # the class's own list, then a model that names none
        transformer = tiny_transformer()
        if repeated is not None:
            transformer._repeated_blocks = repeated
        calls.clear()
        assert regional.accelerate_transformer(transformer, "cpu", force=True, backend="eager")
        assert regional.is_accelerated(transformer)
        assert calls == ([{"dynamic": False, "backend": "eager"}] if repeated is None else [])
        compiled = [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert compiled == attention.flux_blocks(transformer)
        assert torch._dynamo.config.cache_size_limit >= 16
        regional.restore_eager(transformer)
        assert not regional.is_accelerated(transformer)
        assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules())


def test_the_runtime_switches_turn_the_speed_ups_off(monkeypatch, use_runtime):
    from trainer.training.accel.graphs import can_use_cuda_graphs
    from trainer.training.step import adamw_options

    transformer = tiny_transformer()
    assert not regional.accelerate_transformer(transformer, "cpu", runtime=Runtime())  # never on the CPU unforced
    assert not regional.can_compile("cuda", Runtime(compile=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend, to reach the switch
    graphs_possible = hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda.CUDAGraph, "register_generator_state")
    assert can_use_cuda_graphs("cuda", Runtime()) == graphs_possible
    assert not can_use_cuda_graphs("cuda", Runtime(cuda_graphs=False))
    assert adamw_options("cuda", Runtime(cuda_graphs=False)) == {"fused": True}
    use_runtime(cuda_graphs=False)  # the process's Runtime, when none is given
    assert not can_use_cuda_graphs("cuda") and adamw_options("cuda") == {"fused": True}
    assert adamw_options("cpu") == {"fused": False}
