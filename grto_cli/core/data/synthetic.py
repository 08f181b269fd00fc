"""Deterministic synthetic referring-segmentation scenes that need reasoning, not colour matching.

Each image holds several coloured shapes (some overlapping; the target's mask is its *visible*
pixels). Each record asks for exactly one shape by one of five query kinds:

- attribute   "the green triangle"
- relation    "the shape left of the red circle"
- superlative "the largest blue shape" / "the smallest square"
- only        "the only square" / "the only yellow shape"
- negation    "the shape that is not red"

Every query carries a *composition* key. testB holds out a fixed set of attribute and relation
compositions that never occur in train/val/testA, so it measures out-of-distribution
generalisation; testA draws from the same compositions as train (seen compositions, new scenes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from grto_cli.core.data.records import LOOK, QUERY_KIND, Record, record_from_mask

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
KINDS = ("circle", "square", "triangle")
RELATIONS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
SPLITS = ("train", "val", "testA", "testB")
QUERY_KINDS = ("attribute", "relation", "superlative", "only", "negation")

# Compositions that only testB asks about: two colour+kind phrases as attribute queries, and two
# relation+anchor-kind pairs as relation queries. They still *appear* in train images; only the
# way of asking for them is new.
HELD_OUT_COMPOSITIONS = frozenset({
    "attribute:yellow triangle",
    "attribute:blue circle",
    "relation:above:square",
    "relation:left of:triangle",
})

MIN_VISIBLE_PIXELS = 24
# A relation holds only with this much separation between centres, so it is unambiguous to a viewer.
RELATION_MARGIN = 4.0
# The largest/smallest shape must beat the runner-up by this area ratio.
SUPERLATIVE_RATIO = 1.4


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float
    cy: float
    size: float  # half-extent in pixels

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Query:
    text: str
    target: int  # index into the scene's shapes
    kind: str
    composition: str


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x, y, s = shape.cx, shape.cy, shape.size
    if shape.kind == "circle":
        draw.ellipse([x - s, y - s, x + s, y + s], fill=fill)
    elif shape.kind == "square":
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    else:
        draw.polygon([(x, y - s), (x - s, y + s), (x + s, y + s)], fill=fill)


# Peak-to-peak strength of the background's lighting gradient (red along x, blue along y).
GRADIENT = 60


def background_image(size: int, level: int) -> Image.Image:
    """A grey background lit by a faint gradient, like a real scene's light falloff.

    Why: Qwen2.5-VL's vision tower has no absolute position embedding (position enters only through
    RoPE in attention scores), so a tiny one trained from scratch on flat backgrounds cannot tell
    *where* a patch is. Real photographs carry that context; this gives the synthetic scenes some.
    """
    ramp = (np.arange(size) / max(size - 1, 1) - 0.5) * GRADIENT
    rgb = np.empty((size, size, 3), dtype=np.float32)
    rgb[..., 0] = level + ramp[None, :]
    rgb[..., 1] = level
    rgb[..., 2] = level + ramp[:, None]
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))


def _layer(shape: Shape, size: int) -> np.ndarray:
    """The shape's own pixels (size, size) as uint8 0/255, as it is painted."""
    layer = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(layer), shape, 255)
    return np.asarray(layer)


def visible_masks(shapes: list[Shape], size: int) -> list[np.ndarray]:
    """Each shape's visible pixels when painted in order (later shapes occlude earlier ones)."""
    owner = np.full((size, size), -1, dtype=np.int16)
    for i, shape in enumerate(shapes):
        owner[_layer(shape, size) > 0] = i
    return [owner == i for i in range(len(shapes))]


def render_scene(shapes: list[Shape], size: int, background: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint shapes in order; return the RGB image and each shape's visible mask."""
    canvas = background_image(size, background)
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        _draw_shape(draw, shape, COLORS[shape.color])
    return np.asarray(canvas), visible_masks(shapes, size)


# The "camo" look (``LOOKS``): the same scenes drawn so that each shape blends with its surroundings.
LOOKS = ("plain", "camo")
CAMO_CELL = 8  # pixels per blotch of the camouflage texture
CAMO_NOISE = 12.0  # std of the per-pixel grain over the whole image, shapes included
CAMO_GREY = 0.5  # share of the texture's cells in the background's grey; the rest take the shapes' colours
CAMO_ALPHA = 0.7  # a shape pixel's share of its own colour; the rest is the texture beneath it
CAMO_EDGE = 1.0  # Gaussian blur radius of a shape's edge (no crisp outline to find)
CAMO_STREAM = 1  # the texture's seed stream: [seed, split, image, CAMO_STREAM], apart from the scenes'


def camo_texture(rng: np.random.Generator, shapes: list[Shape], size: int, background: int) -> np.ndarray:
    """(size, size, 3) float32: blotches in the scene's own colours (every shape's colour and the
    background's grey, bilinearly blended between cells), lit as the plain background is: each colour
    a query names also lies around the shapes."""
    palette = np.asarray([COLORS[s.color] for s in shapes], np.float32)  # (n, 3)
    cells = -(-size // CAMO_CELL) + 1
    grey = rng.random((cells, cells)) < CAMO_GREY
    pick = rng.integers(0, len(palette), (cells, cells))  # the shape whose colour a coloured cell takes
    blotches = np.where(grey[..., None], np.float32(background), palette[pick])
    up = np.stack([np.asarray(Image.fromarray(blotches[..., c]).resize((size, size), Image.BILINEAR))
                   for c in range(3)], axis=-1)
    lit = np.asarray(background_image(size, background), np.float32) - background  # the light's ramp
    return up + lit


def render_camo(shapes: list[Shape], size: int, background: int, rng: np.random.Generator) -> np.ndarray:
    """The scene's camouflaged RGB image: the texture, then each shape in order as its colour mixed
    with the texture beneath (``CAMO_ALPHA``), its edge softened, then one grain over all of it (a
    shape is no smoother than its surroundings). Its masks are ``visible_masks``'s: the plain look's."""
    texture = camo_texture(rng, shapes, size, background)  # (size, size, 3)
    image = texture.copy()
    for shape in shapes:
        alpha = np.asarray(Image.fromarray(_layer(shape, size)).filter(ImageFilter.GaussianBlur(CAMO_EDGE)),
                           np.float32)[..., None] / 255.0  # (size, size, 1)
        fill = CAMO_ALPHA * np.asarray(COLORS[shape.color], np.float32) + (1 - CAMO_ALPHA) * texture
        image = (1 - alpha) * image + alpha * fill
    image = image + rng.normal(0.0, CAMO_NOISE, (size, size, 1)).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _sample_shapes(rng: np.random.Generator, size: int, n: int) -> list[Shape]:
    shapes = []
    for _ in range(n):
        s = float(rng.uniform(0.08, 0.2) * size)
        shapes.append(Shape(kind=str(rng.choice(KINDS)), color=str(rng.choice(list(COLORS))),
                            cx=float(rng.uniform(s, size - s)), cy=float(rng.uniform(s, size - s)), size=s))
    return shapes


def _relation_holds(rel: str, shape: Shape, anchor: Shape) -> bool:
    dx, dy = shape.cx - anchor.cx, shape.cy - anchor.cy
    return {"left": dx < -RELATION_MARGIN and abs(dy) < abs(dx),
            "right": dx > RELATION_MARGIN and abs(dy) < abs(dx),
            "above": dy < -RELATION_MARGIN and abs(dx) < abs(dy),
            "below": dy > RELATION_MARGIN and abs(dx) < abs(dy)}[rel]


def candidate_queries(shapes: list[Shape], areas: list[int]) -> list[Query]:
    """Every query this scene answers with exactly one visible shape."""
    out: list[Query] = []
    visible = [a >= MIN_VISIBLE_PIXELS for a in areas]
    idx = range(len(shapes))

    def unique(pred) -> int | None:
        hits = [i for i in idx if pred(shapes[i])]
        return hits[0] if len(hits) == 1 and visible[hits[0]] else None

    for color, kind in itertools.product(COLORS, KINDS):
        t = unique(lambda s: s.color == color and s.kind == kind)
        if t is not None:
            out.append(Query(f"the {color} {kind}", t, "attribute", f"attribute:{color} {kind}"))
    for a in idx:
        anchor = shapes[a]
        if unique(lambda s: s.phrase == anchor.phrase) != a:
            continue  # the anchor itself must be unambiguous
        for words, rel in RELATIONS.items():
            t = unique(lambda s: s is not anchor and _relation_holds(rel, s, anchor))
            if t is not None:
                out.append(Query(f"the shape {words} the {anchor.phrase}", t, "relation",
                                 f"relation:{words}:{anchor.kind}"))
    for attr, values in (("color", list(COLORS)), ("kind", list(KINDS))):
        for v in values:
            group = [i for i in idx if getattr(shapes[i], attr) == v]
            noun = f"{v} shape" if attr == "color" else v
            if len(group) == 1 and visible[group[0]]:
                out.append(Query(f"the only {noun}", group[0], "only", f"only:{attr}"))
            if len(group) >= 2:
                ranked = sorted(group, key=lambda i: areas[i])
                if areas[ranked[-1]] >= SUPERLATIVE_RATIO * areas[ranked[-2]] and visible[ranked[-1]]:
                    out.append(Query(f"the largest {noun}", ranked[-1], "superlative", f"superlative:largest:{attr}"))
                if areas[ranked[1]] >= SUPERLATIVE_RATIO * max(areas[ranked[0]], 1) and visible[ranked[0]]:
                    out.append(Query(f"the smallest {noun}", ranked[0], "superlative", f"superlative:smallest:{attr}"))
    for color in COLORS:
        t = unique(lambda s: s.color != color)
        if t is not None and sum(s.color == color for s in shapes) >= 2:
            out.append(Query(f"the shape that is not {color}", t, "negation", "negation:color"))
    return out


def _allowed(query: Query, split: str) -> bool:
    held_out = query.composition in HELD_OUT_COMPOSITIONS
    return held_out if split == "testB" else not held_out


def _pick_query(rng: np.random.Generator, queries: list[Query]) -> Query:
    # Balance query kinds first, so easy attribute queries do not swamp the reasoning ones.
    kinds = sorted({q.kind for q in queries})
    kind = kinds[int(rng.integers(len(kinds)))]
    pool = [q for q in queries if q.kind == kind]
    return pool[int(rng.integers(len(pool)))]


def pick_queries(rng: np.random.Generator, queries: list[Query], k: int) -> list[Query]:
    """Up to ``k`` queries for one scene, each about a different shape while there are any: the same
    image asked about different targets is what teaches a policy to read the query (as in RefCOCO,
    where an image holds several referring expressions)."""
    chosen: list[Query] = []
    pool = list(queries)
    while pool and len(chosen) < k:
        fresh = [q for q in pool if q.target not in {c.target for c in chosen}] or pool
        query = _pick_query(rng, fresh)
        pool.remove(query)
        chosen.append(query)
    return chosen


def generate_split(split: str, n: int, seed: int, size: int, out_dir: Path,
                   min_shapes: int = 3, max_shapes: int = 5, queries_per_image: int = 1,
                   look: str = "plain") -> list[Record]:
    """Generate ``n`` records for one split, writing images under ``out_dir/images/<split>``;
    each image is asked up to ``queries_per_image`` queries (one record each).

    ``look`` "camo" draws the same scenes, queries and masks (the scene stream is untouched: the
    texture's noise has a stream of its own per image), each shape blended into a texture of the
    scene's colours (``render_camo``); its records carry ``meta["look"] = "camo"``."""
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
    if look not in LOOKS:
        raise ValueError(f"unknown synthetic look {look!r}; expected one of {LOOKS}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    n_images = 0
    while len(records) < n:
        shapes = _sample_shapes(rng, size, int(rng.integers(min_shapes, max_shapes + 1)))
        background = int(rng.integers(150, 216))
        image, masks = render_scene(shapes, size, background)
        queries = [q for q in candidate_queries(shapes, [int(m.sum()) for m in masks]) if _allowed(q, split)]
        if not queries:
            continue
        chosen = pick_queries(rng, queries, min(queries_per_image, n - len(records)))
        rel = f"images/{split}/{n_images:05d}.png"
        if look == "camo":
            image = render_camo(shapes, size, background, np.random.default_rng([seed, SPLITS.index(split), n_images,
                                                                                 CAMO_STREAM]))
        n_images += 1
        Image.fromarray(image).save(out_dir / rel, optimize=False)
        for query in chosen:
            i = len(records)
            records.append(record_from_mask(
                f"synthetic-{split}-{i:05d}", rel, query.text, masks[query.target], "synthetic", split,
                meta={QUERY_KIND: query.kind, "composition": query.composition,
                      **({LOOK: look} if look != "plain" else {})}))
    return records
