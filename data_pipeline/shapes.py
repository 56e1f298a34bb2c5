"""The procedural "shapes" world: the generator, its answer key and a detector, in one place.

A scene is 1-3 coloured shapes (4 colours x 3 kinds) on a white square image, each centred in its own cell of a
coarse 3x3 grid. Everything is a pure function of (seed, split, index), so the answer key of any sample can be
regenerated from the id stored in its metadata (`scene_for`). Evals score generated images with `detect`, which
recovers (kind, colour, cell) from pixels, and score answers with `score_answer`.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
BACKGROUND = (255, 255, 255)
KINDS = ("square", "circle", "triangle")
GRID = 3
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    row: int  # cell row in the GRID x GRID layout, 0 = top
    col: int  # cell column, 0 = left
    cx: float  # centre in pixels
    cy: float
    size: float  # side of the bounding box in pixels

    @property
    def where(self) -> str:
        """Short position answer: 'center' or '<row> <col>' (e.g. 'top left')."""
        if (self.row, self.col) == (1, 1):
            return "center"
        return f"{ROW_NAMES[self.row]} {COL_NAMES[self.col]}"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def bbox(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    image_size: int
    scene_id: str = ""

    def key(self) -> frozenset:
        """What a detector must recover: the set of (kind, colour, row, col)."""
        return frozenset((s.kind, s.colour, s.row, s.col) for s in self.shapes)

    def to_json(self) -> dict:
        return {"scene_id": self.scene_id, "image_size": self.image_size, "shapes": [asdict(s) for s in self.shapes]}

    @staticmethod
    def from_json(d: dict) -> "Scene":
        return Scene(tuple(Shape(**s) for s in d["shapes"]), int(d["image_size"]), d.get("scene_id", ""))


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # one or two words
    qtype: str  # count | colour | shape | position | relative


def _rng(seed: int, split: str, index: int, salt: str = "") -> random.Random:
    # str hashing via sha256: Python's hash() of str is salted per process.
    h = hashlib.sha256(f"{seed}/{split}/{index}/{salt}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def scene_for(seed: int, split: str, index: int, image_size: int = 64, max_shapes: int = 3) -> Scene:
    """The scene with this id; the answer key of every shapes sample is regenerated through here."""
    rng = _rng(seed, split, index)
    n = rng.randint(1, max_shapes)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    cell = image_size / GRID
    shapes = []
    for r, c in cells:
        size = cell * rng.uniform(0.62, 0.74)
        jitter = cell * 0.06
        cx = (c + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (r + 0.5) * cell + rng.uniform(-jitter, jitter)
        shapes.append(Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), r, c, round(cx, 2), round(cy, 2),
                            round(size, 2)))
    return Scene(tuple(shapes), image_size, f"{split}/{index}")


def render(scene: Scene) -> Image.Image:
    """Aliased drawing (no anti-aliasing), so every shape pixel has exactly its palette colour."""
    img = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.bbox()
        col = COLOURS[s.colour]
        if s.kind == "square":
            d.rectangle([x0, y0, x1, y1], fill=col)
        elif s.kind == "circle":
            d.ellipse([x0, y0, x1, y1], fill=col)
        else:  # triangle pointing up, base at the bottom
            d.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=col)
    return img


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    rng = rng or random.Random(0)
    parts = [f"a {s.name} at the {s.where}" if s.where != "center" else f"a {s.name} in the center"
             for s in sorted(scene.shapes, key=lambda s: (s.row, s.col))]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return rng.choice(["{}.", "an image with {}.", "a picture of {}."]).format(body)


def questions(scene: Scene) -> list[QA]:
    """Every question the answer key can answer unambiguously (short one- or two-word answers)."""
    qs = [QA("how many shapes are there?", NUMBER_WORDS[len(scene.shapes)], "count")]
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    names = [s.name for s in scene.shapes]
    for s in scene.shapes:
        if kinds.count(s.kind) == 1:
            qs.append(QA(f"what color is the {s.kind}?", s.colour, "colour"))
        if colours.count(s.colour) == 1:
            qs.append(QA(f"what shape is the {s.colour} one?", s.kind, "shape"))
        if names.count(s.name) == 1:
            qs.append(QA(f"where is the {s.name}?", s.where, "position"))
    for a in scene.shapes:
        for b in scene.shapes:
            if a is b or names.count(a.name) > 1 or names.count(b.name) > 1:
                continue
            if a.col != b.col:
                qs.append(QA(f"is the {a.name} left of the {b.name}?", "yes" if a.col < b.col else "no",
                             "relative"))
            if a.row != b.row:
                qs.append(QA(f"is the {a.name} above the {b.name}?", "yes" if a.row < b.row else "no",
                             "relative"))
    return qs


def pick_question(scene: Scene, rng: random.Random) -> QA:
    """One question per sample, with the question type drawn uniformly first so types are balanced."""
    return pick_questions(scene, rng, 1)[0]


def pick_questions(scene: Scene, rng: random.Random, n: int) -> list[QA]:
    """Up to n distinct questions for one conversation, each drawing its type uniformly among the types with
    questions left (the first is `pick_question`'s, from the same draws). A question whose answer the earlier
    turns already say ("what shape is the red one?" after "what color is the square?" -> "red"), or that is an
    earlier one with its objects swapped ("is b above a?" after "is a above b?"), is left out: every answer must
    come from the image."""
    qs, out, said = questions(scene), [], ""
    words = lambda q: sorted(q.question.rstrip("?").split())  # noqa: E731
    while len(out) < n:
        by_type: dict[str, list[QA]] = {}
        for q in qs:
            told = re.search(rf"\b{re.escape(q.answer)}\b", said) if q.answer not in ("yes", "no") else \
                any(words(q) == words(o) for o in out)
            if q not in out and not told:
                by_type.setdefault(q.qtype, []).append(q)
        if not by_type:
            break
        out.append(rng.choice(by_type[rng.choice(sorted(by_type))]))
        said += f" {out[-1].question} {out[-1].answer}"
    return out


def score_answer(expected: str, predicted: str) -> bool:
    """Exact match after lower-casing and stripping punctuation/whitespace."""
    norm = lambda t: " ".join(t.lower().replace(".", " ").replace(",", " ").split())  # noqa: E731
    return norm(expected) == norm(predicted)


# --------------------------------------------------------------------------------------------------- detector

_PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), dtype=np.float32)  # index 0 = background
_PALETTE_NAMES = ["background"] + list(COLOURS)


def detect(image: Image.Image | np.ndarray, image_size: int | None = None, min_fill: float = 0.08,
           max_colour_dist: float = 110.0) -> Scene:
    """Recover the scene (kind, colour, cell) from pixels; deterministic, no learned weights.

    Each pixel takes its nearest palette colour (or none if farther than `max_colour_dist` in RGB). In each grid
    cell the most frequent colour counts as a shape if it covers >= `min_fill` of the cell. Its kind comes from the
    occupancy of the corner ninths of its bounding box: a square fills all four, an up-pointing triangle only the
    bottom two, a circle none — robust to blur, unlike raw fill ratios.
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if image_size is not None and arr.shape[0] != image_size:
        arr = np.asarray(Image.fromarray(arr.astype(np.uint8)).resize((image_size, image_size), Image.BILINEAR),
                         dtype=np.float32)
    h, w = arr.shape[:2]
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # H, W, P
    label = dist.argmin(-1)
    label[dist.min(-1) > max_colour_dist] = -1
    shapes = []
    for r in range(GRID):
        for c in range(GRID):
            y0, y1 = round(r * h / GRID), round((r + 1) * h / GRID)
            x0, x1 = round(c * w / GRID), round((c + 1) * w / GRID)
            cell = label[y0:y1, x0:x1]
            counts = np.bincount(cell[cell > 0].ravel(), minlength=len(_PALETTE))
            best = int(counts.argmax())
            if best == 0 or counts[best] < min_fill * cell.size:
                continue
            m = cell == best
            ys, xs = np.nonzero(m)
            by0, by1, bx0, bx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            box = m[by0:by1, bx0:bx1].astype(np.float32)
            bh, bw = box.shape
            t, b = max(bh // 3, 1), max(bh - bh // 3, 1)
            lft, rgt = max(bw // 3, 1), max(bw - bw // 3, 1)
            tl, tr = box[:t, :lft].mean(), box[:t, rgt:].mean()
            bl, br = box[b:, :lft].mean(), box[b:, rgt:].mean()
            top, bottom = (tl + tr) / 2, (bl + br) / 2
            if top > 0.6 and bottom > 0.6:
                kind = "square"
            elif bottom > 0.45 and top < 0.25:
                kind = "triangle"
            else:
                kind = "circle"
            cy, cx = (y0 + by0 + y0 + by1) / 2, (x0 + bx0 + x0 + bx1) / 2
            shapes.append(Shape(kind, _PALETTE_NAMES[best], r, c, float(cx), float(cy), float(max(bh, bw))))
    return Scene(tuple(shapes), int(h))


def scene_match(expected: Scene, found: Scene) -> dict[str, float]:
    """Per-scene scores for generation evals: exact scene match, and per-shape recall / precision."""
    e, f = expected.key(), found.key()
    hit = len(e & f)
    return {"exact": float(e == f), "recall": hit / max(len(e), 1), "precision": hit / max(len(f), 1),
            "count": float(len(e) == len(f))}
