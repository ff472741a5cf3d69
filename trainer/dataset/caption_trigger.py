"""Where the trigger goes in an automatic caption: one simple rule, stated here and tested on given sentences.

The rule (``place_trigger``), applied to the caption a captioner wrote:

1. A caption that already holds the placeholder (``[trigger]``) or the trigger word is left as it is.
2. Otherwise the first *subject noun phrase* gets the placeholder right before its noun, DreamBooth-style, so the
   class word stays: "The image shows a young woman with red hair" -> "The image shows a young [trigger] woman with
   red hair". A subject noun phrase is an article (a, an, the) followed by at most four words and then a noun from
   ``SUBJECT_NOUNS`` (people, characters, animals, and a few things people train: a doll, a robot, a car...), with
   no preposition, verb or punctuation between the article and the noun; plurals count ("the two dogs").
3. When no such phrase is found (an object the list does not name, "a red ball"), the placeholder is put first, as
   ``TrainingConfig.with_trigger`` does with a caption without one: "[trigger], the image shows a red ball".

The user reads and edits the result (moves ``[trigger]``, cuts what should be learned into the trigger), so the
rule needs to be predictable rather than clever.
"""
from __future__ import annotations

import re

from trainer.config import TRIGGER_PLACEHOLDER

SUBJECT_NOUNS = frozenset("""
    woman man girl boy person lady gentleman guy child kid baby toddler teenager teen adult people
    character figure figurine doll toy plush plushie mascot robot android cyborg creature monster alien
    warrior knight soldier princess prince queen king wizard witch elf fairy superhero hero heroine
    dog puppy cat kitten bird parrot horse pony rabbit bunny bear fox wolf lion tiger dragon animal
    car vehicle statue sculpture bottle shoe sneaker bag handbag watch
""".split())
_ARTICLES = frozenset({"a", "an", "the"})
_MAX_WORDS_BETWEEN = 4
# words that end the phrase before a noun is reached: "a picture of", "a woman is", "the image shows"
_STOP = frozenset("""
    of with in on at by for from to into onto over under behind near and or but is are was were be being has have
    shows show showing depicts depicting features featuring looks looking appears seems that which who while as
""".split())
_LOWER_FIRST = frozenset("a an the this these there in it on at one two three four five several some many".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[^\sA-Za-z]")


def _noun(word: str) -> bool:
    w = word.lower()
    if w in SUBJECT_NOUNS:
        return True
    irregular = {"women": "woman", "men": "man", "children": "child", "wolves": "wolf"}
    if w in irregular:
        return True
    return w.endswith("s") and (w[:-1] in SUBJECT_NOUNS or (w.endswith("es") and w[:-2] in SUBJECT_NOUNS))


def subject_noun_span(caption: str) -> tuple[int, int] | None:
    """(start, end) character offsets of the first subject noun (rule 2), or None."""
    tokens = list(_WORD.finditer(caption))
    for i, token in enumerate(tokens):
        if token.group().lower() not in _ARTICLES:
            continue
        for candidate in tokens[i + 1:i + 2 + _MAX_WORDS_BETWEEN]:
            text = candidate.group()
            if not text[0].isalpha() or text.lower() in _STOP or text.lower() in _ARTICLES:
                break
            if _noun(text):
                return candidate.start(), candidate.end()
    return None


def place_trigger(caption: str, trigger: str = TRIGGER_PLACEHOLDER) -> str:
    """``caption`` with ``trigger`` (default: the ``[trigger]`` placeholder) placed by the rule above."""
    caption = " ".join((caption or "").split())
    trigger = (trigger or "").strip() or TRIGGER_PLACEHOLDER
    if TRIGGER_PLACEHOLDER in caption or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    if not caption:
        return trigger
    span = subject_noun_span(caption)
    if span is not None:
        return f"{caption[:span[0]]}{trigger} {caption[span[0]:]}"
    first = caption.split(" ", 1)[0]
    if first.lower() in _LOWER_FIRST:  # "The image shows" -> "[trigger], the image shows"; a name keeps its capital
        caption = first.lower() + caption[len(first):]
    return f"{trigger}, {caption}"
