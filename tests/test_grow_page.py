"""The Grow tab through the app's API (gradio_client, the calls the page makes): train round 1 on tiny-demo, render
candidates from its checkpoint, tick two, take them to the Train tab and train round 2, whose run records the round,
its parent and each picture's provenance. Another session cannot grow from someone else's run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError

from tests.helpers_app import write_subject_png
from tests.test_app_api import app, follow_to_end, new_client, prepare, train  # noqa: F401  (app: the fixture)


def grow(client, run: str, step, count: int = 3, source: str = "checkpoint", model: str = ""):
    """/grow in the page's order: owner, source, run, checkpoint, reference model, count, seed, weight, own prompts,
    the Train tab's caption and trigger, the mask model."""
    return client.predict(None, source, run, step, model, count, 7, 1.0, "[trigger] holding an umbrella",
                          "a photo of [trigger]", "ohwx", "u2netp", api_name="/grow")


def test_grow_from_a_checkpoint_pick_two_and_train_round_two(app, tmp_path):  # noqa: F811
    client = new_client(app, tmp_path, "alice")
    prepare(client, write_subject_png(tmp_path))
    train(client, steps=2, save_every=2)
    follow_to_end(client)
    first = app.jobs[-1].run
    assert first.status == "finished"

    gallery, picks, status, notes = grow(client, first.path.name, 2)
    assert "3 candidates (round 2)" in status
    assert len(gallery) == 3 and all(Path(item["image"]).is_file() for item in gallery)
    labels = [choice[0] for choice in picks["choices"]]
    assert labels[0].startswith("1. your prompt")
    assert notes.count("copy ") == 3  # every candidate's scores are shown

    # redraw the unticked one (candidate 2): the ticked ones stay as they were
    (record,) = list(app.runs_root.rglob("grow.json"))
    seeds = {name: entry.get("seed") for name, entry in json.loads(record.read_text())["images"].items()}
    redrawn, picks_after, status, _ = client.predict([labels[0], labels[2]], "u2netp", api_name="/grow_redraw")
    assert status == "Redrawn 1 / 1 (ticked ones kept)"
    assert len(redrawn) == 3 and [c[0] for c in picks_after["choices"]][0] == labels[0]
    after = {name: entry.get("seed") for name, entry in json.loads(record.read_text())["images"].items()}
    assert after["candidate-002.png"] != seeds["candidate-002.png"]
    assert after["candidate-001.png"] == seeds["candidate-001.png"] and after["candidate-003.png"] == \
        seeds["candidate-003.png"]

    # tick candidates 1 and 3, take them to the Train tab, train round 2 on the three pictures
    client.predict([labels[0], labels[2]], "u2netp", "character-rank4-400", 0.0, api_name="/grow_next_round")
    train(client, steps=2, save_every=2)
    follow_to_end(client)
    second = app.jobs[-1].run
    assert second.path != first.path and second.status == "finished"
    manifest = json.loads((second.path / "run.json").read_text())
    assert manifest["lineage"]["round"] == 2
    assert manifest["lineage"]["parent"]["run"] == str(first.path)
    assert manifest["lineage"]["source"] == {"kind": "checkpoint", "run": str(first.path), "step": 2, "weight": 1.0}
    entries = manifest["dataset"]["images"]
    assert [e["name"] for e in entries] == ["original-01.png", "candidate-001.png", "candidate-003.png"]
    assert entries[0]["provenance"]["source"]["kind"] == "original"
    assert entries[1]["provenance"]["kind"] == "your prompt" and "umbrella" in entries[1]["caption"]
    assert all(e["mask"] for e in entries)  # every picture trained with its automatic mask
    assert manifest["schedule"]["images"] == 3

    # Compare rounds: the base model, round 1's and round 2's checkpoints, one grid per prompt
    status, grids = client.predict(None, second.path.name, "1", api_name="/compare_rounds")
    assert status == "base model · round 1 · step 2 · round 2 · step 2"
    assert len(grids) == 3  # the caption and the two most extreme views round 1 lacked
    assert [g["caption"] for g in grids][1:] == ["ohwx, seen from behind, back view",
                                                 "ohwx, seen from the side, side view, in profile"]
    with pytest.raises(AppError, match="This run is round 1"):
        client.predict(None, first.path.name, "1", api_name="/compare_rounds")


def test_nobody_grows_from_someone_elses_run(app, tmp_path):  # noqa: F811
    alice, bob = new_client(app, tmp_path, "alice"), new_client(app, tmp_path, "bob")
    prepare(alice, write_subject_png(tmp_path))
    train(alice, steps=2, save_every=2)
    follow_to_end(alice)
    run = app.jobs[-1].run
    for name in (run.path.name, f"../{run.path.parent.name}/{run.path.name}", str(run.path)):
        with pytest.raises(AppError, match="not one of yours"):
            grow(bob, name, 2)
        with pytest.raises(AppError, match="not one of yours"):
            bob.predict(None, name, "1", api_name="/compare_rounds")
    # and with nothing of his own to show, the reference source asks for a picture first
    with pytest.raises(AppError, match="Upload a picture in the Train tab first"):
        grow(bob, "", None, source="reference", model="tiny-klein")
    with pytest.raises(AppError, match="Render some candidates first"):
        bob.predict([], "u2netp", "character-rank4-400", 0.0, api_name="/grow_next_round")


def test_reference_editing_straight_after_upload(app, tmp_path, isolated_data_dir, tiny_klein_dir):  # noqa: F811
    """No run yet: the Train tab's uploaded picture is the reference tiny-klein renders the candidates from, and Next
    round makes a set of it and the ticked candidate."""
    (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)
    client = new_client(app, tmp_path, "carol")
    prepare(client, write_subject_png(tmp_path))
    gallery, picks, status, notes = grow(client, "", None, count=2, source="reference", model="tiny-klein")
    assert "2 candidates (round 2)" in status and len(gallery) == 2
    labels = [choice[0] for choice in picks["choices"]]
    outputs = client.predict([labels[1]], "u2netp", "character-rank4-400", 0.0, api_name="/grow_next_round")
    assert "2 images" in outputs[-1]  # the set's summary: the uploaded picture and the ticked candidate
