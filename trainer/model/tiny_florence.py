"""``tiny-caption``: a Florence-2 captioner small enough for a CPU, built in code and saved in the real on-disk layout.

Every part is the one the full-size Florence-2 (``florence-community/Florence-2-base``) loads with: a
``Florence2ForConditionalGeneration`` (DaViT vision tower + BART encoder-decoder) from a ``Florence2Config``, and a
``Florence2Processor`` made of a ``CLIPImageProcessor`` and a byte-level BPE tokenizer with BART's special tokens
(``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3) and Florence's ``<image>`` token. ``save_pretrained`` writes
config.json, generation_config.json, model.safetensors, processor_config.json and the tokenizer files, and
``trainer.dataset.caption`` loads the folder with exactly the code that loads the real model. The weights are random:
it exists to try the workflow and to test it, and its captions are gibberish.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_CAPTION = "tiny-caption"
TINY_CAPTION_VERSION = 1
MARKER = "tiny_caption.json"  # written last into a complete folder
IMAGE_SIZE = 64  # pixels; the vision tower's two stages (stride 4, then 2) give 8 x 8 = 64 spatial tokens
IMAGE_TOKENS = (IMAGE_SIZE // 8) ** 2 + 1  # + 1 temporal token (Florence2MultiModalProjector)

_CORPUS = [
    "The image shows a woman with long red hair standing in a field of flowers.",
    "The image is a close up of a cartoon character in a blue coat, seen from the back.",
    "A dog is sitting on the grass in front of a house. The sky is blue and there are trees.",
    "Describe with a paragraph what is shown in the image.",
    "a man, a girl, a cat, a red ball, a car, a mountain, the sea, white background",
]
_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]  # BART's ids 0-4, then the image token


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>",
                                   extra_special_tokens={"image_token": "<image>"}, model_max_length=1024)


def build_tiny_florence(seed: int = 0):
    """(model, processor): a random-weight Florence-2 of a few hundred kB and its processor."""
    import torch
    from transformers import (CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)

    tokenizer = tiny_tokenizer()
    images = CLIPImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=IMAGE_TOKENS,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor = Florence2Processor(image_processor=images, tokenizer=tokenizer,
                                   post_processor_config={"pure_text": {}})
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=512, d_model=16,
                         encoder_layers=1, encoder_ffn_dim=32, encoder_attention_heads=2, decoder_layers=1,
                         decoder_ffn_dim=32, decoder_attention_heads=2, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0),
        vision_config=dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                           patch_prenorm=[False, True], embed_dim=[8, 16], num_heads=[1, 2], num_groups=[1, 2],
                           window_size=4, projection_dim=16, drop_path_rate=0.0),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    return Florence2ForConditionalGeneration(config).eval(), processor


def _current(directory: Path) -> bool:
    try:
        return json.loads((directory / MARKER).read_text()).get("version") == TINY_CAPTION_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_florence(directory: Path) -> Path:
    """Build the tiny captioner into ``directory`` once (into a temporary sibling, then renamed); later calls reuse
    it. Returns the folder."""
    directory = Path(directory)
    if _current(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-caption-", dir=directory.parent))
    try:
        model, processor = build_tiny_florence()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({
            "version": TINY_CAPTION_VERSION,
            "note": "Random weights: for trying the workflow and for tests. Its captions are gibberish."}))
        if _current(directory):
            return directory
        if directory.exists():
            shutil.rmtree(directory)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not _current(directory):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
