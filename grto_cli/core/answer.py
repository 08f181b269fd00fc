"""The answer contract: what the policy writes, what the tool is called with, and the conversion
between them. Plain Python (no torch, no transformers), so anything may import it.

The policy answers ``<think>…</think><answer>{"bbox": [x1, y1, x2, y2], "points": [[x, y], …]}</answer>``
in its model family's coordinate convention; the parser turns that into a ``ToolCall`` in
original-image pixels, which is what the tool, the rewards, the metrics and the caches see.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Sequence

ANSWER_FORMAT = '<answer>{"bbox": [x1, y1, x2, y2], "points": [[x, y]]}</answer>'
DEFAULT_TEMPLATE = ("Please find \"{query}\" in the image. Think it through in <think> </think>, then give one "
                    "box and one point inside the object as <answer>{{\"bbox\": [x1, y1, x2, y2], "
                    "\"points\": [[x, y]]}}</answer>.")
# Where the image goes in the user turn: a template that holds IMAGE_SLOT puts it there (the text
# before and after it around the image); one without puts the image first, as Qwen's own examples do.
IMAGE_SLOT = "{image}"
# How coordinates in an answer relate to the image: absolute pixels of the image the processor
# resized (Qwen2.5-VL), or 0..1000 relative to the image (Qwen2-VL, Qwen3-VL).
COORD_CONVENTIONS = ("absolute", "relative1000")



def prompt_parts(template: str, query: str) -> list[str | None]:
    """The user turn's content, in order: text pieces and ``None`` where the image goes.

    >>> prompt_parts("Locate: {query}.", "the red circle")
    [None, 'Locate: the red circle.']
    >>> prompt_parts("Locate: {query}. {image}", "the red circle")
    ['Locate: the red circle. ', None]
    >>> prompt_parts("Look: {image} Where is {query}?", "it")
    ['Look: ', None, ' Where is it?']
    """
    check_template(template)
    if IMAGE_SLOT not in template:
        return [None, template.format(query=query)]
    before, after = template.split(IMAGE_SLOT)
    parts: list[str | None] = [before.format(query=query) if "{query}" in before else before.format(), None,
                               after.format(query=query) if "{query}" in after else after.format()]
    return [p for p in parts if p != ""]


def check_template(template: str) -> None:
    """A prompt template asks for the query once and places the image at most once."""
    if template.count("{query}") != 1 or template.count(IMAGE_SLOT) > 1:
        raise ValueError(f"prompt template {template!r} must hold {{query}} exactly once and {IMAGE_SLOT} at most "
                         f"once (where the image goes; without it the image comes first)")


ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>", re.DOTALL)

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class ToolCall:
    """A parsed tool call in original-image pixel coordinates."""

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()

    def to_dict(self) -> dict:
        return {"bbox": list(self.box) if self.box else None, "points": [list(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ToolCall | None":
        """The inverse of ``to_dict`` (None stays None: an unparsable answer has no call)."""
        if d is None:
            return None
        box = tuple(d["bbox"]) if d.get("bbox") is not None else None
        return cls(box=box, points=tuple(tuple(p) for p in d.get("points") or ()))


@dataclass(frozen=True)
class ParsedAnswer:
    call: ToolCall | None
    status: str  # "ok" or why the answer is unusable

    @property
    def format_ok(self) -> bool:
        return self.call is not None


def _number(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"not a finite number: {v!r}")
    return float(v)


def to_pixels(x: float, y: float, convention: str, resized: Size, original: Size) -> tuple[float, float]:
    """A point written in ``convention`` -> original-image pixels (x scales by width, y by height)."""
    oh, ow = original
    if convention == "relative1000":
        return x / 1000.0 * ow, y / 1000.0 * oh
    rh, rw = resized
    return x * ow / rw, y * oh / rh


def from_pixels(x: float, y: float, convention: str, resized: Size, original: Size) -> tuple[int, int]:
    """Original-image pixels -> the integer coordinates a model of ``convention`` writes."""
    oh, ow = original
    if convention == "relative1000":
        return round(x / ow * 1000), round(y / oh * 1000)
    rh, rw = resized
    return round(x * rw / ow), round(y * rh / oh)


def parse_answer(text: str, original_size: Size, resized_size: Size | None = None,
                 convention: str = "absolute", require_think: bool = False) -> ParsedAnswer:
    """Parse ``<answer>{"bbox": [...], "points": [[x, y], ...]}</answer>`` into a ToolCall.

    Coordinates are mapped to original-image pixels and clipped to the image; a box with no area
    left inside the image, or a point outside it, makes the answer unusable. Never raises.
    """
    resized_size = resized_size or original_size
    matches = ANSWER_RE.findall(text)
    if not matches:
        return ParsedAnswer(None, "no answer tag")
    if require_think and not THINK_RE.match(text):
        return ParsedAnswer(None, "no think block")
    try:
        obj = json.loads(matches[-1].strip())
    except (json.JSONDecodeError, ValueError):
        return ParsedAnswer(None, "bad json")
    if not isinstance(obj, dict):
        return ParsedAnswer(None, "answer is not an object")
    oh, ow = original_size
    box = None
    try:
        if obj.get("bbox") is not None:
            raw = obj["bbox"]
            if not isinstance(raw, list) or len(raw) != 4:
                return ParsedAnswer(None, "bbox needs 4 numbers")
            x1, y1, x2, y2 = (_number(v) for v in raw)
            (x1, y1), (x2, y2) = (to_pixels(x1, y1, convention, resized_size, original_size),
                                  to_pixels(x2, y2, convention, resized_size, original_size))
            x1, x2 = sorted((min(max(x1, 0.0), ow), min(max(x2, 0.0), ow)))
            y1, y2 = sorted((min(max(y1, 0.0), oh), min(max(y2, 0.0), oh)))
            if x2 - x1 < 1 or y2 - y1 < 1:
                return ParsedAnswer(None, "empty bbox inside the image")
            box = (x1, y1, x2, y2)
        points = []
        for p in obj.get("points") or []:
            if not isinstance(p, list) or len(p) != 2:
                return ParsedAnswer(None, "point needs 2 numbers")
            x, y = to_pixels(_number(p[0]), _number(p[1]), convention, resized_size, original_size)
            if not (0 <= x <= ow and 0 <= y <= oh):
                return ParsedAnswer(None, "point outside the image")
            points.append((x, y))
    except (ValueError, TypeError):
        return ParsedAnswer(None, "coordinate is not a number")
    if box is None and not points:
        return ParsedAnswer(None, "no bbox and no points")
    return ParsedAnswer(ToolCall(box=box, points=tuple(points)), "ok")


def format_answer(box: Sequence[float], point: Sequence[float], original_size: Size, resized_size: Size,
                  convention: str) -> str:
    """The target answer for supervised warm-up, in the model family's coordinate convention."""
    x1, y1 = from_pixels(box[0], box[1], convention, resized_size, original_size)
    x2, y2 = from_pixels(box[2], box[3], convention, resized_size, original_size)
    px, py = from_pixels(point[0], point[1], convention, resized_size, original_size)
    return f'<answer>{{"bbox": [{x1}, {y1}, {x2}, {y2}], "points": [[{px}, {py}]]}}</answer>'
