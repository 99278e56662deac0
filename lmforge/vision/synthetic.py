"""Synthetic pictures and questions with short exact answers: a task a tiny VLM can learn on a CPU.

A scene has 1-4 shapes (circle, square, triangle) in distinct slots of a cross layout (left,
right, top, bottom), each in one of four colours, on white; sizes, places and shades vary a
little. The slots never overlap, so every question has one right answer:

    How many shapes are there?        -> "3"         (count)
    What colour is the circle?        -> "red"       (colour; asked only when one circle is there)
    Which shape is on the left?       -> "triangle"  (shape; asked about occupied slots)
    Where is the square?              -> "top"       (position; asked only when one square is there)

Everything is drawn from `random.Random(seed)`, so a seed names a data set exactly; train and
held-out sets come from different seeds, and `heldout_scenes` also drops any held-out picture
that is pixel-identical to a training one (with the size and position jitter, rare).
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")
# slot centres as fractions of the side; far enough apart that shapes of radius <= 0.11 * side
# moved by up to 2/64 of the side never touch
SLOTS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8)}
COLOUR_JITTER = 20  # each channel of a shape's colour varies by up to this, so pictures rarely repeat
KINDS = ("count", "colour", "shape", "position")
ANSWERS = {"count": ("1", "2", "3", "4"), "colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(SLOTS)}
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    colour: str
    slot: str  # left | right | top | bottom
    cx: int  # centre and radius in pixels
    cy: int
    r: int
    rgb: tuple | None = None  # the colour drawn (near COLOURS[colour]); None: exactly COLOURS[colour]


@dataclass(frozen=True)
class QA:
    kind: str  # count | colour | shape | position
    question: str
    answer: str


def make_scene(rng: random.Random, size: int = 64) -> list[Shape]:
    """1-4 shapes (the count uniform) in distinct random slots; kind and colour uniform."""
    slots = rng.sample(list(SLOTS), rng.randint(1, 4))
    jitter = max(1, size // 32)
    out = []
    for slot in slots:
        fx, fy = SLOTS[slot]
        r = rng.randint(round(0.08 * size), round(0.11 * size))
        cx = round(fx * size) + rng.randint(-jitter, jitter)
        cy = round(fy * size) + rng.randint(-jitter, jitter)
        colour = rng.choice(list(COLOURS))
        rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
        out.append(Shape(rng.choice(SHAPES), colour, slot, cx, cy, r, rgb))
    return out


def draw(scene: list[Shape], size: int = 64):
    """The scene as an RGB PIL image. A square fills its bounding box, a triangle points up with
    its base on the box's bottom edge, a circle touches the box's sides."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in scene:
        box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
        fill = s.rgb or COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse(box, fill=fill)
        elif s.kind == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(s.cx, s.cy - s.r), (s.cx + s.r, s.cy + s.r), (s.cx - s.r, s.cy + s.r)], fill=fill)
    return img


def questions(scene: list[Shape]) -> list[QA]:
    """Every question the scene answers unambiguously, in KINDS order."""
    kinds = Counter(s.kind for s in scene)
    unique = [s for s in scene if kinds[s.kind] == 1]
    out = [QA("count", "How many shapes are there?", str(len(scene)))]
    out += [QA("colour", f"What colour is the {s.kind}?", s.colour) for s in unique]
    out += [QA("shape", f"Which shape is on the {s.slot}?", s.kind) for s in scene]
    out += [QA("position", f"Where is the {s.kind}?", s.slot) for s in unique]
    return out


def pick_questions(scene: list[Shape], rng: random.Random) -> list[QA]:
    """One question of each kind the scene has, each picked at random, in random order: every
    kind trains about equally often whatever the scene."""
    by_kind: dict[str, list[QA]] = {}
    for qa in questions(scene):
        by_kind.setdefault(qa.kind, []).append(qa)
    picked = [rng.choice(qs) for qs in by_kind.values()]
    rng.shuffle(picked)
    return picked


def scenes(n: int, seed: int, size: int = 64) -> list[list[Shape]]:
    rng = random.Random(seed)
    return [make_scene(rng, size) for _ in range(n)]


def image_key(scene: list[Shape], size: int = 64) -> str:
    return hashlib.sha1(np.asarray(draw(scene, size)).tobytes()).hexdigest()


def heldout_scenes(n: int, seed: int, train: list[list[Shape]], size: int = 64) -> tuple[list[list[Shape]], int]:
    """`n` scenes from `seed` whose pictures are not among `train`'s; (scenes, how many were dropped)."""
    seen = {image_key(s, size) for s in train}
    rng = random.Random(seed)
    out, dropped = [], 0
    while len(out) < n:
        s = make_scene(rng, size)
        if image_key(s, size) in seen:
            dropped += 1
            continue
        out.append(s)
    return out, dropped


def eval_questions(scene_list: list[list[Shape]], seed: int) -> list[tuple[int, QA]]:
    """(scene index, question): one question of each kind each held-out scene has."""
    rng = random.Random(seed)
    return [(i, qa) for i, s in enumerate(scene_list) for qa in sorted(pick_questions(s, rng), key=lambda q: KINDS.index(q.kind))]


def chance(items: list[QA]) -> dict:
    """Per kind: `uniform` (guessing among the possible answers), `majority` (always giving the
    most frequent answer of this very set: the best any blind answerer can do on it), and n."""
    out = {}
    for kind in KINDS:
        answers = [qa.answer for qa in items if qa.kind == kind]
        if answers:
            top = Counter(answers).most_common(1)[0][1]
            out[kind] = {"uniform": 1 / len(ANSWERS[kind]), "majority": top / len(answers), "n": len(answers)}
    if items:
        # overall: each question's best blind guess is its kind's majority answer
        out["overall"] = {"uniform": sum(1 / len(ANSWERS[q.kind]) for q in items) / len(items),
                          "majority": sum(out[k]["majority"] * out[k]["n"] for k in KINDS if k in out) / len(items),
                          "n": len(items)}
    return out
