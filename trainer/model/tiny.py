"""The built-in tiny models (``tiny-demo``): a model family's whole pipeline, small enough for a CPU, on disk once.

Each family builds its tiny pipeline in code (``ModelFamily.build_tiny_pipeline``: every part from a config, random
weights); here it is saved with ``save_pretrained`` in the standard diffusers layout, so it is loaded by exactly the
same code as the full-size model. It exists to try the workflow and to test it: its samples are noise. A few
thousand parameters per layer keep a CPU training step to a fraction of a second.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

_CORPUS = [
    "a photo of a person standing in a field",
    "a watercolor painting of a cat with red hair",
    "a character in a blue coat seen from the back",
    "a close up portrait, studio light, white background",
    "a dog, a car, a house, a tree, a mountain, the sea",
    "anime style drawing of a girl holding a revolver",
]


def byte_level_tokenizer(max_length: int, corpus: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE: any prompt tokenizes to real ids, so different prompts give different embeddings.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS + list(corpus or []), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="<pad>",
                                   unk_token="<unk>", eos_token="</s>")


# A chat template of Qwen's shape (what FLUX.2's pipeline wraps every prompt in): role, content, the assistant's turn.
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(max_length: int):
    """``byte_level_tokenizer`` with Qwen's chat markers and a chat template (a tiny FLUX.2 [klein]'s tokenizer)."""
    tok = byte_level_tokenizer(max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _CHAT_TEMPLATE
    return tok


MARKER = "tiny_demo.json"  # written last into a complete tiny model folder: its family and version


def _current(directory: Path, family) -> bool:
    """``directory`` holds a complete tiny model of this family and version."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return data.get("version") == family.tiny_version and data.get("family", "flux1") == family.name  # a marker without one: FLUX.1, the first family


def ensure_tiny_model(directory: Path, family) -> Path:
    """Build ``family``'s tiny pipeline into ``directory`` once; later calls reuse it. Returns the folder."""
    directory = Path(directory)
    if _current(directory, family):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary sibling and rename: two processes starting at once never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-demo-", dir=directory.parent))
    try:
        family.build_tiny_pipeline().save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps({
            "version": family.tiny_version, "family": family.name,
            "note": "Random weights: for trying the workflow and for tests. Its samples are noise."}))
        if _current(directory, family):  # another process (a multi-GPU run's other rank) finished first and may be
            return directory      # loading it already: keep its copy
        if directory.exists():
            shutil.rmtree(directory)
        try:
            os.rename(tmp, directory)  # refuses a non-empty target: never replaces a copy someone just put there
        except OSError:
            if not _current(directory, family):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
