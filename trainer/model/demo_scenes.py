"""Procedural scenes and their captions: what the built-in ``shapes-demo`` model was trained on.

``shapes-demo`` is a small Flux-shaped text-to-image model that really generates something, so a user without a GPU
can see what a LoRA does (the subject appearing, masking keeping the background free, late checkpoints overfitting)
instead of coloured noise. Its world is deliberately simple — coloured shapes and little figures on plain, striped,
checkered, dotted or gradient backgrounds — so a few minutes of GPU training learn it, and so anything a LoRA adds
from an uploaded photo (its colours, its layout) is easy to see against it. ``scripts/train_shapes_demo.py`` trains
the model on these scenes; the tests use them to check what the shipped model draws.

Pure numpy + PIL; every scene comes from a seed, so the training set can be rebuilt exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (50, 165, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (240, 130, 180), "brown": (125, 80, 40),
    "black": (25, 25, 25), "white": (240, 240, 240), "gray": (128, 128, 128), "teal": (30, 160, 160),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "figure")
SIZES = {"small": 0.11, "large": 0.22}  # half-size as a fraction of the shorter side
POSITIONS = {"in the center": (0.5, 0.5), "on the left": (0.27, 0.5), "on the right": (0.73, 0.5),
             "at the top": (0.5, 0.27), "at the bottom": (0.5, 0.73)}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    position: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    colours: tuple[str, str]  # the background's colours (the second unused by "plain")

    def caption(self) -> str:
        return f"{' and '.join(t.words() for t in self.things)}, on {background_words(self.background, self.colours)}"


def background_words(kind: str, colours: tuple[str, str]) -> str:
    a, b = colours
    return {"plain": f"{article(a)} {a} background", "striped": f"{article(a)} {a} and {b} striped background",
            "checkered": f"{article(a)} {a} and {b} checkered background",
            "dotted": f"{article(a)} {a} background with {b} dots",
            "gradient": f"{article(a)} {a} to {b} gradient background"}[kind]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: np.random.Generator, max_things: int = 2) -> Scene:
    names = list(COLOURS)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    bg = tuple(rng.choice(names, size=2, replace=False))
    count = 1 if max_things == 1 or rng.random() < 0.6 else 2
    positions = rng.choice(list(POSITIONS), size=count, replace=False)
    things = []
    for position in positions:
        # A subject never takes its background's first colour: it would be invisible.
        colour = rng.choice([n for n in names if n != bg[0]])
        things.append(Thing(SHAPES[rng.integers(len(SHAPES))], str(colour),
                            "large" if count == 1 and rng.random() < 0.6 else ("small" if count == 2 else
                                                                                 str(rng.choice(list(SIZES)))),
                            str(position)))
    return Scene(tuple(things), background, (str(bg[0]), str(bg[1])))


def draw_background(kind: str, colours: tuple[str, str], width: int, height: int,
                    rng: np.random.Generator) -> np.ndarray:
    a = np.array(COLOURS[colours[0]], np.float32)
    b = np.array(COLOURS[colours[1]], np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == "plain":
        pick = np.zeros((height, width), np.float32)
    elif kind == "striped":
        period = rng.integers(16, 40)
        pick = ((yy // (period // 2)) % 2).astype(np.float32)
    elif kind == "checkered":
        period = rng.integers(24, 56)
        pick = (((yy // (period // 2)) + (xx // (period // 2))) % 2).astype(np.float32)
    elif kind == "dotted":
        period = rng.integers(20, 36)
        cy, cx = (yy % period) - period / 2, (xx % period) - period / 2
        pick = ((cy ** 2 + cx ** 2) < (period / 5) ** 2).astype(np.float32)
    else:  # gradient, top to bottom
        pick = np.broadcast_to((yy / max(height - 1, 1)).astype(np.float32), (height, width))
    return a[None, None] * (1 - pick[..., None]) + b[None, None] * pick[..., None]


def _polygon(cx: float, cy: float, r: float, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(cx + r * x, cy + r * y) for x, y in points]


def draw_thing(draw: ImageDraw.ImageDraw, thing: Thing, width: int, height: int, rng: np.random.Generator) -> None:
    fx, fy = POSITIONS[thing.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * width
    cy = (fy + rng.uniform(-0.04, 0.04)) * height
    r = SIZES[thing.size] * min(width, height) * rng.uniform(0.85, 1.15)
    fill = COLOURS[thing.colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if thing.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif thing.shape == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif thing.shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.95, 0.8), (-0.95, 0.8)]), fill=fill)
    elif thing.shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]), fill=fill)
    elif thing.shape == "star":
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        draw.polygon([(cx + r * q * np.cos(t), cy + r * q * np.sin(t)) for t, q in zip(angles, radii)], fill=fill)
    elif thing.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r * 0.35)))
    elif thing.shape == "cross":
        w = 0.3 * r
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    else:  # figure: a head, a body, arms and legs, seen from the front
        head = 0.28 * r
        draw.ellipse((cx - head, cy - r, cx + head, cy - r + 2 * head), fill=fill)
        draw.polygon(_polygon(cx, cy, r, [(-0.3, -0.4), (0.3, -0.4), (0.45, 0.35), (-0.45, 0.35)]), fill=fill)
        limb = max(2, int(0.14 * r))
        draw.line([(cx - 0.3 * r, cy - 0.3 * r), (cx - 0.8 * r, cy + 0.1 * r)], fill=fill, width=limb)
        draw.line([(cx + 0.3 * r, cy - 0.3 * r), (cx + 0.8 * r, cy + 0.1 * r)], fill=fill, width=limb)
        draw.line([(cx - 0.2 * r, cy + 0.35 * r), (cx - 0.35 * r, cy + r)], fill=fill, width=limb)
        draw.line([(cx + 0.2 * r, cy + 0.35 * r), (cx + 0.35 * r, cy + r)], fill=fill, width=limb)


def render_scene(scene: Scene, width: int, height: int, seed: int) -> Image.Image:
    """The scene as an RGB picture of ``width`` x ``height``; the seed places the stripes, jitter and sizes."""
    rng = np.random.default_rng(seed)
    background = draw_background(scene.background, scene.colours, width, height, rng)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        draw_thing(draw, thing, width, height, rng)
    return image


def example(seed: int, width: int = 256, height: int = 256, max_things: int = 2) -> tuple[Image.Image, str]:
    """Scene number ``seed``: its picture and caption (the training set is ``example(i)`` for i = 0, 1, ...)."""
    scene = random_scene(np.random.default_rng(seed), max_things)
    return render_scene(scene, width, height, seed), scene.caption()


def vocabulary_corpus() -> list[str]:
    """Text for the demo's tokenizer: every word the captions use, in caption-like phrases."""
    lines = [Thing(s, c, z, p).words() for s in SHAPES for c in COLOURS for z in SIZES for p in list(POSITIONS)[:1]]
    lines += [background_words(k, (a, b)) for k in BACKGROUNDS for a in COLOURS for b in list(COLOURS)[:3]]
    lines += [f"{p}, on" for p in POSITIONS]
    return lines


# A subject the demo model has never seen (a purple figure wearing a yellow crown, on a green and white checkered
# background), with its exact mask: what the tests and masking_eval/shapes_demo_effect.py train a LoRA on.
NOVEL_SUBJECT = {"purple": COLOURS["purple"], "crown yellow": COLOURS["yellow"]}
NOVEL_SUBJECT_BACKGROUND = {"green": COLOURS["green"], "white": COLOURS["white"]}


def novel_subject(size: int = 256) -> tuple[Image.Image, Image.Image]:
    """The novel subject's picture and its exact mask (white = subject), ``size`` x ``size``."""
    background = draw_background("checkered", ("green", "white"), size, size, np.random.default_rng(0))
    image = Image.fromarray(background.astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    k = size / 256
    for canvas, fill, crown in ((ImageDraw.Draw(image), COLOURS["purple"], COLOURS["yellow"]),
                                (ImageDraw.Draw(mask), 255, 255)):
        canvas.ellipse([v * k for v in (108, 58, 148, 98)], fill=fill)  # head
        canvas.polygon([(x * k, y * k) for x, y in ((102, 100), (154, 100), (168, 180), (88, 180))], fill=fill)
        for (x0, y0, x1, y1), width in (((104, 108, 70, 150), 9), ((152, 108, 186, 150), 9),  # arms
                                        ((110, 178, 100, 222), 10), ((146, 178, 156, 222), 10)):  # legs
            canvas.line([(x0 * k, y0 * k), (x1 * k, y1 * k)], fill=fill, width=max(1, int(width * k)))
        canvas.polygon([(x * k, y * k) for x, y in ((108, 62), (112, 36), (122, 52), (128, 30), (134, 52), (144, 36),
                                                    (148, 62))], fill=crown)  # the crown
    return image, mask
