"""Suggested test prompts (trainer/review/prompts.py): the views the training images do not show, read from their
captions (one image or a set), and which of them the checkpoint advice renders."""
from __future__ import annotations

from trainer.config import TrainingConfig
from trainer.review.prompts import NEW_VIEW, caption_views, missing_views, suggest_prompts, views_shown

CFG = TrainingConfig(caption="a photo of [trigger], a woman in a green coat", trigger="ohwx")


def view_prompts(captions=()) -> dict[str, str]:
    return {p.kind[len(NEW_VIEW):-1]: p.text for p in suggest_prompts(CFG, captions) if p.kind.startswith(NEW_VIEW)}


def test_the_views_a_caption_shows_by_the_stated_rule():
    assert caption_views("a photo of [trigger] standing in a park") == {"front"}  # no angle named: a front view
    assert caption_views("[trigger] seen from behind, full-body shot") == {"back", "full body"}
    assert caption_views("A Close-Up of [trigger] in profile") == {"close-up", "side"}
    assert caption_views("[trigger], closeup, three-quarter view") == {"close-up", "three-quarter"}
    # phrases as words: not "background", nor "side" alone
    assert caption_views("[trigger] in the background, on the left side of the picture") == {"front"}
    assert views_shown(["[trigger], front view", "[trigger], side view", "[trigger] from the back"]) == {
        "front", "side", "back"}


def test_one_image_gets_prompts_for_the_views_its_caption_does_not_show():
    # a caption naming no view: a front view, so the back (the prompt of before), side and three-quarter views, and
    # both framings; the back view first
    views = view_prompts()
    assert list(views) == ["back", "side", "three-quarter", "full body", "close-up"]
    assert views["back"] == "ohwx seen from behind, back view, full body"
    assert all("ohwx" in text for text in views.values())
    back = TrainingConfig(caption="[trigger] from behind, a close-up", trigger="ohwx")
    assert missing_views([back.caption]) == ["side", "three-quarter", "front", "full body"]
    assert "back" not in {p.kind for p in suggest_prompts(back)} and any(
        "front view" in p.text for p in suggest_prompts(back))


def test_a_set_gets_prompts_for_the_views_none_of_its_captions_show():
    fronts = ["a photo of [trigger], front view, close-up", "[trigger] facing the camera", "[trigger] in a park"]
    assert list(view_prompts(fronts)) == ["back", "side", "three-quarter", "full body"]
    turned = fronts + ["[trigger], back view, full body shot", "[trigger] in profile"]
    views = view_prompts(turned)
    assert list(views) == ["three-quarter"]
    assert all("back view" not in p.text for p in suggest_prompts(CFG, turned))
    every = turned + ["[trigger], three-quarter view"]
    assert view_prompts(every) == {}
    texts = [p.text for p in suggest_prompts(CFG, every)]
    assert texts[0] == CFG.training_caption and any("watercolor" in t for t in texts) and len(set(texts)) == len(texts)


def test_the_advice_renders_the_most_extreme_missing_view_of_the_runs_own_captions(tmp_path):
    from tests.conftest import subject_image
    from trainer.dataset.imageset import SetImage
    from trainer.review.advisor import advice_spec
    from trainer.runs.folder import RunFolder

    image, mask = subject_image()
    one = RunFolder.create_at(tmp_path / "one", CFG, image, mask)
    assert one.captions() == [CFG.caption]
    assert advice_spec(one).prompts == ("ohwx seen from behind, back view, full body",  # as before sets
                                        "ohwx with short blue hair, wearing a black leather jacket",
                                        "a watercolor painting of ohwx")
    images = [SetImage("a.png", image, mask, "[trigger], back view"), SetImage("b.png", image, None, "[trigger]"),
              SetImage("c.png", image, None, "")]  # "": the config's caption
    run = RunFolder.open(RunFolder.create_set_at(tmp_path / "set", CFG, images).path)  # read back from run.json
    assert run.captions() == ["[trigger], back view", "[trigger]", CFG.caption]
    assert advice_spec(run).prompts[0] == "ohwx seen from the side, side view, in profile"
