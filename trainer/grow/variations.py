"""What each candidate asks for: the one picture's caption plus one thing the set lacks.

A candidate is worth keeping when it shows the subject in a way the training pictures do not: another angle first
(the views no caption shows, by ``review.prompts``' stated rule, the most extreme first), then other poses, framing
and light. Every candidate is asked for on a plain background: the next round masks it anyway, and a busy background
is what a one-image LoRA invents worst. The user's own prompts come before all of these.

Two wordings of the same variation: ``caption`` is the training caption of the candidate (the source caption with its
``[trigger]``, plus the variation), what the next round trains on; ``instruction`` is what a reference-editing model
is told (it knows no trigger word, only "the same subject"), so it names what to change and what to keep.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from trainer.config import TRIGGER_PLACEHOLDER
from trainer.errors import UserError
from trainer.review.prompts import missing_views

MAX_CANDIDATES = 48  # a page of candidates to judge; the loop's "one good image out of 50" is a round, not a click
PLAIN_BACKGROUND = "on a plain light gray background"

VIEW_WORDS = {  # how a candidate asks for a view (review.prompts names the views)
    "back": "seen from behind, back view",
    "side": "seen from the side, side view, in profile",
    "three-quarter": "in a three-quarter view, turned partly away",
    "front": "facing the camera, front view",
    "full body": "full body shot, the whole subject in frame",
    "close-up": "close-up, filling the frame",
}
POSES = ("standing", "sitting", "walking", "looking over the shoulder")
LIGHTS = ("soft daylight", "warm evening light", "bright studio light")


@dataclass(frozen=True)
class Variation:
    caption: str  # the candidate's training caption, with [trigger] where the subject is named
    instruction: str  # the same change in words for a reference-editing model
    kind: str  # what it varies: "view: back", "pose: sitting", "your prompt", ...


def _with_placeholder(caption: str) -> str:
    caption = " ".join(caption.split()).rstrip(" ,.")
    return caption if TRIGGER_PLACEHOLDER in caption else f"{TRIGGER_PLACEHOLDER}, {caption}" if caption else \
        TRIGGER_PLACEHOLDER


def plan_variations(caption: str, captions: Sequence[str] = (), own_prompts: Sequence[str] = (),
                    count: int = 12) -> list[Variation]:
    """``count`` variations of ``caption`` (the source run's caption, with or without ``[trigger]``): the user's
    ``own_prompts`` first, then each view ``captions`` (all the set's captions) do not show, then poses and light,
    cycling through views x poses x lights until ``count`` (a repeat of a combination is drawn with another seed)."""
    if not 1 <= count <= MAX_CANDIDATES:
        raise UserError(f"Ask for 1 to {MAX_CANDIDATES} candidates (got {count}).")
    base = _with_placeholder(caption)
    out = [Variation(caption=_with_placeholder(p), instruction=p.replace(TRIGGER_PLACEHOLDER, "the subject").strip(),
                     kind="your prompt") for p in own_prompts if p.strip()]
    views = missing_views(list(captions) or [caption]) or ["three-quarter", "side", "back"]
    # the views the set lacks first, each alone; then every view with each pose and light
    for view in views:
        out.append(Variation(caption=f"{base}, {VIEW_WORDS[view]}, {PLAIN_BACKGROUND}",
                             instruction=f"the same subject {VIEW_WORDS[view]}, {PLAIN_BACKGROUND}; keep its "
                                         "identity, colours and details",
                             kind=f"view: {view}"))
    combos = itertools.cycle(itertools.product(POSES, views, LIGHTS))
    while len(out) < count:
        pose, view, light = next(combos)
        out.append(Variation(caption=f"{base}, {pose}, {VIEW_WORDS[view]}, {light}, {PLAIN_BACKGROUND}",
                             instruction=f"the same subject {pose}, {VIEW_WORDS[view]}, {light}, "
                                         f"{PLAIN_BACKGROUND}; keep its identity, colours and details",
                             kind=f"pose: {pose}, view: {view}"))
    return out[:count]
