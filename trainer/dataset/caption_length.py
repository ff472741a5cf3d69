"""How much of a caption the model reads: its text encoders read a fixed number of tokens and cut off the rest, with
no word to the user. The page's caption step and ``python -m trainer train`` say how many tokens a caption is, for
each of the model family's text encoders (``ModelFamily.text_readers``: FLUX.1's T5 reads the job's
``max_text_tokens``, 512, and CLIP 77 for its pooled vector; FLUX.2 [klein]'s Qwen3 512 of the caption in its chat
template), and where a longer one is cut.

Counted with the model's own tokenizer when it is on this machine (the built-in tiny models once built, a local
diffusers folder, a Hub model in the local cache; nothing is downloaded for it), else estimated from the words, and
worded as an estimate. Counting is cheap; a tokenizer is loaded once per folder.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.families import DEMO_IDS, TextReader, family_of_spec, tiny_ids

ESTIMATE_NOTE = "an estimate: the model's tokenizer is not on this machine yet; it is counted exactly once it is"


@dataclass(frozen=True)
class Reading:
    """One text encoder's reading of a caption."""
    reader: TextReader
    tokens: int  # the caption's tokens as this encoder is given them (special tokens and chat template included)
    limit: int  # how many it reads
    exact: bool  # counted by the model's own tokenizer (False: estimated from the words)
    ignored: str = ""  # the start of the text it does not read (exact counts only)

    @property
    def over(self) -> int:
        return max(0, self.tokens - self.limit)


@dataclass(frozen=True)
class CaptionLength:
    model_label: str
    readings: tuple[Reading, ...]

    @property
    def exact(self) -> bool:
        return all(r.exact for r in self.readings)

    def summary(self) -> str:
        """One line: the caption's tokens for each encoder, of how many it reads."""
        about = "" if self.exact else "about "
        counts = ", ".join(f"{about}{r.tokens} {r.reader.name} tokens of the {r.limit} it reads" for r in self.readings)
        return f"Caption: {counts} ({self.model_label}" + (")." if self.exact else f"; {ESTIMATE_NOTE}).")

    def warnings(self) -> list[str]:
        """A sentence for each encoder the caption is too long for: how much it reads, and that the rest is ignored."""
        out = []
        main = next((r for r in self.readings if not r.reader.pooled), None)
        for r in self.readings:
            if not r.over:
                continue
            about = "" if r.exact else "about "
            where = f", from “{r.ignored}” on," if r.ignored else ""
            if r.reader.pooled:
                rest = (f" {main.reader.name} still reads the whole caption." if main is not None and not main.over
                        else "")
                out.append(f"The caption is {about}{r.tokens} {r.reader.name} tokens: {self.model_label}'s "
                           f"{r.reader.name} reads the first {r.limit} for its one-vector summary, and the rest{where} "
                           f"is ignored by it.{rest}")
            else:
                out.append(f"The caption is {about}{r.tokens} {r.reader.name} tokens, but {self.model_label} reads "
                           f"only the first {r.limit}: the rest{where} is ignored in training and in the previews. "
                           "Shorten the caption (the subject and what is in the picture first).")
        return out


def caption_length(caption: str, model: str, max_tokens: int | None = None) -> CaptionLength:
    """How ``model``'s text encoders read ``caption`` (the trigger word already in it); ``max_tokens``: the job's
    ``max_text_tokens`` (None: the family's)."""
    family = family_of_spec(model)
    readings = []
    for reader in family.text_readers:
        limit = reader.limit or max_tokens or family.max_text_tokens
        tokenizer = _tokenizer(_tokenizer_folder(model, reader.tokenizer))
        if tokenizer is None:
            readings.append(Reading(reader, estimate_tokens(caption, reader), limit, exact=False))
            continue
        limit = min(limit, getattr(tokenizer, "model_max_length", limit) or limit)  # the pipeline's own cap (T5: 512)
        readings.append(_count(tokenizer, reader, caption, limit))
    return CaptionLength(family.label, tuple(readings))


def estimate_tokens(caption: str, reader: TextReader) -> int:
    """About as many tokens as T5's, CLIP's or Qwen's tokenizer makes of English: 1.3 a word, 1 a mark or digit,
    plus the start/end marks (and a chat template's dozen)."""
    words = re.findall(r"[^\W\d_]+", caption)
    marks = re.findall(r"\d|[^\w\s]", caption)
    return math.ceil(1.3 * len(words)) + len(marks) + (12 if reader.chat else 2)


def _count(tokenizer, reader: TextReader, caption: str, limit: int) -> Reading:
    text = caption
    if reader.chat:  # as FLUX.2's pipeline does: the caption as the user's turn, the assistant's turn opened
        text = tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    tokens = len(tokenizer(text, verbose=False)["input_ids"])
    ignored = ""
    if tokens > limit and getattr(tokenizer, "is_fast", False):
        # where the read part ends: the last kept token's end, in the caption's own characters
        kept = tokenizer(text, truncation=True, max_length=limit, return_offsets_mapping=True, verbose=False)
        end = max((e for s, e in kept["offset_mapping"] if e > s), default=0) - max(0, text.find(caption))
        if 0 <= end < len(caption):
            ignored = " ".join(caption[end:].split()[:6]) + ("…" if len(caption[end:].split()) > 6 else "")
    return Reading(reader, tokens, limit, exact=True, ignored=ignored)


def _tokenizer_folder(model: str, subfolder: str) -> Path | None:
    """The tokenizer's folder when it is on this machine: a built tiny model, a local folder, the Hub cache."""
    from trainer.model.tiny import MARKER

    spec = (model or "").strip()
    if spec in tiny_ids():
        from trainer.paths import tiny_model_dir

        folder = tiny_model_dir(spec)
        return folder / subfolder if (folder / MARKER).is_file() else None  # built on first training, not here
    if spec in DEMO_IDS:
        from trainer.paths import shipped_model_dir

        return shipped_model_dir(spec) / subfolder  # shipped with the code: always on this machine
    local = Path(spec).expanduser()
    if (local / "model_index.json").is_file():
        return local / subfolder
    if re.match(r"^[\w.-]+/[\w.-]+$", spec):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(spec, f"{subfolder}/tokenizer_config.json",
                                           cache_dir=os.environ.get("HF_HUB_CACHE") or None)
        except Exception:  # an odd id or cache: no exact count, an estimate  # noqa: BLE001
            return None
        return Path(found).parent if isinstance(found, str) else None
    return None


@functools.lru_cache(maxsize=8)
def _tokenizer(folder: Path | None):
    if folder is None or not folder.is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # a tokenizer this transformers can't read: an estimate instead  # noqa: BLE001
        return None
