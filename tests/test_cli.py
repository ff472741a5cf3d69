"""The headless CLI, run as a real subprocess: success paths and one-line failures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import safetensors.torch
from PIL import Image

from tests.conftest import subject_image

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_presets_lists_all_presets():
    out = cli("presets")
    assert out.returncode == 0
    for name in ("character-rank4-400", "character-rank16-500", "style-rank16-2000", "quick-test-250"):
        assert name in out.stdout


def test_train_writes_a_complete_run_folder(tmp_path):
    image, _ = subject_image((256, 320))
    image_path = tmp_path / "my image ü.png"  # spaces and non-ASCII in the path
    image.save(image_path)
    out_dir = tmp_path / "run out"
    photo = tmp_path / "my beach.jpg"
    Image.new("RGB", (120, 90), (30, 160, 220)).save(photo)
    result = cli("train", "--image", image_path, "--caption", "a photo of [trigger], a red ball", "--trigger", "ohwx",
                 "--preset", "quick-test-250", "--model", "tiny-demo", "--steps", 4, "--save-every", 2,
                 "--resolution", 64, "--sample-prompt", "[trigger] on a beach", "--seed", 3, "--output", out_dir,
                 "--background", photo)
    assert result.returncode == 0, result.stderr
    # the user's own background is stored with the dataset, where the augmentation bank reads it
    assert [p.name for p in (out_dir / "dataset" / "backgrounds").iterdir()] == ["00.png"]
    assert "Traceback" not in result.stderr
    assert "4/4" in result.stderr  # the progress bar reached the end
    manifest = json.loads((out_dir / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["model"] == "tiny-demo" and Path(manifest["model_path"]).is_dir()
    assert manifest["config"]["seed"] == 3 and manifest["config"]["trigger"] == "ohwx"
    assert [c["step"] for c in manifest["checkpoints"]] == [2, 4]
    for c in manifest["checkpoints"]:
        assert c["path"] == f"lora-{c['step']:06d}.safetensors"
        assert safetensors.torch.load_file(out_dir / c["path"])
        assert [p["prompt"] for p in c["previews"]] == ["a photo of ohwx, a red ball", "ohwx on a beach"]
        assert all((out_dir / p["path"]).is_file() for p in c["previews"])
    # the automatic mask was made and stored with the dataset
    mask = np.asarray(Image.open(out_dir / "dataset" / "mask.png"))
    assert 0.05 < mask.mean() / 255 < 0.9


def test_mask_writes_an_rgba_cutout(tmp_path):
    image, truth = subject_image((256, 320))
    image.save(tmp_path / "in.jpg")
    result = cli("mask", tmp_path / "in.jpg", "--output", tmp_path / "out.png")
    assert result.returncode == 0, result.stderr
    out = Image.open(tmp_path / "out.png")
    assert out.mode == "RGBA" and out.size == image.size
    alpha = np.asarray(out.getchannel("A")) > 127
    expected = np.asarray(truth) > 127
    iou = (alpha & expected).sum() / (alpha | expected).sum()
    assert iou > 0.8, iou


def test_bad_image_is_one_clear_line_and_nonzero_exit(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    for args in (("mask", bad, "--output", tmp_path / "o.png"),
                 ("train", "--image", bad, "--caption", "x", "--model", "tiny-demo", "--output", tmp_path / "r")):
        result = cli(*args)
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "PNG, JPEG or WEBP" in lines[0]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # nothing created for a refused run
    image, _ = subject_image()
    image.save(tmp_path / "good.png")
    result = cli("train", "--image", tmp_path / "good.png", "--caption", "x", "--model", "tiny-demo",
                 "--background", bad, "--output", tmp_path / "r")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "background 'notes.png'" in errors[0], result.stderr
    assert not (tmp_path / "r").exists()


def test_bad_arguments_are_one_line(tmp_path):
    image, _ = subject_image()
    image.save(tmp_path / "i.png")
    result = cli("train", "--image", tmp_path / "i.png", "--caption", "x", "--preset", "nope", "--output", tmp_path / "r")
    assert result.returncode == 2 and "Unknown preset 'nope'" in result.stderr and "Traceback" not in result.stderr
    result = cli("train", "--image", tmp_path / "i.png", "--caption", "x", "--rank", 0, "--model", "tiny-demo",
                 "--output", tmp_path / "r")
    assert result.returncode == 2 and "rank must be between 1 and 256" in result.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = cli("train", "--image", tmp_path / "i.png", "--caption", "x", "--model", "tiny-demo", "--no-mask",
                 "--output", tmp_path / "full")
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr


def test_train_on_tiny_klein_with_the_distilled_preview_model(tmp_path, isolated_data_dir, tiny_klein_dir):
    """FLUX.2 [klein] from the command line: --model tiny-klein trains klein LoRA keys, and --preview-model (here
    tiny-klein itself, standing in for its distilled twin: same family and architecture) draws the previews."""
    (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)
    image, _ = subject_image((96, 128))
    image.save(tmp_path / "in.png")
    out_dir = tmp_path / "run"
    result = cli("train", "--image", tmp_path / "in.png", "--caption", "a photo of [trigger]", "--trigger", "ohwx",
                 "--preset", "klein-character-rank16-500", "--model", "tiny-klein", "--steps", 2, "--save-every", 2,
                 "--resolution", 64, "--output", out_dir, "--preview-model", "tiny-klein")
    assert result.returncode == 0, result.stderr
    assert "Previews render with tiny-klein (4 steps, guidance 1)" in result.stderr + result.stdout
    manifest = json.loads((out_dir / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["config"]["preview_model"] == "tiny-klein"
    with safetensors.safe_open(str(out_dir / "lora-000002.safetensors"), "pt") as f:
        assert f.metadata()["family"] == "flux2-klein"
        assert any(".to_qkv_mlp_proj.lora_A" in k for k in f.keys())
    bad = cli("train", "--image", tmp_path / "in.png", "--caption", "a photo of [trigger]", "--model", "tiny-klein",
              "--steps", 2, "--resolution", 64, "--output", tmp_path / "bad", "--preview-model", "tiny-demo")
    assert bad.returncode != 0 and "is FLUX.1" in bad.stderr and "Traceback" not in bad.stderr
