"""The toy world: seeded, captioned 16x16 RGB scenes (docs/toyworld.md "World", made harder as issue 6 asks).

What makes it harder than the prototype (docs/toyworld.md: "too easy: colour and position were right 100 % of the
time for every model"):

* backgrounds are a grey gradient, stripes or smooth blotches, with a random level and a slight tint: many
  modes per prompt, and flows that curve more;
* 6 colours, 3 shapes, size words (``small`` / ``large``; a one-object caption leaves the size out a quarter of
  the time, so that size is then a free mode);
* half the scenes hold two objects in a relation: "a red circle left of a blue square", "a cyan square below
  a green circle". A relation has two phrasings of the same picture ("A left of B" = "B right of A").

Captions come from one small grammar (:func:`caption`, inverted by :func:`parse_caption`); the empty caption
is the null prompt of classifier-free guidance. Every image carries its **attribute labels** (the truth, for
the evaluator's classifier), and every caption its *caption labels* (what the prompt asks for; -1 where it
leaves an attribute open). Two-object scenes are labelled in reading order, so both phrasings of a picture
get the same labels: ``layout`` says horizontal or vertical, ``colour`` / ``shape`` are the left (or top)
object, ``colour_2`` / ``shape_2`` the right (or bottom) one.

All randomness comes from a ``torch.Generator`` (never the global RNG), and rendering is vectorised: a few
thousand images take a few hundred milliseconds on one core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NULL_PROMPT = ""

COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple")
COLOUR_RGB = torch.tensor([  # in [0, 1]; saturated, so they stand out from the near-grey backgrounds
    [0.90, 0.12, 0.12], [0.95, 0.85, 0.10], [0.15, 0.75, 0.20],
    [0.10, 0.80, 0.85], [0.15, 0.25, 0.95], [0.65, 0.15, 0.85],
])
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top", "bottom", "left", "right", "center")
POSITION_PHRASES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
                    "right": "on the right", "center": "in the center"}
LAYOUTS = ("single", "horizontal", "vertical")
BACKGROUNDS = ("gradient", "stripes", "blotches")
RELATIONS = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}

# Attribute -> class names. -1 in a label tensor means "not applicable" (or, for a caption, "not said").
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "layout": LAYOUTS,
    "colour": COLOURS,        # the only object, or the left / top one
    "shape": SHAPES,
    "size": SIZES,            # one-object scenes only
    "position": POSITIONS,    # one-object scenes only
    "colour_2": COLOURS,      # the right / bottom object of a pair
    "shape_2": SHAPES,
    "background": BACKGROUNDS,  # never in a caption: a free mode of every prompt
}

# Geometry, in pixels (the image spans [0, 16]; pixel centres at i + 0.5).
HALF_SIZE = {"small": (1.8, 2.3), "large": (3.4, 4.0), "pair": (2.4, 3.0)}
# A square as wide as its circle (4/pi of its area): at 0.88 (equal areas) the two differ by under a pixel at
# 16 px and the evaluator itself told real circles from squares 79 % of the time (docs/toyworld.md "Teacher")
SQUARE_SCALE = 1.0
TRIANGLE_SCALE = 1.2
COLOUR_JITTER = 0.05
SIZE_WORD_RATE = 0.75  # one-object captions say the size this often
PAIR_RATE = 0.5


@dataclass
class ToyBatch:
    """Images [N, 3, 16, 16] in [-1, 1], their captions, their attribute labels ({name: LongTensor [N]}) and,
    when asked for, their shape regions."""

    images: torch.Tensor
    captions: list[str]
    labels: dict[str, torch.Tensor]
    regions: torch.Tensor | None = None  # [N, 1, 16, 16] shape regions (:func:`shape_region`), when asked for


# --------------------------------------------------------------------------------------------- vocabulary


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce, sorted (the tokenizer's word list)."""
    words = {"a", *COLOURS, *SHAPES, *SIZES}
    for phrase in (*POSITION_PHRASES.values(), *(r for pair in RELATIONS.values() for r in pair)):
        words.update(phrase.split())
    return sorted(words)


# ------------------------------------------------------------------------------------------------ labels


def _randint(high: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(high, (n,), generator=generator)


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_labels(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Attribute labels of ``n`` random scenes, plus two caption controls that are not attributes:
    ``says_size`` (one-object captions name the size) and ``phrasing`` (0: "A left of B", 1: "B right of A")."""
    pair = torch.rand(n, generator=generator) < PAIR_RATE
    layout = torch.where(pair, 1 + _randint(2, n, generator), torch.zeros(n, dtype=torch.long))
    colour, shape = _randint(len(COLOURS), n, generator), _randint(len(SHAPES), n, generator)
    # The second object differs from the first in colour or shape (or both): 17 of the 18 combinations.
    combos = len(COLOURS) * len(SHAPES)
    second = (colour * len(SHAPES) + shape + 1 + _randint(combos - 1, n, generator)) % combos
    none = torch.full((n,), -1, dtype=torch.long)
    return {
        "layout": layout,
        "colour": colour,
        "shape": shape,
        "size": torch.where(pair, none, _randint(len(SIZES), n, generator)),
        "position": torch.where(pair, none, _randint(len(POSITIONS), n, generator)),
        "colour_2": torch.where(pair, second // len(SHAPES), none),
        "shape_2": torch.where(pair, second % len(SHAPES), none),
        "background": _randint(len(BACKGROUNDS), n, generator),
        "says_size": (~pair & (torch.rand(n, generator=generator) < SIZE_WORD_RATE)).long(),
        "phrasing": torch.where(pair, _randint(2, n, generator), torch.zeros(n, dtype=torch.long)),
    }


# ---------------------------------------------------------------------------------------------- captions


def _object(colour: int, shape: int) -> str:
    return f"a {COLOURS[colour]} {SHAPES[shape]}"


def caption(labels: dict[str, torch.Tensor], i: int) -> str:
    """The caption of scene ``i`` of ``labels`` (as :func:`sample_labels` makes them)."""
    row = {k: int(v[i]) for k, v in labels.items()}
    layout = LAYOUTS[row["layout"]]
    if layout == "single":
        size = f"{SIZES[row['size']]} " if row.get("says_size", 1) else ""
        return f"a {size}{COLOURS[row['colour']]} {SHAPES[row['shape']]} {POSITION_PHRASES[POSITIONS[row['position']]]}"
    first, second = _object(row["colour"], row["shape"]), _object(row["colour_2"], row["shape_2"])
    forward, backward = RELATIONS[layout]
    return f"{first} {forward} {second}" if row.get("phrasing", 0) == 0 else f"{second} {backward} {first}"


def captions(labels: dict[str, torch.Tensor]) -> list[str]:
    return [caption(labels, i) for i in range(len(labels["layout"]))]


def _parse_object(words: list[str], text: str) -> tuple[int, int]:
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"'{text}': expected 'a <colour> <shape>' with a colour in {COLOURS} and a shape in "
                         f"{SHAPES}, got '{' '.join(words)}'")
    return COLOURS.index(words[1]), SHAPES.index(words[2])


def parse_caption(text: str) -> dict[str, int]:
    """Caption labels of one prompt of the toy grammar (the inverse of :func:`caption`).

    Attributes the prompt leaves open are -1 (background always; size when not said; everything for the null
    prompt). Raises ValueError, naming the prompt and the grammar, for text outside the grammar.
    """
    labels = dict.fromkeys(ATTRIBUTES, -1)
    words = text.lower().split()
    if not words:
        return labels
    for layout, (forward, backward) in RELATIONS.items():
        for reverse, relation in enumerate((forward, backward)):
            rel = relation.split()
            for k in range(len(words) - len(rel) + 1):
                if words[k:k + len(rel)] == rel:
                    a = _parse_object(words[:k], text)
                    b = _parse_object(words[k + len(rel):], text)
                    first, second = (b, a) if reverse else (a, b)
                    labels.update(layout=LAYOUTS.index(layout), colour=first[0], shape=first[1],
                                  colour_2=second[0], shape_2=second[1])
                    return labels
    for position, phrase in POSITION_PHRASES.items():
        tail = phrase.split()
        if words[-len(tail):] == tail:
            head = words[:-len(tail)]
            if len(head) == 4 and head[1] in SIZES:
                labels["size"] = SIZES.index(head.pop(1))
            colour, shape = _parse_object(head, text)
            labels.update(layout=0, colour=colour, shape=shape, position=POSITIONS.index(position))
            return labels
    raise ValueError(f"'{text}' is not a toy-world caption: expected 'a [small|large] <colour> <shape> "
                     f"<{' | '.join(POSITION_PHRASES.values())}>' or 'a <colour> <shape> <left of | right of | "
                     f"above | below> a <colour> <shape>'")


def caption_labels(prompts: list[str]) -> dict[str, torch.Tensor]:
    """{attribute: LongTensor [N]} of what each prompt asks for (-1 where it leaves the attribute open)."""
    rows = [parse_caption(p) for p in prompts]
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.long) for name in ATTRIBUTES}


# ------------------------------------------------------------------------------------------------- render


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    return coords[None, :].expand(IMAGE_SIZE, IMAGE_SIZE), coords[:, None].expand(IMAGE_SIZE, IMAGE_SIZE)


def _backgrounds(kind: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[N, 3, 16, 16] in [0, 1]: a grey level with a slight tint, plus a gradient, stripes or blotches."""
    n = kind.shape[0]
    x, y = _grid()
    level = _uniform(0.25, 0.75, n, generator)[:, None, None, None]
    tint = (torch.rand(n, 3, generator=generator) - 0.5)[:, :, None, None] * 0.08
    angle = _uniform(0.0, 2 * math.pi, n, generator)[:, None, None]
    along = ((x - 8) * angle.cos() + (y - 8) * angle.sin())  # [N, 16, 16], pixels from the centre
    gradient = _uniform(0.15, 0.35, n, generator)[:, None, None] * along / 8
    period, phase = _uniform(3.0, 6.0, n, generator), _uniform(0.0, 2 * math.pi, n, generator)
    stripes = _uniform(0.06, 0.14, n, generator)[:, None, None] * torch.sin(
        2 * math.pi * along / period[:, None, None] + phase[:, None, None])
    coarse = torch.randn(n, 1, 4, 4, generator=generator)
    blotches = _uniform(0.08, 0.16, n, generator)[:, None, None] * F.interpolate(
        coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[:, 0]
    pattern = torch.stack([gradient, stripes, blotches], dim=1)[torch.arange(n), kind]  # [N, 16, 16]
    return (level + tint + pattern[:, None]).clamp(0.0, 1.0)


def _coverage(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """[N, 16, 16] anti-aliased coverage (0..1) of each object, from a signed distance in pixels."""
    x, y = _grid()
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    r = half[:, None, None]
    circle = torch.sqrt(dx ** 2 + dy ** 2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - SQUARE_SCALE * r
    h = TRIANGLE_SCALE * r  # apex up: apex at cy - h, base at cy + h with half-width 1.1 h
    slope = 1.1 / 2
    sides = (dx.abs() - slope * (dy + h)) / math.sqrt(1 + slope ** 2)
    triangle = torch.maximum(dy - h, sides)
    distance = torch.stack([circle, square, triangle], dim=1)[torch.arange(shape.shape[0]), shape]
    return (0.5 - distance).clamp(0.0, 1.0)


def _single_centres(labels: dict[str, torch.Tensor], half: torch.Tensor, generator: torch.Generator):
    """Centres of one-object scenes: near the named edge (or the middle), jittered along it."""
    n = half.shape[0]
    near = half + _uniform(0.5, 1.5, n, generator)         # distance of the centre from its edge
    along = _uniform(6.5, 9.5, n, generator)
    middle_x, middle_y = _uniform(7.0, 9.0, n, generator), _uniform(7.0, 9.0, n, generator)
    position = labels["position"].clamp(min=0)
    cx = torch.stack([along, along, near, IMAGE_SIZE - near, middle_x], 1)[torch.arange(n), position]
    cy = torch.stack([near, IMAGE_SIZE - near, along, along, middle_y], 1)[torch.arange(n), position]
    return cx, cy


def _pair_centres(labels: dict[str, torch.Tensor], generator: torch.Generator):
    """Centres of the first (left / top) and second object of a pair, at least 6.8 px apart on the axis."""
    n = labels["layout"].shape[0]
    first, second = _uniform(3.2, 4.6, n, generator), _uniform(11.4, 12.8, n, generator)
    across = _uniform(5.0, 11.0, n, generator)
    across_2 = (across + _uniform(-1.5, 1.5, n, generator)).clamp(4.0, 12.0)
    vertical = labels["layout"] == 2
    c1 = (torch.where(vertical, across, first), torch.where(vertical, first, across))
    c2 = (torch.where(vertical, across_2, second), torch.where(vertical, second, across_2))
    return c1, c2


def _colours(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    jitter = (torch.rand(index.shape[0], 3, generator=generator) * 2 - 1) * COLOUR_JITTER
    return (COLOUR_RGB[index.clamp(min=0)] + jitter).clamp(0.0, 1.0)[:, :, None, None]


def shape_region(cx: torch.Tensor, cy: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """[N, 16, 16] in [0, 1]: where a circle, a square and a triangle of this centre and half-size differ (the
    largest difference of any two of their coverages: max minus min). It is the same map whichever shape is drawn
    there: the pixels that tell the shapes apart, a few corners and edges of each object."""
    shapes = torch.stack([_coverage(torch.full_like(cx, k, dtype=torch.long), cx, cy, half)
                          for k in range(len(SHAPES))])
    return shapes.amax(0) - shapes.amin(0)


def render(labels: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """Images [N, 3, 16, 16] in [-1, 1] of scenes with these attribute labels; the free parameters (exact
    positions, sizes, colour jitter, background) are drawn from ``generator``. A label of -1 for ``size`` or
    ``background`` (left open by a caption) is drawn too."""
    return _draw(labels, generator, regions=False)[0]


def _draw(labels: dict[str, torch.Tensor], generator: torch.Generator,
          regions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`render`'s images and, with ``regions``, the scenes' shape regions ``[N, 1, 16, 16]`` (the larger
    of the two objects' :func:`shape_region`); the regions draw nothing from ``generator``."""
    n = labels["layout"].shape[0]
    pair = labels["layout"] > 0
    size = torch.where(labels["size"] >= 0, labels["size"], _randint(len(SIZES), n, generator))
    background = torch.where(labels["background"] >= 0, labels["background"],
                             _randint(len(BACKGROUNDS), n, generator))
    small, large, medium = (_uniform(*HALF_SIZE[k], n, generator) for k in ("small", "large", "pair"))
    half = torch.where(pair, medium, torch.where(size == 1, large, small))
    half_2 = _uniform(*HALF_SIZE["pair"], n, generator)
    sx, sy = _single_centres(labels, half, generator)
    (px, py), (qx, qy) = _pair_centres(labels, generator)
    cx, cy = torch.where(pair, px, sx), torch.where(pair, py, sy)
    image = _backgrounds(background, generator)
    first = _coverage(labels["shape"], cx, cy, half)[:, None]
    image = image * (1 - first) + _colours(labels["colour"], generator) * first
    second = _coverage(labels["shape_2"].clamp(min=0), qx, qy, half_2)[:, None] * pair[:, None, None, None]
    image = image * (1 - second) + _colours(labels["colour_2"], generator) * second
    if not regions:
        return image * 2 - 1, None
    region = torch.maximum(shape_region(cx, cy, half), shape_region(qx, qy, half_2) * pair[:, None, None])
    return image * 2 - 1, region[:, None]


def sample(n: int, generator: torch.Generator | int, regions: bool = False) -> ToyBatch:
    """``n`` random scenes: images, captions, attribute labels and, with ``regions``, shape regions (the same
    images either way). ``generator`` may be a seed."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    labels = sample_labels(n, generator)
    texts = captions(labels)
    images, region = _draw(labels, generator, regions)
    return ToyBatch(images, texts, {k: labels[k] for k in ATTRIBUTES}, region)


def sample_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Images only (no captions to build): the VAE's and the classifier's training stream."""
    return render(sample_labels(n, generator), generator)


def sample_for_prompts(prompts: list[str], generator: torch.Generator | int) -> ToyBatch:
    """Real images for given prompts (one each; repeat a prompt for more): the reference sets of FD to real
    images. Attributes a prompt leaves open (size, background) are drawn at random; ``labels`` are the
    rendered truth."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    asked = caption_labels(prompts)
    if bool((asked["layout"] < 0).any()):
        raise ValueError("sample_for_prompts: the null prompt has no scene to render")
    n = len(prompts)
    labels = dict(asked)
    labels["size"] = torch.where((asked["layout"] == 0) & (asked["size"] < 0), _randint(len(SIZES), n, generator),
                                 asked["size"])
    labels["background"] = _randint(len(BACKGROUNDS), n, generator)
    return ToyBatch(render(labels, generator), list(prompts), labels)


# ------------------------------------------------------------------------------------------- evaluation

# Fixed evaluation prompts: every colour, shape, size, position and relation appears; half are two-object
# scenes; one leaves the size open (the demo prompt of issue 6).
EVAL_PROMPTS = (
    "a large red circle at the top",
    "a small blue square at the bottom",
    "a large green triangle on the left",
    "a small yellow circle on the right",
    "a large purple square in the center",
    "a small cyan triangle at the top",
    "a small red square on the left",
    "a large blue triangle on the right",
    "a small green circle in the center",
    "a large yellow triangle at the bottom",
    "a large cyan circle on the left",
    "a blue triangle at the top",
    "a red circle left of a blue square",
    "a green triangle right of a yellow circle",
    "a purple square above a cyan triangle",
    "a blue circle below a red triangle",
    "a yellow square left of a purple circle",
    "a cyan circle right of a green square",
    "a red triangle above a green circle",
    "a blue triangle below a yellow square",
    "a purple triangle left of a red square",
    "a cyan square right of a blue circle",
    "a green circle above a purple triangle",
    "a yellow triangle below a cyan square",
)
