"""FLUX.1 [dev]: the first model family (black-forest-labs/FLUX.1-dev and the built-in ``tiny-demo``).

12B-parameter transformer (19 double-stream + 38 single-stream blocks), CLIP-L (pooled) + T5-XXL (512 tokens) text
encoders, a 16-channel VAE, 2x2 latent patches with (0, row, col) position ids, and guidance *embedded* in the model
(FLUX.1-dev is guidance-distilled: it is given the guidance scale as an input instead of running classifier-free
guidance). Training feeds guidance 1.0, as SimpleTuner and ai-toolkit do; previews render at 3.5 (``config.py``).
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.families.base import KohyaLayout, ModelFamily, TextReader
from trainer.model.quantize import BLOCK_LAYER
from trainer.training import flow


class Flux1(ModelFamily):
    name = "flux1"
    label = "FLUX.1 [dev]"
    default_hub_id = "black-forest-labs/FLUX.1-dev"
    hub_ids = (default_hub_id,)
    gated = True
    tiny_id = "tiny-demo"
    tiny_version = 1
    tiny_notice = ("tiny-demo is a built-in Flux-shaped model with random weights, small enough for a CPU. It exists "
                   "to try the workflow: its samples are noise. Previews use 4 denoising steps to stay fast.")
    license_notice = ("FLUX.1 [dev] Non-Commercial License: outputs may be used commercially, the model and LoRAs "
                      "trained on it may not be (https://huggingface.co/black-forest-labs/FLUX.1-dev).")
    card_license = dict(license="other", license_name="flux-1-dev-non-commercial-license",
                        license_link="https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md")
    card_tags = ("flux",)
    usage_steps, usage_guidance = 28, 3.5
    download_gb = 34.0
    download_notice = "It downloads about 34 GB once, and trains on a GPU with 24 GB or more."

    pipeline_classes = ("FluxPipeline",)
    transformer_class_name = "FluxTransformer2DModel"
    required_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    weight_parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
    # Only the diffusers-layout subfolders: FLUX.1-dev's repo also holds a 23 GB single-file checkpoint at its
    # root (flux1-dev.safetensors) and the original-format autoencoder, which we never need.
    hub_patterns = ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                    "tokenizer_2/*", "transformer/*.json", "transformer/*.safetensors", "vae/*.json",
                    "vae/*.safetensors", "text_encoder/*.safetensors", "text_encoder_2/*.safetensors")
    # black-forest-labs/FLUX.1-dev, transformer/config.json
    transformer_config = dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    tiny_transformer_config = dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,  # like FLUX.1-dev, so the guidance path is exercised
    )

    # The attention and feed-forward projections of the double-stream blocks and the attention, MLP and output
    # projections of the single-stream blocks: the set diffusers' Flux script and kohya train (kohya's single-block
    # ``linear1`` is our q/k/v + proj_mlp, its ``linear2`` our ``proj_out``). Anchored to the blocks so the model's
    # final ``proj_out`` layer is never wrapped.
    lora_target_modules = (
        r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
        r"|.*single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
    )
    # Every Linear inside a block (on FLUX.1-dev each has at least 9.4 M weights: 11.83 of the 11.90 billion); the
    # ten outside (embedders, norm_out, the final proj_out) stay in full precision: trainer/model/quantize.py.
    quantizable_layer = BLOCK_LAYER
    kohya = KohyaLayout(
        double_block={
            "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_attn_proj": ("attn.to_out.0",),
            "img_mlp_0": ("ff.net.0.proj",),
            "img_mlp_2": ("ff.net.2",),
            "img_mod_lin": ("norm1.linear",),
            "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_attn_proj": ("attn.to_add_out",),
            "txt_mlp_0": ("ff_context.net.0.proj",),
            "txt_mlp_2": ("ff_context.net.2",),
            "txt_mod_lin": ("norm1_context.linear",),
        },
        single_block={
            "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            "linear2": ("proj_out",),
            "modulation_lin": ("norm.linear",),
        },
        # Layers outside the blocks (we never train them, but a LoRA that has them still converts).
        global_layers={
            "img_in": "x_embedder",
            "txt_in": "context_embedder",
            "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
            "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
            "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
            "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
            "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
            "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
            "final_layer_linear": "proj_out",
            "final_layer_adaLN_modulation_1": "norm_out.linear",
        },
        swapped=frozenset({"norm_out.linear"}),  # scale and shift are swapped between the two layouts
    )
    max_text_tokens = 512  # T5 tokens; FLUX.1-dev was trained with 512
    # T5's tokens are what the transformer attends to; CLIP gives one pooled vector of the caption's first 77.
    text_readers = (TextReader("T5", "tokenizer_2"), TextReader("CLIP", "tokenizer", limit=77, pooled=True))

    # ---- classes
    def pipeline_class(self) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    def build_tiny_pipeline(self, seed: int = 0):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from trainer.model.tiny import byte_level_tokenizer

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**self.tiny_transformer_config)
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
        return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                            tokenizer=byte_level_tokenizer(77), text_encoder_2=text_encoder_2,
                            tokenizer_2=byte_level_tokenizer(512), transformer=transformer)

    # ---- conditioning
    @torch.no_grad()
    def encode_prompts(self, parts, prompts: list[str], max_tokens: int) -> dict:
        from trainer.training.encode import PromptEmbedding

        encoder = self.pipeline_for(parts, text_encoders=True, transformer=False)
        max_tokens = min(max_tokens, parts.tokenizer_2.model_max_length)
        # Encoded where the encoders are: on the GPU in a training job, in host memory for rendering on a small card
        # (``load_parts(encoders_on_device=False)``); the embeddings then go where the transformer runs.
        encoder_device = next(parts.text_encoder_2.parameters()).device
        out = {}
        for prompt in dict.fromkeys(prompts):
            embeds, pooled, text_ids = encoder.encode_prompt(prompt=prompt, prompt_2=None, device=encoder_device,
                                                             max_sequence_length=max_tokens)
            out[prompt] = PromptEmbedding(prompt, embeds.to(parts.device, parts.dtype),
                                          pooled.to(parts.device, parts.dtype), text_ids.to(parts.device))
        return out

    @torch.no_grad()
    def encode_image(self, parts, pixels: torch.Tensor) -> torch.Tensor:
        # The distribution's mean (not a sample), so caching the latents once is exact.
        vae = parts.vae
        latents = vae.encode(pixels.to(parts.device, dtype=vae.dtype)).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(parts.dtype)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return flow.pack_latents(latents)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return flow.unpack_latents(tokens, height, width)

    def image_ids(self, height: int, width: int, device, dtype) -> torch.Tensor:
        return flow.latent_image_ids(height, width, device, dtype)

    def training_shift(self, scheduler, image_tokens: int) -> float:
        c = scheduler.config
        return flow.resolution_shift(image_tokens, base_tokens=c.get("base_image_seq_len", 256),
                                     max_tokens=c.get("max_image_seq_len", 4096), base_shift=c.get("base_shift", 0.5),
                                     max_shift=c.get("max_shift", 1.15))

    def transformer_inputs(self, transformer, tokens: torch.Tensor, sigmas: torch.Tensor, caption,
                           image_ids: torch.Tensor, guidance_scale: float) -> dict[str, Any]:
        guidance = None
        if getattr(transformer, "module", transformer).config.guidance_embeds:  # unwrap DistributedDataParallel
            guidance = torch.full((tokens.shape[0],), guidance_scale, device=tokens.device, dtype=tokens.dtype)
        return dict(hidden_states=tokens, timestep=sigmas.to(tokens.dtype), guidance=guidance,
                    pooled_projections=caption.pooled, encoder_hidden_states=caption.embeds,
                    txt_ids=caption.text_ids, img_ids=image_ids)

    # ---- rendering
    def pipeline_for(self, parts, text_encoders: bool = False, transformer: bool = True):
        encoders = dict(text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                        text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2) if text_encoders else \
            dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        pipe = self.pipeline_class()(scheduler=parts.scheduler, vae=parts.vae if transformer else None,
                                     transformer=parts.transformer if transformer else None, **encoders)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_inputs(self, embeddings: list, guidance: float) -> dict[str, Any]:
        return dict(prompt_embeds=torch.cat([e.embeds for e in embeddings]),
                    pooled_prompt_embeds=torch.cat([e.pooled for e in embeddings]), guidance_scale=guidance)


FLUX1 = Flux1()
