"""The shapes world: a deterministic, seeded generator of scenes, their images, captions and attributes.

It is what lets the product train and be measured with no downloads: every image comes with the exact
attributes of the objects in it, captions say all of them, and `parse_caption` reads free model output
back into attributes so captions and retrievals can be scored exactly.

A seed decides everything (scene, wording, pixel jitter) through its own `random.Random(seed)`, so the
same seed gives byte-identical images and the same caption in any process.

Seed ranges of the splits (disjoint; `seed_for(split, index)`):
    train    [0, 1_000_000_000)
    val      [1_000_000_000, 1_001_000_000)
    test     [1_001_000_000, 1_002_000_000)
    holdout  [2_000_000_000, 2_001_000_000)
With `holdout=True`, train/val/test scenes never contain a pair from `HOLDOUT_PAIRS`; the `holdout`
split is always made of scenes that contain at least one of them (compositional generalisation).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (30, 70, 225),
    "yellow": (250, 220, 30),
    "purple": (140, 50, 185),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (225, 210, 175),
    "light blue": (170, 200, 232),
    "dark grey": (62, 62, 66),
}
HOLDOUT_PAIRS = (("star", "green"), ("hexagon", "red"), ("triangle", "blue"), ("circle", "yellow"))
"""(shape, colour) pairs kept out of train/val/test when `holdout=True`; every `holdout` scene has one."""
MAX_OBJECTS = 3

SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000_000),
    "val": (1_000_000_000, 1_001_000_000),
    "test": (1_001_000_000, 1_002_000_000),
    "holdout": (2_000_000_000, 2_001_000_000),
}

# Geometry, as fractions of the canvas side. Neighbouring centres are 0.32 apart and a large object's
# radius with jitter is at most 0.135 + 0.02 offset, so objects never touch.
_CENTRES = {"left": (0.18, 0.5), "right": (0.82, 0.5), "top": (0.5, 0.18), "bottom": (0.5, 0.82),
            "centre": (0.5, 0.5)}
_RADII = {"small": 0.075, "large": 0.125}
_SUPERSAMPLE = 2  # PIL draws polygons without anti-aliasing: draw at 2x and box-filter down


@dataclass(frozen=True)
class SceneObject:
    """One object. Generated objects have every field; a parsed one has None where the text said nothing."""
    shape: str | None
    colour: str | None
    size: str | None
    position: str | None


def _object_key(obj: SceneObject) -> tuple:
    pos = POSITIONS.index(obj.position) if obj.position in POSITIONS else len(POSITIONS)
    return (pos, obj.shape or "", obj.colour or "", obj.size or "")


@dataclass(frozen=True)
class Scene:
    """Objects in canonical order (by position), so `==` is set equality of objects; background or None."""
    objects: tuple[SceneObject, ...]
    background: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=_object_key)))


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    scene: Scene


# --- scenes ---------------------------------------------------------------------------------------

def _sample_object(rng: random.Random, position: str, mode: str) -> SceneObject:
    """mode: 'all' (any pair), 'exclude' (no hold-out pair), 'require' (a hold-out pair)."""
    if mode == "require":
        shape, colour = rng.choice(HOLDOUT_PAIRS)
    else:
        shape = rng.choice(SHAPES)
        colour = rng.choice(tuple(COLOURS))
        while mode == "exclude" and (shape, colour) in HOLDOUT_PAIRS:
            colour = rng.choice(tuple(COLOURS))
    return SceneObject(shape=shape, colour=colour, size=rng.choice(SIZES), position=position)


def make_scene(rng: random.Random, mode: str = "all") -> Scene:
    """1 to 3 objects at distinct positions on a background."""
    if mode not in ("all", "exclude", "require"):
        raise ValueError(f"mode must be 'all', 'exclude' or 'require', got {mode!r}")
    n = rng.randint(1, MAX_OBJECTS)
    positions = rng.sample(POSITIONS, n)
    required = rng.randrange(n) if mode == "require" else -1
    objects = [_sample_object(rng, p, "require" if i == required else ("all" if mode == "require" else mode))
               for i, p in enumerate(positions)]
    return Scene(objects=tuple(objects), background=rng.choice(tuple(BACKGROUNDS)))


# --- captions -------------------------------------------------------------------------------------

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "to the left"),
    "right": ("on the right", "to the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
_TEMPLATES = (
    "{objects}.",
    "there {be} {objects}.",
    "a picture of {objects}.",
    "an image with {objects}.",
    "this image shows {objects}.",
    "{objects} on a {background} background.",
    "a {background} background with {objects}.",
)


def _object_phrase(obj: SceneObject, rng: random.Random) -> str:
    size = rng.choice(SIZE_WORDS[obj.size])
    return f"a {size} {obj.colour} {obj.shape} {rng.choice(POSITION_PHRASES[obj.position])}"


def describe(scene: Scene, rng: random.Random) -> str:
    """A caption from the grammar: objects in random order, each with its size, colour, shape, position."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    phrases = [_object_phrase(o, rng) for o in objects]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    # Three objects and a background would not fit the demo CLIP's 32 tokens: the background is left out.
    template = rng.choice([t for t in _TEMPLATES if len(phrases) < 3 or "{background}" not in t])
    text = template.format(objects=listed, be="is" if len(phrases) == 1 else "are",
                           background=scene.background)
    return text[0].upper() + text[1:]


READING_ORDER = ("top", "left", "centre", "right", "bottom")
"""The positions as a region grid lists its cells: row by row from the top left."""


def plain_caption(scene: Scene) -> str:
    """The grammar's plainest caption: objects in reading order, first wording of each word. It is also how the
    demo model describes a scene: a model learning to describe needs no guess at which of many equally good
    orders and wordings comes next (requests for a picture keep the grammar's variety), and it meets the objects
    in the order its region tokens list them."""
    ordered = sorted(scene.objects, key=lambda o: READING_ORDER.index(o.position))
    phrases = [f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position][0]}" for o in ordered]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed[0].upper()}{listed[1:]}."


# --- rendering ------------------------------------------------------------------------------------

def _regular(n: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.sin(angle + 2 * math.pi * k / n), cy - r * math.cos(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, r: float,
             angle: float) -> list[tuple[float, float]]:
    """Unit-shape points scaled by r, rotated by angle, moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


_CROSS = [(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3), (0.3, 0.9),
          (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, rng: random.Random) -> None:
    fx, fy = _CENTRES[obj.position]
    cx = (fx + rng.uniform(-0.02, 0.02)) * side
    cy = (fy + rng.uniform(-0.02, 0.02)) * side
    r = _RADII[obj.size] * rng.uniform(0.92, 1.08) * side
    angle = math.radians(rng.uniform(-10.0, 10.0))
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    if obj.shape == "square":
        points = _regular(4, cx, cy, r * 1.05, angle + math.pi / 4)
    elif obj.shape == "triangle":
        points = _regular(3, cx, cy + 0.15 * r, r * 1.15, angle)
    elif obj.shape == "hexagon":
        points = _regular(6, cx, cy, r, angle + math.pi / 6)
    elif obj.shape == "diamond":
        points = _rotated([(0.0, -1.1), (0.65, 0.0), (0.0, 1.1), (-0.65, 0.0)], cx, cy, r, angle)
    elif obj.shape == "star":
        outer = _regular(5, cx, cy, r * 1.1, angle)
        inner = _regular(5, cx, cy, r * 0.45, angle + math.pi / 5)
        points = [p for pair in zip(outer, inner) for p in pair]
    elif obj.shape == "cross":
        points = _rotated(_CROSS, cx, cy, r, angle)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    draw.polygon(points, fill=fill)


def render(scene: Scene, rng: random.Random, image_size: int = 128) -> Image.Image:
    """Draw the scene as an RGB image, with small seeded jitter in each object's place, size and angle."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side, rng)
    return image.reduce(_SUPERSAMPLE)


# --- seeds and splits -----------------------------------------------------------------------------

def seed_for(split: str, index: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    start, stop = SPLITS[split]
    if not 0 <= index < stop - start:
        raise IndexError(f"index {index} is outside split {split!r} (size {stop - start})")
    return start + index


def split_mode(split: str, holdout: bool) -> str:
    """How scenes of a split treat hold-out pairs."""
    if split == "holdout":
        return "require"
    return "exclude" if holdout else "all"


def generate(seed: int, image_size: int = 128, mode: str = "all") -> Sample:
    """seed -> (image, caption, scene). The scene, the wording and the jitter each draw from their own
    stream, so changing the image size changes no caption."""
    scene = make_scene(random.Random(seed), mode)
    caption = describe(scene, random.Random(f"caption:{seed}"))
    image = render(scene, random.Random(f"render:{seed}"), image_size)
    return Sample(image=image, caption=caption, scene=scene)


def sample(split: str, index: int, image_size: int = 128, holdout: bool = False) -> Sample:
    """Item `index` of a split."""
    return generate(seed_for(split, index), image_size, split_mode(split, holdout))


def image(split: str, index: int, image_size: int = 128, holdout: bool = False) -> Image.Image:
    """Item `index`'s image alone, the same pixels as `sample`'s: its scene is drawn and never described, so a
    caller that must not see captions (ESPER) has none to see."""
    seed = seed_for(split, index)
    return render(make_scene(random.Random(seed), split_mode(split, holdout)), random.Random(f"render:{seed}"),
                  image_size)


# --- parsing --------------------------------------------------------------------------------------

_WORDS: dict[str, tuple[str, str]] = {}
for _s in SHAPES:
    _WORDS[_s] = _WORDS[_s + "s"] = ("shape", _s)
_WORDS["crosses"] = ("shape", "cross")
_WORDS["rhombus"] = ("shape", "diamond")
for _c in COLOURS:
    _WORDS[_c] = ("colour", _c)
_WORDS["violet"] = ("colour", "purple")
for _size, _synonyms in {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}.items():
    for _w in _synonyms:
        _WORDS[_w] = ("size", _size)
for _p in ("left", "right", "top", "bottom"):
    _WORDS[_p] = ("position", _p)
for _w in ("centre", "center", "middle"):
    _WORDS[_w] = ("position", "centre")



def word_meaning(word: str) -> tuple[str, str] | None:
    """A word's (attribute, value) in the grammar, synonyms and plurals included ("big" -> ("size", "large"),
    "middle" -> ("position", "centre"), "circles" -> ("shape", "circle")); None for other words."""
    return _WORDS.get(word.lower())


def centre_of(position: str) -> tuple[float, float]:
    """(x, y) of a position's centre, as fractions of the canvas side (y grows downwards)."""
    return _CENTRES[position]


_BACKGROUND_NAMES = {name.replace(" ", r"\s+"): name for name in BACKGROUNDS}
_BACKGROUND_RE = re.compile(r"([a-z]+(?:\s+[a-z]+)?)\s+background")
_FIELDS = ("shape", "colour", "size", "position")


def _find_background(text: str) -> tuple[str | None, str]:
    """The named background (if any) and the text with every 'X background' phrase removed."""
    found = None
    for match in _BACKGROUND_RE.finditer(text):
        words = match.group(1)
        for pattern, name in _BACKGROUND_NAMES.items():
            if re.fullmatch(rf"(?:.*\s)?{pattern}", words):
                if found is None or len(name) > len(found):
                    found = name
    return found, _BACKGROUND_RE.sub(" ", text)


def parse_caption(text: str) -> Scene | None:
    """Read objects (and the background, if named) out of free text; None when no object is named.

    Tolerant of casing, punctuation, synonyms (big/little, middle/center, gray) and text around the
    description. Adjectives come before their shape word, a position after it or before the next
    adjectives; a new object starts when a word would fill an attribute its object already has, or an
    adjective follows a shape. An object counts when its shape is named; unsaid attributes are None.
    """
    objects, background = _read_description(text)
    return Scene(objects=tuple(objects), background=background) if objects else None


def described_objects(text: str) -> list[SceneObject]:
    """The objects free text names, in the order it names them (`parse_caption`'s scene puts them in canonical
    order): what a reader going through the text meets first comes first."""
    return _read_description(text)[0]


def _read_description(text: str) -> tuple[list[SceneObject], str | None]:
    text = text.lower().replace("gray", "grey")
    background, text = _find_background(re.sub(r"[^a-z]+", " ", text))
    objects: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for word in text.split():
        kind_value = _WORDS.get(word)
        if kind_value is None:
            continue
        kind, value = kind_value
        starts_new = kind in current or (kind in ("size", "colour") and "shape" in current)
        if starts_new:
            objects.append(current)
            current = {}
        current[kind] = value
    objects.append(current)
    return [SceneObject(**{f: o.get(f) for f in _FIELDS}) for o in objects if "shape" in o], background


def score_scene(truth: Scene, predicted: Scene | None) -> dict[str, float]:
    """How well a parsed prediction matches the truth.

    exact: the predicted object set equals the true one (background ignored); count: same number of
    objects; shape/colour/size/position: fraction of true objects whose attribute is right, objects
    matched by position (a true object with no predicted object at its place scores 0 on shape, colour
    and size; position counts objects placed right at all); shape_colour: fraction of true objects whose
    shape and colour together are named, wherever and however big, by a caption naming no more objects than
    there are (a caption that does not place its objects, as one learnt without captions may not, still counts).
    """
    if predicted is None:
        return {"exact": 0.0, "count": 0.0, "shape_colour": 0.0, **{f: 0.0 for f in _FIELDS}}
    by_position = {o.position: o for o in predicted.objects if o.position is not None}
    named = {(o.shape, o.colour) for o in predicted.objects}
    n = len(truth.objects)
    scores = {"exact": float(truth.objects == predicted.objects),
              "count": float(len(truth.objects) == len(predicted.objects)),
              "shape_colour": sum((o.shape, o.colour) in named for o in truth.objects) / n
              if len(predicted.objects) <= n else 0.0,
              "position": sum(o.position in by_position for o in truth.objects) / n}
    for field in ("shape", "colour", "size"):
        scores[field] = sum(getattr(by_position.get(o.position), field, None) == getattr(o, field)
                            for o in truth.objects) / n
    return scores
