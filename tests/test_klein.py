"""FLUX.2 [klein] as a second model family, on ``tiny-klein`` (built in code in the real on-disk layout, random weights).

The same flow as FLUX.1: a run trains end to end with finite losses, saves klein transformer LoRA keys that load in
diffusers' own ``Flux2KleinPipeline`` and change its output, resumes bit-identically, exports in the diffusers layout
and in the original-name layout (ComfyUI's and diffusers' FLUX.2 converter) rendering the same image, and a LoRA of
one family offered to the other says which family it is for. The full-size 4B architecture is checked on the meta
device: its LoRA targets, the exported key list (a golden list), and the ComfyUI export in both of its consumers:
ComfyUI's FLUX.2 LoRA loader (reimplemented from its source, against its model's weights captured from its real code)
and diffusers' FLUX.2 converter, every key consumed with the trained delta on the right rows.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.conftest import subject_image
from trainer.config import load_preset
from trainer.errors import UserError
from trainer.events import CheckpointSaved, Failed, Finished, Placed, PreviewsRendered, Progress
from trainer.families import FLUX1, FLUX2_KLEIN, family_of_folder, family_of_spec
from trainer.model.loading import load_parts, resolve_model
from trainer.review.export import export_lora
from trainer.runs import state
from trainer.runs.folder import RunFolder
from trainer.training.job import run_training


@pytest.fixture(autouse=True)
def klein_in_data_dir(isolated_data_dir, tiny_klein_dir):
    (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)


def klein_config(**overrides):
    settings = dict(steps=4, save_every=2, resolution=64, preview_steps=2, trigger="ohwx",
                    caption="a photo of [trigger], a red ball", sample_prompts=("[trigger] in the snow",),
                    model="tiny-klein", learning_rate=2e-2)  # large: 4 steps must visibly move the tiny model
    return load_preset("quick-test-250").config(**{**settings, **overrides})


def train(folder: Path, **overrides):
    image, mask = subject_image()
    run = RunFolder.create_at(folder, klein_config(**overrides), image, mask)
    return run, list(run_training(run))


@pytest.fixture(scope="module")
def klein_run(tmp_path_factory, tiny_klein_dir):
    from trainer import runtime

    data = tmp_path_factory.mktemp("kdata")
    (data / "models").mkdir()
    (data / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)
    with runtime.using(runtime.Runtime.from_environment({"ONE_IMAGE_LORA_DATA_DIR": str(data)})):
        return train(tmp_path_factory.mktemp("klein") / "run")


def test_the_family_is_told_from_the_spec_and_the_folder(tiny_klein_dir):
    assert family_of_spec("tiny-klein") is FLUX2_KLEIN and family_of_spec("tiny-demo") is FLUX1
    assert family_of_spec("black-forest-labs/FLUX.2-klein-base-4B") is FLUX2_KLEIN
    assert family_of_folder(tiny_klein_dir) is FLUX2_KLEIN
    assert json.loads((tiny_klein_dir / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    parts = load_parts(resolve_model("tiny-klein"))
    assert parts.family is FLUX2_KLEIN and parts.text_encoder_2 is None and parts.is_tiny_demo


def test_an_unknown_pipeline_folder_says_what_it_is(tmp_path, tiny_klein_dir):
    shutil.copytree(tiny_klein_dir, tmp_path / "m")
    index = tmp_path / "m" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionPipeline.*FLUX.1.*FLUX.2"):
        resolve_model(str(tmp_path / "m"))
    shutil.rmtree(tmp_path / "m" / "text_encoder")
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "Flux2KleinPipeline"}))
    with pytest.raises(UserError, match="missing text_encoder. A FLUX.2 \\[klein\\] model needs"):
        resolve_model(str(tmp_path / "m"))


def test_a_klein_run_trains_end_to_end_with_finite_losses_and_previews(klein_run):
    run, events = klein_run
    assert not [e for e in events if isinstance(e, Failed)], events[-1]
    assert isinstance(events[-1], Finished) and not events[-1].stopped and events[-1].last_step == 4
    losses = [e.loss for e in events if isinstance(e, Progress)]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    assert [e.step for e in events if isinstance(e, PreviewsRendered)] == [0, 2, 4]
    (placed,) = [e for e in events if isinstance(e, Placed)]
    assert Path(placed.model_path).name == "tiny-klein"
    assert RunFolder.open(run.path).status == "finished"


def test_klein_checkpoints_hold_klein_lora_keys_and_say_their_family(klein_run):
    _, events = klein_run
    path = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    tensors = safetensors.torch.load_file(path)
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors}
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in modules
    assert "transformer_blocks.0.ff.linear_in" in modules and "transformer_blocks.1.attn.add_q_proj" in modules
    assert not any(m.startswith(("proj_out", "x_embedder", "context_embedder")) for m in modules)
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()["family"] == "flux2-klein"


def test_only_the_lora_changes_and_it_loads_in_diffusers_klein_pipeline(klein_run):
    from diffusers import Flux2KleinPipeline

    _, events = klein_run
    checkpoint = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    folder = resolve_model("tiny-klein")
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def render():
        return pipe(prompt="a photo of ohwx", height=64, width=48, num_inference_steps=2, guidance_scale=1.0,
                    max_sequence_length=64, text_encoder_out_layers=(1, 2, 3),
                    generator=torch.Generator().manual_seed(1), output_type="pt").images[0]

    base = render()
    pipe.load_lora_weights(str(checkpoint), adapter_name="trained")
    with_lora = render()
    assert (with_lora - base).abs().max() > 1e-3, "the trained LoRA had no effect in diffusers"
    pipe.unload_lora_weights()
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base weights were never touched
    assert torch.allclose(render(), base)


def test_exports_render_the_checkpoints_image_in_diffusers(klein_run, tmp_path):
    from diffusers import Flux2KleinPipeline

    _, events = klein_run
    checkpoint = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    pipe = Flux2KleinPipeline.from_pretrained(resolve_model("tiny-klein"))

    def render(lora: Path):
        pipe.load_lora_weights(str(lora), adapter_name="x")
        try:
            return pipe(prompt="ohwx", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                        max_sequence_length=32, text_encoder_out_layers=(1, 2, 3),
                        generator=torch.Generator().manual_seed(3), output_type="pt").images[0]
        finally:
            pipe.unload_lora_weights()

    original = render(checkpoint)
    original_layout = export_lora(checkpoint, "kohya", tmp_path / "klein-comfyui.safetensors")
    keys = safetensors.torch.load_file(original_layout)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
    assert "diffusion_model.single_blocks.1.linear1.lora_B.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)  # diffusers' FLUX.2 converter refuses alpha keys
    # diffusers' own converter maps every key back (it raises on any key it leaves over)
    converted = Flux2KleinPipeline.lora_state_dict(str(original_layout))
    assert {k for k in converted if k.startswith("transformer.")}
    assert torch.allclose(render(original_layout), original, atol=1e-5)
    diffusers_layout = export_lora(checkpoint, "diffusers", tmp_path / "klein-diffusers.safetensors")
    assert torch.allclose(render(diffusers_layout), original, atol=1e-5)


def test_klein_resume_is_bit_identical(klein_run, tmp_path):
    run, _ = klein_run
    shutil.copytree(run.path, tmp_path / "run")
    copy = RunFolder.open(tmp_path / "run")
    copy.set_status("running")
    for step in (4,):
        copy.checkpoint_path(step).unlink()
        for f in state.state_files(copy.path, step):
            f.unlink()
    events = list(run_training(RunFolder.open(copy.path), resume=True))
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    assert [e.step for e in events if isinstance(e, Progress)] == [3, 4]
    a = safetensors.torch.load_file(run.checkpoint_path(4))
    b = safetensors.torch.load_file(copy.checkpoint_path(4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_of_the_other_family_says_which_family_it_is_for(klein_run, tmp_path):
    from trainer.review.inference import LoraPipeline

    _, events = klein_run
    klein_lora = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    engine = LoraPipeline.load(resolve_model("tiny-demo"))
    with pytest.raises(UserError, match="trained on FLUX.2 \\[klein\\].*FLUX.1 \\[dev\\]"):
        engine.adapter_for(klein_lora)


def test_the_full_size_klein_lora_targets_every_block_projection():
    import re

    model = FLUX2_KLEIN.meta_transformer()
    assert 3.8e9 < sum(p.numel() for p in model.parameters()) < 3.95e9  # klein 4B
    pattern = re.compile(FLUX2_KLEIN.lora_target_modules)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
    assert len(targets) == 5 * 12 + 20 * 2  # 12 projections per double block, 2 fused ones per single block
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in targets)
    # every target has a name in the original layout, so the ComfyUI export covers the whole LoRA
    from trainer.review.export import kohya_groups

    groups = kohya_groups(targets, FLUX2_KLEIN.kohya)
    assert sorted(m for parts in groups.values() for m in parts) == sorted(targets)
    assert "diffusion_model.double_blocks.4.txt_mlp.2" in groups and "diffusion_model.single_blocks.19.linear2" in groups


def test_klein_has_its_own_memory_tiers():
    from trainer.model.tiers import choose_tier

    def tier(gib, family):
        return choose_tier("auto", torch.device("cpu"), gpu=("card", gib), family=family).tier

    # a third of FLUX.1's size: klein keeps bf16 weights on the 24 and 16 GB cards where FLUX.1 needs fp8
    assert (tier(23.6, FLUX2_KLEIN).weights, tier(23.6, FLUX1).weights) == ("bf16", "fp8")
    assert tier(15.6, FLUX2_KLEIN).weights == "bf16" and tier(15.6, FLUX2_KLEIN).gradient_checkpointing
    assert tier(11.6, FLUX2_KLEIN).weights == "fp8" and tier(11.6, FLUX1).weights == "nf4"
    with pytest.raises(UserError, match="FLUX.2 \\[klein\\] needs a GPU with at least 12 GB"):
        tier(7.5, FLUX2_KLEIN)


# ---------------------------------------------------------------- the full-size 4B exports in their consumers
#
# ComfyUI's FLUX.2 LoRA loading, read from its source (Comfy-Org/ComfyUI comfy/lora.py @ 17358c8f73b5,
# comfy/weight_adapter/lora.py @ 6f98b150e065, comfy/lora_convert.py @ 2bffe2f4ce57, comfy/utils.py @ 09708eae709a;
# the same functions at rattus128/ComfyUI master 9d8a817985bb, which was also run for real on these exports):
# * ``model_lora_keys_unet``: for every key ``diffusion_model.<name>.weight`` of the model's state dict, the LoRA
#   names ``lora_unet_<name with . as _>`` and ``diffusion_model.<name>`` (the "generic lora format") map to it.
#   For a ``model_base.Flux`` (FLUX.2 is its subclass ``Flux2``) ``transformer.<diffusers name>`` maps through
#   ``utils.flux_to_diffusers`` too (not used by the original-name layout).
# * ``load_lora``: per mapped name ``x``: ``x.alpha`` if present, then ``LoRAAdapter.load``: the first of
#   ``x.lora_up.weight``/``x.lora_down.weight``, ``x_lora.up.weight``/…, ``x.lora_B.weight``/``x.lora_A.weight``,
#   ``x.lora.up.weight``/…, ``x.lora_B``/``x.lora_A``, ``x.lora_linear_layer.up.weight``/…,
#   ``x.lora_B.default.weight``/…; every key left over is logged "lora key not loaded".
# * ``LoRAAdapter.calculate_weight``: ``W += strength * (alpha / rank if alpha else 1.0) * up @ down``, reshaped to W.
# * ``lora_convert.convert_lora`` rewrites a file only on these markers: BFL control LoRAs (``img_in.lora_A.weight``
#   with ``single_blocks.0.norm.key_norm.scale``), Wan Fun (``lora_unet__blocks_0_…``), USO (``….processor.qkv_lora…``)
#   and Krea2 fused ``attn.to_qkv`` adapters in ``transformer_blocks``.
# The model's own key names and shapes (tests/golden/flux2_klein_4b_comfyui_model.txt) were captured from ComfyUI's
# real model code; the reimplementation below is the mapping above, line for line, for what these files contain.

KLEIN_GOLDEN = Path(__file__).parent / "golden" / "flux2_klein_4b_comfyui_keys.txt"
COMFY_MODEL = Path(__file__).parent / "golden" / "flux2_klein_4b_comfyui_model.txt"
KLEIN_GLOBALS = ("x_embedder", "context_embedder", "time_guidance_embed.timestep_embedder.linear_1",
                 "time_guidance_embed.timestep_embedder.linear_2", "proj_out", "norm_out.linear",
                 "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                 "single_stream_modulation.linear")
COMFY_ADAPTER_NAMES = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                       (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                       (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                       (".lora_B.default.weight", ".lora_A.default.weight"))


def _golden_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            shapes[key] = tuple(json.loads(shape))
    return shapes


@pytest.fixture(scope="module")
def klein_4b():
    return FLUX2_KLEIN.meta_transformer()


def _klein_linears(model, extra=()) -> dict[str, tuple[int, int]]:
    import re

    pattern = re.compile(FLUX2_KLEIN.lora_target_modules)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
    return {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in [*names, *extra]}


def _klein_lora(linears, rank: int, alpha: float, device: str = "cpu"):
    """A LoRA on ``linears`` as the trainer's checkpoint holds it (``transformer.`` keys, family and alpha in the
    metadata), random A and B."""
    from trainer.review.export import lora_from_state_dict

    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, (fan_in, fan_out) in linears.items():
        shapes = (rank, fan_in), (fan_out, rank)
        a, b = ((torch.empty(s, device="meta") for s in shapes) if device == "meta"
                else (torch.randn(s, generator=gen) for s in shapes))
        state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = a, b
    adapter = json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})
    return lora_from_state_dict(state, {"family": "flux2-klein", "lora_adapter_metadata": adapter})


def _as_read_from_a_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(safetensors.torch.save(tensors))


def _comfyui_key_map(model_keys) -> dict[str, str]:
    """comfy/lora.py ``model_lora_keys_unet``: the names every model gets (the generic loop)."""
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_map["lora_unet_{}".format(k[len("diffusion_model."):-len(".weight")].replace(".", "_"))] = k
                key_map[k[:-len(".weight")]] = k
            else:
                key_map[k] = k
    return key_map


def _comfyui_load_lora(lora: dict[str, torch.Tensor], key_map: dict[str, str]):
    """comfy/lora.py ``load_lora`` with weight_adapter/lora.py ``LoRAAdapter.load``: (patches, keys not loaded)."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in COMFY_ADAPTER_NAMES:
            if x + up in lora:
                patches[target] = (lora[x + up], lora[x + down], alpha)
                loaded.update((x + up, x + down))
                break
    return patches, sorted(set(lora) - loaded)


def _comfyui_convert_lora_would_rewrite(keys) -> bool:
    """comfy/lora_convert.py ``convert_lora``: the markers on which it rewrites a file instead of passing it on."""
    import re

    keys = set(keys)
    return (("img_in.lora_A.weight" in keys and "single_blocks.0.norm.key_norm.scale" in keys)
            or "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in keys
            or "single_blocks.37.processor.qkv_lora.up.weight" in keys
            or any(re.search(r"(.*attn[._]to_)qkv(?=\.|$)", k) and ("text_fusion" in k or "transformer_blocks" in k)
                   for k in keys))


def _original_rows(model_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Original weight → the diffusers weights its rows become, and which rows, as diffusers' own checkpoint
    converter (``convert_flux2_transformer_checkpoint_to_diffusers``, what loads the real klein file) moves them."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    rows = {k[len("diffusion_model."):]: torch.arange(s[0], dtype=torch.float64).unsqueeze(1)
            for k, s in model_shapes.items()}
    out: dict[str, list] = {}
    for original, row_ids in rows.items():
        for name, tensor in convert_flux2_transformer_checkpoint_to_diffusers({original: row_ids}).items():
            out.setdefault(f"diffusion_model.{original}", []).append((name, tensor[:, 0].long()))
    return out


def test_comfyuis_klein_model_is_the_4b_checkpoint_diffusers_loads(klein_4b):
    """The ComfyUI model's weights (captured from its code) go through diffusers' checkpoint converter to exactly the
    diffusers 4B transformer: the two consumers agree on every original name, shape and fused layout."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    comfy = _golden_shapes(COMFY_MODEL)
    assert len(comfy) == 149 and comfy["diffusion_model.single_blocks.0.linear1.weight"] == (27648, 3072)
    converted = convert_flux2_transformer_checkpoint_to_diffusers(
        {k[len("diffusion_model."):]: torch.empty(s, device="meta") for k, s in comfy.items()})
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in klein_4b.state_dict().items()}


def test_comfyui_loads_every_key_of_the_4b_export_with_the_trained_delta(klein_4b):
    """The original-name export of a LoRA on every klein target, the global layers and the shared modulations:
    ComfyUI's loader consumes every key ("lora key not loaded" never logged), each lands on a weight of its model
    with the weight's shape, and ``alpha/rank * up @ down`` is the trained delta on exactly the rows diffusers'
    checkpoint converter assigns to each diffusers module (probed with random vectors; the 4B deltas are large)."""
    from trainer.review.export import to_kohya

    rank, alpha = 2, 1.0  # alpha != rank: ComfyUI scales by 1 without alpha keys, so the export must fold it
    lora = _klein_lora(_klein_linears(klein_4b, KLEIN_GLOBALS), rank, alpha)
    exported = _as_read_from_a_file(to_kohya(lora))
    comfy = _golden_shapes(COMFY_MODEL)
    assert not _comfyui_convert_lora_would_rewrite(exported)
    patches, not_loaded = _comfyui_load_lora(exported, _comfyui_key_map(comfy))
    assert not_loaded == []
    assert len(patches) == 5 * 8 + 20 * 2 + len(KLEIN_GLOBALS) and len(exported) == 2 * len(patches)
    rows = _original_rows(comfy)
    gen = torch.Generator().manual_seed(1)
    for target, (up, down, file_alpha) in patches.items():
        out_features, in_features = comfy[target]
        assert file_alpha is None and up.shape[0] == out_features and down.shape == (up.shape[1], in_features), target
        probe = torch.randn(in_features, 2, generator=gen, dtype=torch.float64)
        got = up.double() @ (down.double() @ probe)  # ComfyUI's delta (scale 1.0) applied to the probe
        want = torch.zeros(out_features, 2, dtype=torch.float64)
        for name, row_ids in rows[target]:
            module = name.removesuffix(".weight")
            assert module in lora.a, f"{target} patched, but {module} was not trained"
            want[row_ids] = (lora.b[module].double() @ (lora.a[module].double() @ probe)) * alpha / rank
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), target
    trained = {m for parts in rows.values() for m, _ in parts}
    assert {m.removesuffix(".weight") for m in trained} >= set(lora.a)  # nothing trained fell outside


def test_diffusers_flux2_converter_takes_the_4b_export_back_to_the_trained_lora(klein_4b):
    """``Flux2KleinPipeline.lora_state_dict`` (diffusers' ``_convert_non_diffusers_flux2_lora_to_diffusers``) on the
    export: every key consumed (it raises on leftovers), exactly the trained modules come back, each with its
    module's shape and the trained product; the fused ``img_attn.qkv`` is split as that converter splits it (one
    shared A, B cut in three) and the single blocks' ``linear1``/``linear2`` are kept fused, as diffusers' own
    ``to_qkv_mlp_proj``/``to_out`` are. One consumer difference is pinned: the FLUX.2 converter copies
    ``final_layer.adaLN_modulation.1`` to ``norm_out.linear`` without swapping its (shift, scale) halves (its FLUX.1
    converter does swap them), so that layer's delta comes out in the original model's order, the one ComfyUI uses."""
    from diffusers import Flux2KleinPipeline

    from trainer.review.export import to_kohya

    rank, alpha = 2, 1.0
    linears = _klein_linears(klein_4b, KLEIN_GLOBALS)
    lora = _klein_lora(linears, rank, alpha)
    exported = _as_read_from_a_file(to_kohya(lora))
    back = Flux2KleinPipeline.lora_state_dict(dict(exported))
    assert set(back) == {f"transformer.{m}.lora_{p}.weight" for m in linears for p in "AB"}
    for m in ("attn.to_q", "attn.to_k", "attn.to_v"):  # the fused A is shared, not split
        assert torch.equal(back[f"transformer.transformer_blocks.0.{m}.lora_A.weight"],
                           exported["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"])
    assert torch.equal(back["transformer.single_transformer_blocks.3.attn.to_qkv_mlp_proj.lora_B.weight"],
                       exported["diffusion_model.single_blocks.3.linear1.lora_B.weight"])
    gen = torch.Generator().manual_seed(2)
    for module, (fan_in, fan_out) in linears.items():
        a, b = back[f"transformer.{module}.lora_A.weight"], back[f"transformer.{module}.lora_B.weight"]
        assert a.shape[1] == fan_in and b.shape[0] == fan_out and a.shape[0] == b.shape[1], module
        probe = torch.randn(fan_in, 2, generator=gen, dtype=torch.float64)
        got = b.double() @ (a.double() @ probe)  # no alpha keys: diffusers loads it at scale 1
        want = lora.b[module].double() @ (lora.a[module].double() @ probe) * alpha / rank
        if module == "norm_out.linear":
            want = torch.cat(want.chunk(2)[::-1])
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), module


def _klein_golden_lines(klein_4b) -> list[str]:
    from trainer.review.export import to_kohya

    kohya = to_kohya(_klein_lora(_klein_linears(klein_4b), GOLDEN_RANK_KLEIN, float(GOLDEN_RANK_KLEIN), "meta"))
    return [f"{key} {list(value.shape)}" for key, value in sorted(kohya.items())]


GOLDEN_RANK_KLEIN = 4


def test_the_4b_comfyui_export_keys_match_the_golden_list(klein_4b):
    """The original-name export of the trainer's klein-4B LoRA (rank 4, every target), key by key and shape by
    shape; regenerate with ``UPDATE_GOLDEN=1`` after a deliberate layout change."""
    import os

    lines = _klein_golden_lines(klein_4b)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        KLEIN_GOLDEN.write_text("\n".join(lines) + "\n")
    golden = KLEIN_GOLDEN.read_text().splitlines()
    assert lines == golden
    # Sanity of the list itself: 5 double blocks x 8 fused layers, 20 single blocks x 2, two keys each, no alpha.
    assert len(golden) == 2 * (5 * 8 + 20 * 2)
    assert all(line.startswith("diffusion_model.") and (".lora_A.weight [" in line or ".lora_B.weight [" in line)
               for line in golden)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight [9216, 12]" in golden
    assert "diffusion_model.double_blocks.4.txt_mlp.0.lora_B.weight [18432, 4]" in golden
    assert "diffusion_model.single_blocks.19.linear1.lora_B.weight [27648, 4]" in golden
    assert "diffusion_model.single_blocks.19.linear2.lora_A.weight [4, 12288]" in golden
    # every key names a weight of ComfyUI's klein model, with that weight's shape
    comfy = _golden_shapes(COMFY_MODEL)
    shapes = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in golden}
    for key, shape in shapes.items():
        layer, half = key.rsplit(".lora_", 1)
        out_features, in_features = comfy[f"{layer}.weight"]
        assert shape[0 if half.startswith("B") else 1] == (out_features if half.startswith("B") else in_features)
