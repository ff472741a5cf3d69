"""The built-in ``tiny-demo`` model: a Flux-architecture pipeline small enough for a CPU.

Every part (transformer, VAE, CLIP, T5, both tokenizers, scheduler) is built from a config and saved
with ``FluxPipeline.save_pretrained`` in the standard diffusers layout, so it is loaded by exactly the
same code as FLUX.1-dev. Its weights are random: it exists to try the workflow and to test it, and its
samples are noise. Sizes follow ``shared/OFFLINE.md``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_DEMO_VERSION = 1  # bump when the architecture below changes, so cached copies are rebuilt

TINY_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    guidance_embeds=True,  # like FLUX.1-dev, so the guidance path is exercised
)

_CORPUS = [
    "a photo of a person standing in a field",
    "a watercolor painting of a cat with red hair",
    "a character in a blue coat seen from the back",
    "a close up portrait, studio light, white background",
    "a dog, a car, a house, a tree, a mountain, the sea",
    "anime style drawing of a girl holding a revolver",
]


def _tokenizer(max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE: any prompt tokenizes to real ids, so different prompts give different embeddings.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="<pad>",
                                   unk_token="<unk>", eos_token="</s>")


def build_tiny_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=[8, 16, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=64,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=0))
    text_encoder_2 = T5EncoderModel(T5Config(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8,
                                             vocab_size=1000, pad_token_id=0, eos_token_id=2))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(77),
                        text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer(512), transformer=transformer)


def _current(directory: Path) -> bool:
    """``directory`` holds a complete tiny model of this version."""
    try:
        return json.loads((directory / "tiny_demo.json").read_text()).get("version") == TINY_DEMO_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_demo(directory: Path) -> Path:
    """Build the tiny pipeline into ``directory`` once; later calls reuse it. Returns the folder."""
    directory = Path(directory)
    if _current(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary sibling and rename: two processes starting at once never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-demo-", dir=directory.parent))
    try:
        build_tiny_pipeline().save_pretrained(tmp, safe_serialization=True)
        (tmp / "tiny_demo.json").write_text(json.dumps({
            "version": TINY_DEMO_VERSION,
            "note": "Random weights: for trying the workflow and for tests. Its samples are noise."}))
        if _current(directory):  # another process (a multi-GPU run's other rank) finished first and may be
            return directory      # loading it already: keep its copy
        if directory.exists():
            shutil.rmtree(directory)
        try:
            os.rename(tmp, directory)  # refuses a non-empty target: never replaces a copy someone just put there
        except OSError:
            if not _current(directory):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
