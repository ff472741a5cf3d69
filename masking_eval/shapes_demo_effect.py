#!/usr/bin/env python
"""What masking does, seen on ``shapes-demo``: the same subject trained masked and unmasked, read off the previews.

On the random-weight ``tiny-demo`` the effect of masking could only be measured inside the model (one-step
reconstruction errors, ``TRAINING_EFFECT.md``). ``shapes-demo`` really draws scenes, so here it is measured where a
user sees it: in the preview pictures the real training loop renders at each checkpoint (``python -m trainer train``,
the CLI a user runs), with prompts that put the subject on *other* backgrounds.

The subject is new to the model: a purple figure wearing a yellow crown, on a green and white checkered background,
with its exact mask. Two runs, identical except ``--no-mask``; per checkpoint and prompt, three shares of pixels:

* **subject**: pixels near the subject's purple or the crown's yellow, inside the training picture's mask (every
  prompt asks for the subject "in the center", where it stands in the training picture);
* **copied background**: in the picture's outer frame (24 px, where the subject never is), the spread (standard
  deviation) of brightness: the training checkerboard is ~61, a plain background near 0 (read it on the blue prompt;
  the stripes the other prompt asks for are patterned themselves);
* **asked background**: the frame's mean RGB distance (0-255) to the nearest colour the prompt asks for (lower is
  closer).

Run: ``.venv/bin/python masking_eval/shapes_demo_effect.py --out /tmp/effect`` (CPU, a few minutes); it prints a
Markdown table and writes ``effect.png`` (base, unmasked and masked previews side by side).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZE = 256
from trainer.model.demo_scenes import NOVEL_SUBJECT as SUBJECT, NOVEL_SUBJECT_BACKGROUND as TRAINING_BACKGROUND  # noqa: E402
from trainer.model.demo_scenes import novel_subject  # noqa: E402
PROMPTS = (  # (prompt, the background it asks for: name -> colour)
    ("[trigger] in the center, on a blue background", {"blue": (40, 80, 220)}),
    ("[trigger] in the center, on an orange and black striped background",
     {"orange": (245, 140, 30), "black": (25, 25, 25)}),
)
NEAR = 60.0  # the largest per-channel RGB difference that still counts as "that colour"


def share_near(pixels: np.ndarray, colours) -> float:
    if not len(pixels):
        return 0.0
    distance = np.min([np.abs(pixels - np.array(c, np.float32)).max(-1) for c in colours], axis=0)
    return float((distance < NEAR).mean())


def _frame(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[:24].reshape(-1, 3), a[-24:].reshape(-1, 3),
                           a[24:-24, :24].reshape(-1, 3), a[24:-24, -24:].reshape(-1, 3)])


def measure(picture: Image.Image, asked: dict, subject_mask: np.ndarray, training: np.ndarray) -> dict:
    a = np.asarray(picture.convert("RGB").resize((SIZE, SIZE)), np.float32)
    # The training background's checkerboard in the frame: the spread of its brightness (a copied checkerboard, even
    # warped and with drifted colours, is bright and dark squares; a plain asked background is flat). The training
    # picture's own frame scores ~61; the orange and black stripes a prompt asks for are patterned too, so read this
    # column on the plain blue prompt.
    copied = float((_frame(a) @ np.array([0.299, 0.587, 0.114], np.float32)).std())
    distance = np.min([np.abs(_frame(a) - np.array(c, np.float32)).mean(-1) for c in asked.values()], axis=0)
    return {"subject": share_near(a[subject_mask], SUBJECT.values()), "copied": copied,
            "asked": float(distance.mean())}


def train(folder: Path, image: Path, mask: Path, masked: bool, args) -> float:
    command = [sys.executable, "-m", "trainer", "train", "--image", str(image), "--caption", "[trigger]",
               "--trigger", "ohwx", "--model", "shapes-demo", "--preset", args.preset, "--seed", "7",
               "--output", str(folder)]
    command += ["--mask", str(mask)] if masked else ["--no-mask"]
    for prompt, _ in PROMPTS:
        command += ["--sample-prompt", prompt]
    start = time.time()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="cpu-demo-shapes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    image, mask = novel_subject(SIZE)
    image.save(args.out / "subject.png")
    mask.save(args.out / "subject-mask.png")
    runs, seconds = {}, {}
    for name, masked in (("unmasked", False), ("masked", True)):
        seconds[name] = train(args.out / name, args.out / "subject.png", args.out / "subject-mask.png", masked, args)
        runs[name] = json.loads((args.out / name / "run.json").read_text())
    rows, pictures = [], {}
    asked_by_prompt = {p.replace("[trigger]", "ohwx"): bg for p, bg in PROMPTS}
    for name, run in runs.items():
        for entry in [{"step": 0, "previews": run["base_previews"]}] + run["checkpoints"]:
            for preview in entry["previews"]:
                asked = asked_by_prompt.get(preview["prompt"])
                if asked is None:
                    continue
                picture = Image.open(args.out / name / preview["path"])
                pictures[(name, entry["step"], preview["prompt"])] = picture
                rows.append({"run": name, "step": entry["step"], "prompt": preview["prompt"],
                             **measure(picture, asked, np.asarray(mask) > 127, np.asarray(image, np.float32))})
    print(f"seconds: {json.dumps({k: round(v) for k, v in seconds.items()})}")
    print("| run | step | prompt | subject share | frame brightness spread | distance to asked background |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['step']} | {r['prompt']} | {r['subject']:.2f} | {r['copied']:.0f} | "
              f"{r['asked']:.0f} |")
    (args.out / "effect.json").write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=1))
    _sheet(pictures, runs, args.out / "effect.png", image)
    return 0


def _sheet(pictures: dict, runs: dict, path: Path, subject: Image.Image) -> None:
    """Rows: the base model (step 0), unmasked and masked at the last checkpoint; a column per asked prompt; the
    training picture first."""
    prompts = [p.replace("[trigger]", "ohwx") for p, _ in PROMPTS]
    last = runs["masked"]["checkpoints"][-1]["step"]
    rows = [("unmasked", 0), ("unmasked", last), ("masked", last)]
    sheet = Image.new("RGB", (SIZE * (len(prompts) + 1), SIZE * len(rows)), "white")
    sheet.paste(subject, (0, 0))
    for r, (name, step) in enumerate(rows):
        for c, prompt in enumerate(prompts):
            sheet.paste(pictures[(name, step, prompt)].resize((SIZE, SIZE)), (SIZE * (c + 1), SIZE * r))
    sheet.save(path)


if __name__ == "__main__":
    sys.exit(main())
