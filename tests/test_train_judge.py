"""ESPER's judge: the demo's CLIP taught that words outside its captions' grammar name nothing."""
import json
import random

import open_clip
import torch

from model.training import train_judge
from model.training.clip_judge import ClipJudge
from model.world import shapes

STAR = shapes.SceneObject("star", "red", "small", "left")


def test_a_partial_text_names_some_of_one_objects_attributes_and_a_negative_names_nothing():
    rng = random.Random(0)
    scene = shapes.Scene((STAR, shapes.SceneObject("square", "blue", "large", "right")))

    def said(text: str) -> set[str]:
        there = {"shape": "star" in text, "colour": "red" in text, "size": "small" in text or "little" in text,
                 "position": "left" in text}
        return {f for f, yes in there.items() if yes}
    reordered_seen, stood_in_places, stacked_sides = set(), set(), set()
    for _ in range(50):
        text, named, fewer, reordered, added, stood_in, stacked = train_judge.partial_text(
            STAR, ["seldom", "polygon"], rng, swap=False, absent="with a cross", stand_in="dark", stacked="cross")
        assert named and all(getattr(STAR, f) == v for f, v in named.items())
        assert train_judge.names_object(scene, named)
        assert said(text) == set(named)  # what it says is what it names
        if len(named) > 1:  # the text to rank below it says one of those attributes fewer, the rest the same
            assert said(fewer) < said(text) and len(said(fewer)) == len(named) - 1
            # and the one with the background's word standing in for it: the same words as `fewer`, "dark" among them
            assert stood_in.replace(" dark", "", 1) == fewer or stood_in.replace("dark ", "", 1) == fewer
            words = stood_in.split(" ")
            stood_in_places.add(words.index("dark") - max(i for i, w in enumerate(words[:words.index("dark")])
                                                          if w == "a"))
        else:
            assert fewer is None and stood_in is None
        if "shape" in named and {"size", "colour"} & set(named):  # the same words, the shape before its size or colour
            assert said(reordered) == said(text) and reordered != text
            words = reordered.split(" ")
            assert words.index("star") < words.index("red" if "colour" in named else next(
                w for w in ("small", "little") if w in words))
            reordered_seen.add(reordered.split(" star ")[1].split(" ")[0])
        else:
            assert reordered is None
        assert added == f"{text} with a cross"  # the text to rank below it adds a thing the scene does not hold
        if "shape" in named:  # and the one with another shape beside its shape, the rest the same
            assert stacked.replace("cross ", "", 1) == text or stacked.replace(" cross", "", 1) == text
            stacked_sides.add("cross star" in stacked)
        else:
            assert stacked is None
        negative = train_judge.partial_text(STAR, ["seldom", "polygon"], rng, swap=True, absent="with a cross",
                                            stacked="cross")
        assert negative.named is None and negative.fewer is None and negative.reordered is None
        assert negative.added is None and negative.stood_in is None and negative.stacked is None
        unasked = train_judge.partial_text(STAR, ["seldom", "polygon"], rng, swap=False)
        assert unasked.added is None and unasked.stood_in is None and unasked.stacked is None  # none asked for
        assert not train_judge.names_object(scene, negative.named)
    assert {"of", "with"} <= reordered_seen  # joined by a small word, or not
    assert {1, 2, 3} <= stood_in_places  # right after "a", between the attributes, after them
    assert stacked_sides == {True, False}  # the other shape before the shape, and after it
    assert not train_judge.names_object(scene, {"shape": "star", "colour": "blue"})  # one object must hold both
    assert train_judge.names_object(scene, {"shape": "square", "colour": "blue"})


def test_a_described_partial_text_begins_as_a_description_and_every_variant_is_a_sentence():
    rng = random.Random(0)
    frames = set()
    for _ in range(100):
        partial = train_judge.partial_text(STAR, ["seldom", "polygon"], rng, swap=False, absent="with a cross",
                                           stand_in="dark", described=True, stacked="cross")
        frames.add(partial.text.split(" a ")[0])
        variants = [v for v in (partial.fewer, partial.reordered, partial.added, partial.stood_in, partial.stacked)
                    if v is not None]
        assert all(v.startswith(partial.text.split(" a ")[0] + " a ") and v.endswith(".") for v in variants)
        assert partial.text.endswith(".") and partial.added == partial.text[:-1] + " with a cross."
    assert frames == set(train_judge.DESCRIPTION_FRAMES)  # every frame a description may begin with


def test_an_absent_thing_is_a_shape_the_scene_does_not_hold():
    rng = random.Random(0)
    scene = shapes.Scene((STAR, shapes.SceneObject("square", "blue", "large", "right")))
    added = [train_judge.absent_thing(scene, rng) for _ in range(200)]
    said = [a.split(" ") for a in added]
    assert {w[-1] for w in said} == set(shapes.SHAPES) - {"star", "square"}
    assert {" ".join(w[:2]) for w in said} == set(train_judge.ADDED_JOINERS)
    assert 0.35 < sum(len(w) == 4 and w[2] in shapes.COLOURS for w in said) / len(said) < 0.65  # a colour, half the time


def test_outside_words_leave_the_grammar_out_and_keep_a_tenth_apart_for_evaluation():
    tokenizer = train_judge.tokenizer_for(32)
    grammar = {"star", "red", "small", "picture", "shows"}
    negatives, held = train_judge.outside_words(tokenizer, grammar)
    assert not grammar & (set(negatives) | set(held)) and not set(negatives) & set(held)
    assert 0.07 < len(held) / (len(held) + len(negatives)) < 0.13 and "dog" in set(negatives) | set(held)


def test_a_few_steps_train_the_text_tower_only_and_save_a_judge_esper_can_load(tiny_clip_dir, tmp_path):
    metrics = train_judge.train(train_judge.parse_args([
        "--clip", str(tiny_clip_dir), "--out", str(tmp_path / "judge"), "--steps", "3", "--batch-size", "16",
        "--train-size", "64", "--eval-words", "20", "--workers", "1", "--order", "0.5", "--absent", "0.5", "--stand-in", "0.5",
        "--described", "0.5", "--stacked", "0.5", "--device", "cpu"]))
    before, _ = open_clip.create_model_from_pretrained(f"local-dir:{tiny_clip_dir}")
    judge = ClipJudge(f"local-dir:{tmp_path / 'judge'}")
    after = judge.model.state_dict()
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v.half(), after[k].half())}
    assert changed and all(k.startswith(train_judge.TEXT_TOWER) for k in changed)  # the image side untouched
    assert set(metrics["open_vocabulary"]) == {"shape", "colour"} and metrics["eval_words"] == 20
    assert 0 <= metrics["fuller_first"] <= 1 and 0 <= metrics["fuller_sentence_first"] <= 1 and metrics["fuller"] == 1.0
    assert 0 <= metrics["in_order_first"] <= 1 and metrics["order"] == 0.5
    assert 0 <= metrics["alone_first"] <= 1 and metrics["absent"] == 0.5
    assert 0 <= metrics["object_first"] <= 1 and metrics["stand_in"] == 0.5
    assert 0 <= metrics["shape_first_before"] <= 1 and 0 <= metrics["shape_first"] <= 1 and metrics["described"] == 0.5
    assert 0 <= metrics["single_shape_first"] <= 1 and metrics["stacked"] == 0.5
    assert json.loads((tmp_path / "judge" / "train_metrics.json").read_text())["steps"] == 3


def test_the_background_word_is_the_one_that_names_it_alone():
    words = {b: train_judge.background_word(shapes.Scene((STAR,), b)) for b in shapes.BACKGROUNDS}
    assert words == {"grey": "grey", "beige": "beige", "light blue": "light", "dark grey": "dark"}
    assert not set(words.values()) & set(shapes.COLOURS)  # never a word that could name the object's colour
