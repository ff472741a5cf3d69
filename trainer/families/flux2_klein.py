"""FLUX.2 [klein]: the second model family (black-forest-labs/FLUX.2-klein-base-4B, its distilled twin, ``tiny-klein``).

A 4B transformer (5 double-stream + 20 single-stream blocks, width 3072, fused ``to_qkv_mlp_proj`` in the single
blocks), a Qwen3 text encoder read at three hidden layers (9, 18, 27) stacked into 7680-wide tokens (512 of them,
through its chat template), a 32-channel VAE whose latents are cut into 2x2 patches (128 channels) and normalised
by the VAE's own batch-norm statistics, 4-D position ids (t, h, w, l), no pooled text and **no guidance embedding**:
the base model uses classifier-free guidance against the empty prompt, the distilled one none. Apache-2.0 (the 9B
variants are non-commercial). Train on the *base* model; render with the distilled one at 4 steps, guidance 1
(docs/PRACTICE.md §9): a LoRA trained on the distilled model comes out as grey blobs.

Everything here follows diffusers 0.42.1's ``Flux2KleinPipeline`` (encode_prompt, _patchify_latents,
_encode_vae_image, prepare_latents, compute_empirical_mu) so a cached example is exactly what the pipeline feeds the
transformer, and the training step's input is the pipeline's input at the same noise level.
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.families.base import KohyaLayout, ModelFamily, TextReader
from trainer.model.quantize import BLOCK_LAYER

TEXT_LAYERS = (9, 18, 27)  # Qwen3 hidden states the pipeline stacks (its default text_encoder_out_layers)
TINY_TEXT_LAYERS = (1, 2, 3)  # the tiny text encoder has 4 layers: the same stacking, fewer layers


class Flux2Klein(ModelFamily):
    name = "flux2-klein"
    label = "FLUX.2 [klein]"
    default_hub_id = "black-forest-labs/FLUX.2-klein-base-4B"
    distilled_hub_id = "black-forest-labs/FLUX.2-klein-4B"
    hub_ids = (default_hub_id, distilled_hub_id)
    takes_reference_images = True  # Flux2KleinPipeline(image=[...]): the references' tokens join the sequence
    gated = False
    tiny_id = "tiny-klein"
    tiny_version = 1
    tiny_notice = ("tiny-klein is a built-in FLUX.2 [klein]-shaped model with random weights, small enough for a CPU. "
                   "It exists to try the workflow on the klein family: its samples are noise.")
    license_notice = ("Apache-2.0 for FLUX.2 [klein] 4B (base and distilled): the model and LoRAs trained on it may be "
                      "used commercially. The 9B variants are non-commercial (https://huggingface.co/"
                      "black-forest-labs/FLUX.2-klein-base-4B).")
    card_license = dict(license="apache-2.0")
    card_tags = ("flux2", "flux2-klein")
    usage_steps, usage_guidance = 50, 4.0
    download_gb = 16.0
    download_notice = ("It downloads about 16 GB once (transformer 7.8 GB, Qwen3-4B text encoder 8 GB, VAE), needs "
                       "about 20 GB of host memory while loading, and trains on a GPU with 12 GB or more (fp8 weights on 12 GB, "
                       "bf16 from 16 GB; measured on an H200 under those caps).")

    pipeline_classes = ("Flux2KleinPipeline",)
    transformer_class_name = "Flux2Transformer2DModel"
    required_parts = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    weight_parts = ("transformer", "vae", "text_encoder")
    hub_patterns = ("model_index.json", "scheduler/*", "text_encoder/*.json", "text_encoder/*.safetensors",
                    "tokenizer/*", "transformer/*.json", "transformer/*.safetensors", "vae/*.json", "vae/*.safetensors")
    # black-forest-labs/FLUX.2-klein-base-4B, transformer/config.json (3.88 B parameters)
    transformer_config = dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
    )
    tiny_transformer_config = dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False,
    )
    # Every projection of both block kinds, as diffusers' klein LoRA script and ai-toolkit train them. The single
    # blocks' q/k/v and MLP input are one fused Linear (``to_qkv_mlp_proj``), their output one (``to_out``).
    lora_target_modules = (
        r".*(?<!single_)transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
        r"|to_add_out)|ff\.linear_(in|out)|ff_context\.linear_(in|out))"
        r"|.*single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
    )
    quantizable_layer = BLOCK_LAYER
    # The original (BFL) names, as ComfyUI's FLUX.2 loader and diffusers' ``_convert_non_diffusers_flux2_lora_to_
    # diffusers`` read them: ``diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight``. No alpha keys (the
    # converter refuses any key it does not know), so export folds alpha/rank into B.
    kohya = KohyaLayout(
        double_block={
            "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_attn.proj": ("attn.to_out.0",),
            "img_mlp.0": ("ff.linear_in",),
            "img_mlp.2": ("ff.linear_out",),
            "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_attn.proj": ("attn.to_add_out",),
            "txt_mlp.0": ("ff_context.linear_in",),
            "txt_mlp.2": ("ff_context.linear_out",),
        },
        single_block={"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)},
        global_layers={
            "img_in": "x_embedder",
            "txt_in": "context_embedder",
            "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
            "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
            "final_layer.linear": "proj_out",
            "final_layer.adaLN_modulation.1": "norm_out.linear",
            # FLUX.2 shares one modulation per stream across all blocks (top-level, not per block)
            "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
            "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
            "single_stream_modulation.lin": "single_stream_modulation.linear",
        },
        # (shift, scale) as in the original model and ComfyUI; diffusers' FLUX.2 LoRA converter copies this layer
        # without swapping back (its FLUX.1 one swaps), so only there a LoRA on norm_out would load mis-ordered.
        swapped=frozenset({"norm_out.linear"}),
        block_format="diffusion_model.{prefix}.{index}.{name}", global_format="diffusion_model.{name}",
        down_key="lora_A.weight", up_key="lora_B.weight", alpha_key=None,
        network_module="networks.lora_flux2", base_model_version="flux2_klein",
    )
    max_text_tokens = 512
    text_readers = (TextReader("Qwen3", "tokenizer", chat=True),)  # 512 tokens of the caption in its chat template
    tiers_dir = "presets/memory/flux2-klein"  # a third of FLUX.1's size: bf16 fits cards FLUX.1 needs fp8 on
    preview_steps = 50  # the base model's own default; the distilled model renders in 4 (distilled_render)
    preview_guidance = 4.0
    distilled_render = (4, 1.0)  # the distilled model's own settings (Flux2KleinPipeline, is_distilled=True)

    # ---- classes
    def pipeline_class(self) -> type:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    def build_tiny_pipeline(self, seed: int = 0):
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
            Flux2Transformer2DModel
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from trainer.model.tiny import chat_tokenizer

        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**self.tiny_transformer_config)
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False)
        # 16 x 3 stacked layers = the transformer's joint_attention_dim of 48
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=1000, hidden_size=16, intermediate_size=37, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True))
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    time_shift_type="exponential")
        return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                  tokenizer=chat_tokenizer(512), transformer=transformer)

    # ---- conditioning
    def _text_layers(self, text_encoder) -> tuple[int, ...]:
        return TEXT_LAYERS if text_encoder.config.num_hidden_layers > max(TEXT_LAYERS) else TINY_TEXT_LAYERS

    @torch.no_grad()
    def encode_prompts(self, parts, prompts: list[str], max_tokens: int) -> dict:
        from trainer.training.encode import PromptEmbedding

        pipe_class = self.pipeline_class()
        encoder = parts.text_encoder
        encoder_device = next(encoder.parameters()).device
        layers = self._text_layers(encoder)

        def embed(text: str):
            embeds = pipe_class._get_qwen3_prompt_embeds(encoder, parts.tokenizer, text, dtype=parts.dtype,
                                                         device=encoder_device, max_sequence_length=max_tokens,
                                                         hidden_states_layers=layers)
            return embeds.to(parts.device, parts.dtype), pipe_class._prepare_text_ids(embeds).to(parts.device)

        # The empty prompt is the base model's classifier-free-guidance reference: encoded once, kept with each prompt.
        negative, _ = embed("")
        out = {}
        for prompt in dict.fromkeys(prompts):
            embeds, text_ids = embed(prompt)
            out[prompt] = PromptEmbedding(prompt, embeds, None, text_ids, negative=negative)
        return out

    @torch.no_grad()
    def encode_image(self, parts, pixels: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``_encode_vae_image``: the distribution's mean, 2x2 patches, the VAE's batch-norm stats."""
        vae = parts.vae
        latents = vae.encode(pixels.to(parts.device, dtype=vae.dtype)).latent_dist.mode()
        latents = self.pipeline_class()._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                              latents.dtype)
        return ((latents - mean) / std).to(parts.dtype)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape  # already in 2x2 patches: one token per latent pixel
        return latents.reshape(b, c, h * w).permute(0, 2, 1)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, _, c = tokens.shape
        return tokens.permute(0, 2, 1).reshape(b, c, height, width)

    def image_ids(self, height: int, width: int, device, dtype) -> torch.Tensor:
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
        return ids.unsqueeze(0).to(device)  # (1, h*w, 4): t, h, w, l (integer positions, as the pipeline's)

    def training_shift(self, scheduler, image_tokens: int) -> float:
        # The sampler's own shift for this many tokens at its default step count, so training sees the noise levels
        # previews are rendered at (the pipeline: compute_empirical_mu(image_seq_len, num_inference_steps)).
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return compute_empirical_mu(image_tokens, self.preview_steps)

    def transformer_inputs(self, transformer, tokens: torch.Tensor, sigmas: torch.Tensor, caption,
                           image_ids: torch.Tensor, guidance_scale: float) -> dict[str, Any]:
        # No guidance embedding (guidance_embeds=False); the timestep is the noise level in [0, 1], as the pipeline
        # passes t / 1000.
        return dict(hidden_states=tokens, timestep=sigmas.to(tokens.dtype), guidance=None,
                    encoder_hidden_states=caption.embeds, txt_ids=caption.text_ids, img_ids=image_ids)

    # ---- rendering
    def pipeline_for(self, parts, text_encoders: bool = False, transformer: bool = True):
        pipe = self.pipeline_class()(scheduler=parts.scheduler, vae=parts.vae,
                                     text_encoder=parts.text_encoder if text_encoders else None,
                                     tokenizer=parts.tokenizer if text_encoders else None,
                                     transformer=parts.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_inputs(self, embeddings: list, guidance: float) -> dict[str, Any]:
        inputs = dict(prompt_embeds=torch.cat([e.embeds for e in embeddings]), guidance_scale=guidance)
        if guidance > 1:  # the base model's CFG: the empty prompt as the negative, never re-encoded
            inputs["negative_prompt_embeds"] = torch.cat([e.negative for e in embeddings])
        return inputs


FLUX2_KLEIN = Flux2Klein()
