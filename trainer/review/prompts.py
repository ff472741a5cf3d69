"""Suggested test prompts for judging checkpoints, as practitioners write them (docs/PRACTICE.md §5).

Memorisation (the original caption), a small change (a colour), extremes (the views no training image shows, the
back view first), flexibility (other hair and clothes, another medium) and short / medium / long prompts; each names
the subject.

Which views the training images show is read from their captions, by one stated rule (``views_shown``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

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

# ---- views
# The rule: a caption shows a view when it contains one of that view's phrases below (whole words, any case; a space
# in a phrase also matches a hyphen or nothing: "close-up", "close up" and "closeup" are one). A caption that names
# no angle (front, three-quarter, side, back) is a front view: an ordinary picture faces its subject. A caption that
# names no framing (close-up, full body) shows neither. The training images show the union of their captions' views;
# every view they do not show gets a test prompt, the most extreme first.
ANGLES = ("front", "three-quarter", "side", "back")
VIEW_PHRASES = {
    "back": ("back view", "from behind", "from the back", "rear view", "back to the camera", "facing away"),
    "side": ("side view", "from the side", "profile"),
    "three-quarter": ("three quarter", "three quarters", "3/4 view"),
    "front": ("front view", "from the front", "frontal", "facing the camera", "facing forward", "facing the viewer"),
    "close-up": ("close up", "extreme close up", "headshot", "macro"),
    "full body": ("full body", "full length", "whole body", "head to toe"),
}
NEW_VIEW = "extreme (a view the training images do not show: "  # + the view + ")"
_VIEW_ORDER = ("back", "side", "three-quarter", "front", "full body", "close-up")  # most extreme first


def _view_prompt(view: str, subject: str) -> str:
    return {
        "back": f"{subject} seen from behind, back view, full body",  # the one-image back view of before
        "side": f"{subject} seen from the side, side view, in profile",
        "three-quarter": f"{subject} in a three-quarter view, turned partly away from the camera",
        "front": f"{subject} facing the camera, front view",
        "full body": f"a full body shot of {subject}, the whole subject in frame, wide shot",
        "close-up": f"an extreme close-up of {subject}, filling the frame",
    }[view]


def _pattern(phrase: str) -> re.Pattern:
    words = [re.escape(w) for w in re.split(r"[\s-]+", phrase)]
    return re.compile(r"(?<![\w/])" + r"[\s-]?".join(words) + r"(?![\w/])", re.IGNORECASE)


_PATTERNS = {view: [_pattern(p) for p in phrases] for view, phrases in VIEW_PHRASES.items()}


def caption_views(caption: str) -> set[str]:
    """The views one caption shows, by the rule above (no angle named: front)."""
    views = {view for view, patterns in _PATTERNS.items() if any(p.search(caption) for p in patterns)}
    if not views & set(ANGLES):
        views.add("front")
    return views


def views_shown(captions: Sequence[str]) -> set[str]:
    """The views the training images show: the union over their captions."""
    return set().union(*(caption_views(c) for c in captions)) if captions else {"front"}


def missing_views(captions: Sequence[str]) -> list[str]:
    """The views no caption shows, the most extreme first."""
    shown = views_shown(captions)
    return [view for view in _VIEW_ORDER if view not in shown]


def suggest_prompts(config: TrainingConfig, captions: Sequence[str] = ()) -> list[SuggestedPrompt]:
    """Test prompts as practitioners write them: memorisation, a small change, the views the training images do not
    show, flexibility, and short / medium / long prompts. Every one names the subject (the trigger word when there is
    one). ``captions``: the training images' captions (``RunFolder.captions()``); none = the config's one caption."""
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
    out += [SuggestedPrompt(f"{NEW_VIEW}{view})", _view_prompt(view, subject))
            for view in missing_views(list(captions) or [config.caption])]
    out += [
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
