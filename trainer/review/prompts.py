"""Suggested test prompts for judging checkpoints, as practitioners write them (docs/PRACTICE.md §5).

Memorisation (the original caption), a small change (a colour), an extreme (the back view), flexibility (other hair
and clothes, another medium) and short / medium / long prompts; each names the subject.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.config import TrainingConfig
@dataclass(frozen=True)
class SuggestedPrompt:
    kind: str  # what it tests
    text: str


_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "brown", "gray",
            "grey", "blonde", "silver", "gold"]
_SWAP = {"red": "blue", "blue": "red", "green": "purple", "yellow": "purple", "purple": "green",
         "orange": "blue", "pink": "green", "black": "white", "white": "black", "brown": "blue",
         "gray": "red", "grey": "red", "blonde": "black", "silver": "gold", "gold": "silver"}


def suggest_prompts(config: TrainingConfig) -> list[SuggestedPrompt]:
    """Test prompts as practitioners write them: memorisation, a small change, an extreme, flexibility,
    and short / medium / long prompts. Every one names the subject (the trigger word when there is one)."""
    caption = config.training_caption
    subject = config.trigger.strip() or caption
    out = [SuggestedPrompt("original caption (can it re-create the image?)", caption)]
    colour = re.search(r"\b(" + "|".join(_COLOURS) + r")\b", caption, flags=re.IGNORECASE)
    if colour:
        word = colour.group(1)
        swapped = _SWAP[word.lower()]
        out.append(SuggestedPrompt("small change (a colour)",
                                   caption[:colour.start()] + swapped + caption[colour.end():]))
    else:
        out.append(SuggestedPrompt("small change (a colour)", f"{caption}, wearing a bright red scarf"))
    out += [
        SuggestedPrompt("extreme (back view)", f"{subject} seen from behind, back view, full body"),
        SuggestedPrompt("flexibility (other hair and clothes)",
                        f"{subject} with short blue hair, wearing a black leather jacket"),
        SuggestedPrompt("flexibility (another medium)", f"a watercolor painting of {subject}"),
        SuggestedPrompt("short prompt", f"{subject}"),
        SuggestedPrompt("medium prompt", f"{subject} sitting in a cafe, holding a cup of coffee, warm evening light"),
        SuggestedPrompt("long prompt", (
            f"a cinematic wide shot of {subject} standing on a rain-soaked street in a neon-lit city at night, "
            "reflections on the wet asphalt, people with umbrellas walking past in the background, steam rising "
            "from a food stall, shallow depth of field, dramatic rim lighting, highly detailed, 35mm film grain")),
    ]
    seen, unique = set(), []
    for s in out:
        if s.text not in seen:
            seen.add(s.text)
            unique.append(s)
    return unique
