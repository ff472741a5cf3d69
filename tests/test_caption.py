"""Automatic captions with Florence-2, on a tiny random Florence-2 built in code and saved as the real one is.

Its captions are gibberish, so what is tested is what can be honestly: the real loading and ``generate`` code runs
and gives a string per picture, the trigger rule on given sentences, the model loaded once and released by
``free()``, the offline message, the Hub cache path, the download progress, and the files the CLI writes (read back
by the kohya folder loader).
"""
from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
from PIL import Image

from trainer.config import TRIGGER_PLACEHOLDER as T
from trainer.dataset import caption
from trainer.dataset.caption_trigger import place_trigger
from trainer.errors import UserError

TOKENS = 6  # new tokens per caption: enough to run the real beam search, quick on a CPU


@pytest.fixture(scope="session")
def tiny_florence(tmp_path_factory) -> Path:
    from trainer.model.tiny_florence import ensure_tiny_florence

    return ensure_tiny_florence(tmp_path_factory.mktemp("models") / "tiny-caption")


@pytest.fixture(autouse=True)
def nothing_loaded():
    caption.free()
    yield
    caption.free()


def pictures(n=2):
    return [Image.new("RGB", (128 + 16 * i, 96), (40 * i, 120, 200)) for i in range(n)]


# ---- the trigger rule, on given sentences -------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("The image shows a young woman with long red hair standing in a field.",
     f"The image shows a young {T} woman with long red hair standing in a field."),
    ("The image is a close-up of a cartoon character in a blue coat.",
     f"The image is a close-up of a cartoon {T} character in a blue coat."),
    ("A dog is sitting on the grass next to a man.", f"A {T} dog is sitting on the grass next to a man."),
    ("The image shows the two small dogs on a sofa.", f"The image shows the two small {T} dogs on a sofa."),
    ("In this image we can see a picture of a cat.", f"In this image we can see a picture of a {T} cat."),
    # no subject noun the list knows: the placeholder goes first, as with_trigger does with a caption without one
    ("A red ball on the grass.", f"{T}, a red ball on the grass."),
    ("The image shows a mountain lake at sunset.", f"{T}, the image shows a mountain lake at sunset."),
    ("Two women walking.", f"{T}, two women walking."),  # no article before the noun: not a subject phrase
    # already placed: left alone
    (f"a photo of {T}, a man", f"a photo of {T}, a man"),
    ("", T),
])
def test_the_trigger_placeholder_goes_before_the_first_subject_noun(text, expected):
    assert place_trigger(text) == expected


def test_a_trigger_word_is_placed_instead_of_the_placeholder_and_not_twice():
    assert place_trigger("The image shows a woman in a coat.", "ohwx") == "The image shows a ohwx woman in a coat."
    assert place_trigger("ohwx, a woman in a coat", "ohwx") == "ohwx, a woman in a coat"
    assert place_trigger("a  woman\n in a coat") == f"a {T} woman in a coat"  # whitespace tidied


# ---- the tiny model on disk ------------------------------------------------------------------------------------
def test_the_tiny_florence_is_saved_in_the_real_layout(tiny_florence):
    names = {p.name for p in tiny_florence.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert {"processor_config.json", "preprocessor_config.json"} & names
    config = json.loads((tiny_florence / "config.json").read_text())
    assert config["model_type"] == "florence2" and "auto_map" not in config  # native, not remote code
    assert caption.check_florence_folder(tiny_florence) == tiny_florence


# ---- captioning through the real loading and generate code -------------------------------------------------------
def test_caption_images_runs_the_real_generate_path_and_places_the_trigger(tiny_florence):
    told = []
    captions = caption.caption_images(pictures(2), model=str(tiny_florence), progress=lambda f, m: told.append((f, m)),
                                      device="cpu", max_new_tokens=TOKENS)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert all(c.count(T) == 1 for c in captions)
    assert caption.loaded() == [(str(tiny_florence), "cpu")]
    messages = [m for _, m in told]
    assert messages[0].startswith("Loading the caption model on the CPU")
    assert "Captioning picture 2 of 2" in messages and told[-1] == (1.0, "Captioned 2 picture(s)")
    assert caption.caption_images([], model=str(tiny_florence)) == []


def test_generation_is_what_florence_produces_for_the_detailed_caption_task(tiny_florence):
    """The caption is the decoded output of Florence-2's own generate for <MORE_DETAILED_CAPTION>, tidied."""
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    image = pictures(1)[0]
    processor = AutoProcessor.from_pretrained(tiny_florence)
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_florence).eval()
    inputs = processor(text="<MORE_DETAILED_CAPTION>", images=image, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=TOKENS, num_beams=3, do_sample=False)
    direct = processor.post_process_generation(processor.batch_decode(ids, skip_special_tokens=False)[0],
                                               task="<MORE_DETAILED_CAPTION>", image_size=image.size)
    captioner = caption.load_captioner(str(tiny_florence), device="cpu")
    assert caption.describe(captioner, image, TOKENS) == " ".join(direct["<MORE_DETAILED_CAPTION>"].split())


def test_the_model_loads_once_per_model_and_device(tiny_florence, monkeypatch):
    from transformers import Florence2ForConditionalGeneration

    loads = []
    real = Florence2ForConditionalGeneration.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Florence2ForConditionalGeneration, "from_pretrained", classmethod(counting))
    first = caption.load_captioner(str(tiny_florence), device="cpu")
    caption.caption_images(pictures(1), model=str(tiny_florence), device="cpu", max_new_tokens=TOKENS)
    caption.caption_images(pictures(2), model=str(tiny_florence), device="cpu", max_new_tokens=TOKENS)
    assert caption.load_captioner(str(tiny_florence), device="cpu") is first
    assert len(loads) == 1


def test_free_releases_the_model(tiny_florence):
    captioner = caption.load_captioner(str(tiny_florence), device="cpu")
    model = weakref.ref(captioner.model)
    del captioner
    assert caption.free() is True
    gc.collect()
    assert model() is None and caption.loaded() == []
    assert caption.free() is False  # nothing left to free


def test_a_training_job_frees_the_caption_model_first(tiny_florence, tmp_path):
    from tests.conftest import subject_image
    from trainer.config import TrainingConfig
    from trainer.events import Finished
    from trainer.jobs.manager import JobManager
    from trainer.runs.folder import RunFolder

    seen = []

    def runner(run, should_stop, token=None, **extra):
        seen.append(caption.loaded())
        yield Finished(run_dir=run.path, last_step=0, stopped=False)

    caption.load_captioner(str(tiny_florence), device="cpu")
    manager = JobManager(runner=runner)
    image, mask = subject_image()
    list(manager.submit("alice", RunFolder.create(tmp_path, TrainingConfig(), image, mask)).follow())
    manager.shutdown()
    assert seen == [[]]


def test_the_tiny_caption_id_builds_it_in_the_data_folder(isolated_data_dir):
    folder = caption.caption_model_folder("tiny-caption")
    assert folder == isolated_data_dir / "models" / "tiny-caption" and (folder / "model.safetensors").is_file()


# ---- the Hub: offline message, the cache, progress ------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["florence-community/Florence-2-base", "base", "microsoft/Florence-2-base"])
def test_offline_and_not_cached_is_a_sentence_naming_the_model_and_the_ways_to_get_it(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache; conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(UserError) as err:
        caption.caption_model_folder(spec)
    text = str(err.value)
    assert "'florence-community/Florence-2-base'" in text  # microsoft's id is read as the native conversion
    assert "HF_HUB_OFFLINE" in text and "hf download florence-community/Florence-2-base" in text
    assert "--model FOLDER" in text


def test_a_hub_id_in_the_local_cache_loads_offline(tiny_florence, tmp_path, monkeypatch):
    """The real huggingface_hub path, offline: a cache laid out as the Hub client writes it."""
    repo = tmp_path / "models--florence-community--Florence-2-base"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_florence, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    told = []
    captions = caption.caption_images(pictures(1), progress=lambda f, m: told.append(m), device="cpu",
                                      max_new_tokens=TOKENS)  # the default model
    assert len(captions) == 1 and not any(m.startswith("Downloading") for m in told)
    assert caption.loaded() == [(str(repo / "snapshots" / commit), "cpu")]


def test_the_download_bar_reports_bytes_to_the_progress_callback():
    told = []
    bar = caption.download_bar(lambda f, m: told.append((f, m)), "florence-community/Florence-2-base", every_s=0)(
        total=4_000_000, unit="B", desc="Downloading bytes", name="huggingface_hub.snapshot_download")
    bar.update(1_000_000)
    bar.update(3_000_000)
    bar.close()
    assert told == [(0.25, "Downloading florence-community/Florence-2-base: 1 of 4 MB"),
                    (1.0, "Downloading florence-community/Florence-2-base: 4 of 4 MB")]
    files = caption.download_bar(lambda f, m: told.append((f, m)), "x")(total=3, desc="Fetching 3 files")
    files.update(1)  # the files bar (not bytes) says nothing
    assert len(told) == 2


@pytest.mark.parametrize("config,expected", [
    (None, "has no config.json"),
    ({"model_type": "bart"}, "holds a 'bart' model, not Florence-2"),
    ({"model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"}},
     "remote-code version"),
    ({"model_type": "florence2"}, "no .safetensors weights"),
])
def test_a_folder_that_is_not_a_native_florence_is_refused_with_a_reason(tmp_path, config, expected):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=expected):
        caption.caption_model_folder(str(tmp_path))


def test_a_model_that_is_neither_folder_nor_hub_id_is_refused():
    with pytest.raises(UserError, match="neither an existing folder nor a Hugging Face id"):
        caption.caption_model_folder("./no/such/folder")


# ---- the CLI: NAME.txt next to each picture, the layout train --dataset reads --------------------------------------
def test_cli_caption_writes_kohya_captions_that_the_dataset_loader_reads(tiny_florence, tmp_path, monkeypatch, capsys):
    from trainer.cli import main
    from trainer.dataset.imageset import load_folder

    for i, image in enumerate(pictures(2)):
        image.save(tmp_path / f"view {i}.png")
    (tmp_path / "view 1.txt").write_text("my own words about [trigger]")
    quick = ["--model", str(tiny_florence), "--max-tokens", str(TOKENS)]
    assert main(["caption", str(tmp_path), *quick]) == 0
    out = capsys.readouterr()
    assert "kept" in out.err and "view 1.txt" in out.err  # the user's caption is not replaced
    written = (tmp_path / "view 0.txt").read_text(encoding="utf-8")
    assert written.endswith("\n") and written.count(T) == 1
    assert f"view 0.txt: {written.strip()}" in out.out
    loaded = load_folder(tmp_path)
    assert [item.caption for item in loaded.images] == [" ".join(written.split()), "my own words about [trigger]"]

    assert main(["caption", str(tmp_path / "view 1.png"), *quick, "--trigger", "ohwx", "--overwrite"]) == 0
    replaced = (tmp_path / "view 1.txt").read_text(encoding="utf-8")
    assert "ohwx" in replaced and T not in replaced


def test_cli_caption_offline_is_one_line_naming_the_model(tmp_path, monkeypatch, capsys):
    from trainer.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    pictures(1)[0].save(tmp_path / "a.png")
    assert main(["caption", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The caption model 'florence-community/Florence-2-base' is not on this machine")
    assert "Traceback" not in err and not (tmp_path / "a.txt").exists()
