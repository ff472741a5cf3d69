"""A caption longer than the text encoders read (``trainer.dataset.caption_length``): counted with the model's own
tokenizer when it is on disk (the tiny models), else estimated and said to be; the page's caption step and the CLI
say how much is read and that the rest is ignored."""
from __future__ import annotations

from trainer import api
from trainer.families import FLUX1, FLUX2_KLEIN
from ui.caption_step import length_note

LONG = "ohwx, a woman with red hair in a green coat holding a blue umbrella, " * 30  # > 512 tokens in every tokenizer


def test_flux1_counts_t5_and_clip_with_the_models_own_tokenizers_and_names_where_the_caption_is_cut(tiny_model_dir):
    from transformers import AutoTokenizer

    t5 = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer_2")
    short = api.caption_length("a photo of ohwx", "tiny-demo")
    assert short.exact and not short.warnings()
    assert [(r.reader.name, r.limit) for r in short.readings] == [("T5", 512), ("CLIP", 77)]
    assert short.summary().startswith(f"Caption: {len(t5('a photo of ohwx').input_ids)} T5 tokens of the 512 it reads")

    long = api.caption_length(LONG, "tiny-demo")
    t5_reading, clip_reading = long.readings
    assert t5_reading.tokens == len(t5(LONG).input_ids) > 512 and t5_reading.over == t5_reading.tokens - 512
    # the pipeline's own truncation (max_sequence_length=512) keeps exactly the text before the quoted cut
    kept = t5.decode(t5(LONG, truncation=True, max_length=512).input_ids, skip_special_tokens=True)
    assert LONG.strip().startswith(kept.strip()) and t5_reading.ignored.split()[0] in LONG[len(kept) - 3:]
    t5_warning, clip_warning = long.warnings()
    assert (f"The caption is {t5_reading.tokens} T5 tokens, but FLUX.1 [dev] reads only the first 512: the rest, "
            f"from “{t5_reading.ignored}” on, is ignored in training and in the previews.") in t5_warning
    assert "CLIP reads the first 77 for its one-vector summary" in clip_warning
    assert api.caption_length(LONG, "tiny-demo", max_tokens=300).readings[0].limit == 300  # the job's own setting


def test_klein_reads_its_max_text_tokens_of_the_caption_in_its_chat_template(tiny_klein_dir):
    reading, = api.caption_length(LONG, str(tiny_klein_dir)).readings
    assert reading.exact and reading.reader.name == "Qwen3" and reading.limit == FLUX2_KLEIN.max_text_tokens
    assert api.caption_length("x", str(tiny_klein_dir)).readings[0].tokens > 3  # the template's tokens count too
    assert "but FLUX.2 [klein] reads only the first 512" in api.caption_length(LONG, str(tiny_klein_dir)).warnings()[0]


def test_without_the_tokenizer_on_disk_the_count_is_an_estimate_and_says_so():
    # The Hub models are not in this machine's cache (and nothing is downloaded to count)
    for model, family in (("black-forest-labs/FLUX.1-dev", FLUX1), ("black-forest-labs/FLUX.2-klein-base-4B",
                                                                   FLUX2_KLEIN)):
        length = api.caption_length(LONG, model)
        assert not length.exact and [r.reader.name for r in length.readings] == [r.name for r in family.text_readers]
        assert "about" in length.summary() and "an estimate" in length.summary()
        assert all(w.startswith("The caption is about ") for w in length.warnings()) and length.warnings()
    assert 10 <= api.caption_length("a photo of ohwx, a red ball on a beach", "black-forest-labs/FLUX.1-dev"
                                    ).readings[0].tokens <= 16


def test_the_caption_step_shows_the_length_with_the_trigger_word_in_it():
    assert length_note("a photo of [trigger]", "ohwx", "tiny-demo", "cpu-demo-40").startswith("Caption: ")
    assert "⚠️" not in length_note("a photo of [trigger]", "ohwx", "tiny-demo", "cpu-demo-40")
    note = length_note(LONG.replace("ohwx", "[trigger]"), "ohwx", "tiny-demo", "cpu-demo-40")
    assert "⚠️ The caption is" in note and "is ignored in training" in note
    assert length_note("  ", "ohwx", "tiny-demo", None) == ""


def test_the_cli_warns_that_a_long_caption_is_cut(tmp_path):
    from tests.conftest import subject_image
    from tests.test_cli import cli

    image = tmp_path / "a.png"
    subject_image((96, 112))[0].save(image)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")  # an output folder in use: the run stops right after the warnings
    result = cli("train", "--image", image, "--caption", LONG, "--model", "tiny-demo", "--no-mask", "--output", taken)
    assert result.returncode == 2 and "already exists" in result.stderr, result.stderr
    assert "warning: The caption is " in result.stderr and "FLUX.1 [dev] reads only the first 512" in result.stderr
