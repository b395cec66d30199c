"""The shapes world: deterministic scenes whose captions and pixels agree with their attributes."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from model.world import shapes
from model.world.shapes import Scene, SceneObject, parse_caption, score_scene

N_SEEDS = 3000


def _digest(seed: int) -> str:
    s = shapes.generate(seed)
    return hashlib.sha256(s.image.tobytes() + s.caption.encode()).hexdigest()


def test_same_seed_gives_identical_bytes_caption_and_scene():
    a, b = shapes.generate(1234), shapes.generate(1234)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.caption, a.scene) == (b.caption, b.scene)
    assert a.image.mode == "RGB" and a.image.size == (128, 128)


def test_same_seed_gives_identical_bytes_in_another_process():
    seeds = [0, 7, 99_999, shapes.seed_for("test", 3)]
    code = ("import json, sys; sys.path.insert(0, '.'); from tests.test_shapes import _digest; "
            f"print(json.dumps([_digest(s) for s in {seeds}]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another string-hash order must not matter
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert json.loads(out.stdout) == [_digest(s) for s in seeds]


def test_image_size_is_configurable_and_does_not_change_the_caption():
    small, default = shapes.generate(5, image_size=64), shapes.generate(5)
    assert small.image.size == (64, 64)
    assert (small.caption, small.scene) == (default.caption, default.scene)


def test_equal_attributes_render_differently_with_jitter():
    scene = Scene((SceneObject("star", "red", "large", "centre"),), "grey")
    a = shapes.render(scene, random.Random(1))
    b = shapes.render(scene, random.Random(2))
    assert a.tobytes() != b.tobytes()


def test_scenes_use_the_whole_vocabulary_with_distinct_positions():
    scenes = [shapes.generate(seed).scene for seed in range(N_SEEDS)]
    objects = [o for s in scenes for o in s.objects]
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {o.shape for o in objects} == set(shapes.SHAPES) and len(shapes.SHAPES) >= 6
    assert {o.colour for o in objects} == set(shapes.COLOURS) and len(shapes.COLOURS) == 8
    assert {o.size for o in objects} == set(shapes.SIZES)
    assert {o.position for o in objects} == set(shapes.POSITIONS)
    assert {s.background for s in scenes} == set(shapes.BACKGROUNDS)
    for s in scenes:
        assert len({o.position for o in s.objects}) == len(s.objects)


def test_caption_states_every_attribute_of_every_object():
    for seed in range(N_SEEDS):
        s = shapes.generate(seed)
        parsed = parse_caption(s.caption)
        assert parsed is not None and parsed.objects == s.scene.objects, (seed, s.caption)
        assert parsed.background in (None, s.scene.background), (seed, s.caption)
        text = s.caption.lower()
        for o in s.scene.objects:  # independent of the parser: the words are there
            assert o.colour in text and o.shape in text, (seed, s.caption)


def test_captions_vary_in_wording():
    captions = [shapes.generate(seed).caption for seed in range(300)]
    openings = {c.split()[0] for c in captions}
    assert {"There", "A", "An", "This"} <= openings
    assert any("background" in c for c in captions) and any("middle" in c for c in captions)


def test_pixels_agree_with_attributes():
    """Each object's colour is at its position's centre, the background in the corners, and large
    objects cover more pixels than small ones of the same shape."""
    areas: dict[tuple[str, str], list[int]] = {}
    for seed in range(600):
        s = shapes.generate(seed)
        pixels = np.asarray(s.image).astype(int)  # (128, 128, 3)
        background = shapes.BACKGROUNDS[s.scene.background]
        assert tuple(pixels[1, 1]) == background and tuple(pixels[-2, -2]) == background
        for o in s.scene.objects:
            fx, fy = shapes._CENTRES[o.position]
            cx, cy = int(fx * 128), int(fy * 128)
            assert np.abs(pixels[cy, cx] - shapes.COLOURS[o.colour]).max() <= 2, (seed, o)
            cell = pixels[max(0, cy - 20):cy + 20, max(0, cx - 20):cx + 20]
            areas.setdefault((o.shape, o.size), []).append(int((np.abs(cell - background).sum(-1) > 30).sum()))
    for shape in shapes.SHAPES:
        assert min(areas[(shape, "large")]) > max(areas[(shape, "small")]), shape


def test_splits_are_disjoint_seed_ranges():
    ranges = sorted(shapes.SPLITS.values())
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert stop <= start
    assert shapes.seed_for("val", 0) == shapes.SPLITS["val"][0]
    with pytest.raises(IndexError):
        shapes.seed_for("val", shapes.SPLITS["val"][1] - shapes.SPLITS["val"][0])
    with pytest.raises(ValueError, match="unknown split"):
        shapes.seed_for("dev", 0)


def _pairs(split: str, holdout: bool, n: int = 2000) -> list[set[tuple[str, str]]]:
    return [{(o.shape, o.colour) for o in shapes.sample(split, i, 16, holdout).scene.objects} for i in range(n)]


def test_holdout_pairs_never_appear_in_train_val_test_and_every_holdout_scene_has_one():
    held = set(shapes.HOLDOUT_PAIRS)
    for split in ("train", "val", "test"):
        assert not any(p & held for p in _pairs(split, holdout=True)), split
    assert all(p & held for p in _pairs("holdout", holdout=True))
    assert all(p & held for p in _pairs("holdout", holdout=False))
    assert any(p & held for p in _pairs("train", holdout=False)), "without the option, pairs occur in train"


def test_holdout_scenes_are_otherwise_ordinary():
    scenes = [shapes.sample("holdout", i).scene for i in range(500)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {(o.shape, o.colour) for s in scenes for o in s.objects} > set(shapes.HOLDOUT_PAIRS)


def test_parse_tolerates_wording_casing_punctuation_and_trailing_text():
    truth = Scene((SceneObject("circle", "red", "small", "left"), SceneObject("square", "blue", "large", "top")))
    for text in [
        "a small red circle on the left and a large blue square at the top",
        "A SMALL RED CIRCLE ON THE LEFT; A LARGE BLUE SQUARE AT THE TOP!!!",
        "There's a big blue square near the top, plus a tiny red circle to the left.",
        "On the left, a little red circle. At the top: a huge blue square.",
        "Sure! The image shows a small red circle (left) and a large blue square (top). Anything else?",
        "a large blue square at the top and a small red circle on the left on a gray background",
    ]:
        parsed = parse_caption(text)
        assert parsed is not None and parsed.objects == truth.objects, text


def test_parse_reads_the_background_and_spelling_variants():
    parsed = parse_caption("A big white hexagon in the center on a light blue background.")
    assert parsed == Scene((SceneObject("hexagon", "white", "large", "centre"),), "light blue")
    assert parse_caption("a dark gray background with a small black star in the middle").background == "dark grey"
    # a colour naming the background is not an object's colour
    parsed = parse_caption("a small star at the top on a blue background")
    assert parsed.objects == (SceneObject("star", None, "small", "top"),) and parsed.background is None


def test_parse_returns_what_it_can_and_none_for_no_object():
    assert parse_caption("") is None
    assert parse_caption("I cannot see anything here.") is None
    assert parse_caption("something red on the left") is None  # no shape named: no object
    parsed = parse_caption("a triangle and a green star on the right")
    assert parsed.objects == (SceneObject("star", "green", None, "right"), SceneObject("triangle", None, None, None))


def test_described_objects_come_in_the_order_the_text_names_them():
    text = "A small red star on the right and a large blue circle on the left."
    assert shapes.described_objects(text) == [SceneObject("star", "red", "small", "right"),
                                              SceneObject("circle", "blue", "large", "left")]
    assert parse_caption(text).objects == tuple(reversed(shapes.described_objects(text))), "the scene's order is canonical"
    assert shapes.described_objects("Nothing here.") == []


def test_wrong_captions_parse_as_wrong():
    sample = shapes.generate(42)
    truth = sample.scene
    first = truth.objects[0]
    swaps = {
        "colour": next(c for c in shapes.COLOURS if c != first.colour),
        "shape": next(s for s in shapes.SHAPES if s != first.shape),
    }
    for field, other in swaps.items():
        wrong = Scene(tuple(SceneObject(**{**o.__dict__, field: other}) if o == first else o for o in truth.objects))
        parsed = parse_caption(shapes.plain_caption(wrong))
        assert parsed == wrong and parsed.objects != truth.objects
        assert score_scene(truth, parsed)["exact"] == 0.0
        assert score_scene(truth, parsed)[field] == pytest.approx(1 - 1 / len(truth.objects))
    for seed in range(200):  # changing any one word of a real caption changes the parse
        s = shapes.generate(seed)
        o = s.scene.objects[0]
        other = next(c for c in shapes.COLOURS if c != o.colour)
        words = s.caption.split(" ")
        i = next(k for k, w in enumerate(words) if w == o.colour and words[k + 1].startswith(o.shape))
        wrong = " ".join(words[:i] + [other] + words[i + 1:])
        assert parse_caption(wrong).objects != s.scene.objects, wrong


def test_plain_caption_round_trips():
    for seed in range(500):
        scene = shapes.generate(seed).scene
        assert parse_caption(shapes.plain_caption(scene)).objects == scene.objects


def test_the_plain_caption_lists_objects_as_the_region_grid_reads_them():
    scene = Scene((SceneObject("circle", "red", "small", "right"), SceneObject("star", "blue", "large", "top"),
                   SceneObject("cross", "white", "small", "left")))
    assert shapes.plain_caption(scene) == ("A large blue star at the top, a small white cross on the left and "
                                           "a small red circle on the right.")


def test_score_scene_per_attribute():
    truth = Scene((SceneObject("circle", "red", "small", "left"), SceneObject("star", "blue", "large", "top")))
    assert score_scene(truth, truth) == {"exact": 1.0, "count": 1.0, "position": 1.0, "shape": 1.0,
                                         "colour": 1.0, "size": 1.0, "shape_colour": 1.0}
    one_wrong = parse_caption("a small red circle on the left and a large green star at the top")
    assert score_scene(truth, one_wrong) == {"exact": 0.0, "count": 1.0, "position": 1.0, "shape": 1.0,
                                             "colour": 0.5, "size": 1.0, "shape_colour": 0.5}
    missing = parse_caption("a small red circle on the left")
    assert score_scene(truth, missing) == {"exact": 0.0, "count": 0.0, "position": 0.5, "shape": 0.5,
                                           "colour": 0.5, "size": 0.5, "shape_colour": 0.5}
    assert score_scene(truth, None)["exact"] == 0.0
    unplaced = parse_caption("a blue star and a red circle")
    assert score_scene(truth, unplaced)["shape_colour"] == 1.0 and score_scene(truth, unplaced)["shape"] == 0.0
    listing = parse_caption("a red circle, a blue star, a green star")  # naming everything is not knowing
    assert score_scene(truth, listing)["shape_colour"] == 0.0


def test_scene_equality_is_set_equality():
    a, b = SceneObject("circle", "red", "small", "left"), SceneObject("star", "blue", "large", "top")
    assert Scene((a, b)) == Scene((b, a))
    assert Scene((a,)) != Scene((a, b))
