"""Shapes-world questions: exact answers, varied wording, readable replies, splits and hold-out respected."""
import random
from collections import Counter

import pytest

from model.training.evaluate_questions import first_questions
from model.world import shapes
from model.world.questions import (COMPOUND_KINDS, KINDS, SIMPLE_KINDS, Question, answer_on, ask,
                                   implied_answer, is_right, question, reference, relation_holds, reply_answer)
from model.world.shapes import Scene, SceneObject

RED_CIRCLE = SceneObject("circle", "red", "small", "left")
BLUE_SQUARE = SceneObject("square", "blue", "large", "centre")
RED_STAR = SceneObject("star", "red", "large", "right")
SCENE = Scene((RED_CIRCLE, BLUE_SQUARE, RED_STAR), "grey")


def asked(kind, scene=SCENE, n=200):
    """Questions of one kind about a scene, over many wordings."""
    return [ask(scene, random.Random(i), (kind,)) for i in range(n)]


def test_answers_follow_from_the_scene():
    for q in asked("compare"):
        assert q.answer in ("yes", "no") and len(q.steps) == 2
        field = next(f for f in ("colour", "size") if f in q.text)
        named = sorted((o for o in SCENE.objects if reference(SCENE, o) in q.text),
                       key=lambda o: q.text.index(reference(SCENE, o)))
        assert q.answer == ("yes" if getattr(named[0], field) == getattr(named[1], field) else "no"), q
        assert [answer for _, answer in q.steps] == [getattr(named[0], field), getattr(named[1], field)]
    for q in asked("location"):
        obj = next(o for o in SCENE.objects if reference(SCENE, o) in q.text)
        assert q.answer == obj.position
    for q in asked("count_where"):
        if q.text.startswith("How many red") and q.text.endswith("the square?"):
            assert q.answer == ("1" if any(w in q.text for w in ("left", "right")) else "0"), q
    assert relation_holds("left", RED_CIRCLE, BLUE_SQUARE) and not relation_holds("above", RED_CIRCLE, BLUE_SQUARE)
    assert {q.answer for q in asked("existence")} == {"yes", "no"}


def test_the_binding_drill_asks_for_one_objects_colour_and_shape_and_is_not_a_kind():
    pairs = {(o.colour, o.shape) for o in SCENE.objects}
    drilled = asked("binding")
    assert {q.answer for q in drilled} == {"yes", "no"} and {q.kind for q in drilled} == {"binding"}
    for q in drilled:
        words = q.text.rstrip("?").split()
        colour = next(w for w in words if w in shapes.COLOURS)
        shape = next(w for w in words if w in shapes.SHAPES)
        assert q.answer == ("yes" if (colour, shape) in pairs else "no"), q
        assert colour in {o.colour for o in SCENE.objects} and shape in {o.shape for o in SCENE.objects}, \
            "an absent pair is a colour and a shape the scene has, on two objects"
    alone = Scene((RED_CIRCLE,), "grey")
    assert all(ask(alone, random.Random(i), ("binding",)).kind == "attribute" for i in range(20)), "nothing to mix"
    assert "binding" not in KINDS


def test_a_simple_question_is_answered_on_any_scene_that_says_its_answer():
    for i in range(300):
        sample, q = question("train", i, 64, True, SIMPLE_KINDS)
        assert answer_on(q.text, q.kind, q.answer_type, sample.scene) == q.answer, q
    assert answer_on("What colour is the shape on the left?", "attribute", "colour", SCENE) == "red"
    assert answer_on("What colour is the star?", "attribute", "colour", Scene((BLUE_SQUARE,), "grey")) is None
    assert answer_on("Where is the red thing?", "location", "position", SCENE) is None, "two red things"
    assert answer_on("How many red shapes are there?", "count", "number", SCENE) == "2"
    assert answer_on("Is there a blue star?", "existence", "yes/no", SCENE) == "no"


def test_objects_are_named_by_what_tells_them_apart():
    two_circles = Scene((RED_CIRCLE, SceneObject("circle", "blue", "small", "right")))
    assert reference(SCENE, RED_CIRCLE) == "the circle"
    assert reference(two_circles, RED_CIRCLE) == "the red circle"
    twins = Scene((RED_CIRCLE, SceneObject("circle", "red", "small", "right")))
    assert reference(twins, RED_CIRCLE) is None
    fallback = [ask(twins, random.Random(i), ("location", "compare")) for i in range(20)]
    assert all(q.kind == "attribute" for q in fallback), "when no object can be named apart, the question every " \
                                                          "scene supports"


@pytest.mark.parametrize("reply, answer_type, expected", [
    ("Yes, there is one.", "yes/no", "yes"), ("There isn't.", "yes/no", "no"), ("No.", "yes/no", "no"),
    ("There are two of them.", "number", "2"), ("3", "number", "3"), ("None.", "number", "0"),
    ("It is in the middle.", "position", "centre"), ("It's big.", "size", "large"),
    ("The shape on the left is violet.", "colour", "purple"), ("Circles!", "shape", "circle"),
    ("I cannot tell.", "colour", None),
])
def test_free_replies_read_back_to_canonical_answers(reply, answer_type, expected):
    assert reply_answer(reply, answer_type) == expected


def test_scoring_reads_the_answer_of_the_type_asked_for():
    q = Question("What colour is the shape on the left?", "red", "attribute")
    assert q.answer_type == "colour"
    assert is_right("The small circle on the left is red.", q)
    assert not is_right("It is blue, not red.", q)
    assert Question("How many stars?", "2", "count").answer_type == "number"


def test_questions_are_a_pure_function_of_the_split_and_index_and_cover_every_kind():
    assert question("train", 7)[1] == question("train", 7)[1]
    found = [question("test", i, image_size=32)[1] for i in range(300)]
    kinds = Counter(q.kind for q in found)
    assert set(kinds) == set(KINDS) and min(kinds.values()) >= 15, kinds
    assert len({q.text for q in found}) > 200, "varied wording"
    assert all(q.steps for q in found if q.kind in COMPOUND_KINDS)
    assert not any(q.steps for q in found if q.kind in SIMPLE_KINDS)
    simple = [question("val", i, image_size=32, kinds=SIMPLE_KINDS)[1] for i in range(50)]
    assert {q.kind for q in simple} <= set(SIMPLE_KINDS)


def test_with_holdout_no_question_names_a_held_out_pair():
    held = [f"{colour} {shape}" for shape, colour in shapes.HOLDOUT_PAIRS]
    for i in range(400):
        sample, q = question("train", i, image_size=32, holdout=True, kinds=("existence", "count", "binding"))
        assert not any(pair in q.text for pair in held), q.text
    texts = [question("holdout", i, image_size=32, holdout=True, kinds=("existence",))[1].text for i in range(100)]
    assert any(pair in t for t in texts for pair in held), "the hold-out split asks about its own pairs"


def test_a_count_or_existence_reason_checks_each_thing_named_against_what_was_asked():
    stars = Scene((SceneObject("star", "blue", "large", "top"), RED_CIRCLE, SceneObject("star", "blue", "small", "bottom")))
    q = next(q for i in range(400) if "star" in (q := ask(stars, random.Random(i), ("count",))).text
             and not {"blue", "large", "small"} & set(q.text.lower().split()))  # "How many stars ...?"
    described = "A large blue star at the top, a small red circle on the left and a small blue star at the bottom."
    assert implied_answer(q, [described]) == (
        "2", "The Observer named a large blue star (yes), a small red circle (not a star) and a small blue star (yes)."), \
        "in the order the description names them"
    assert implied_answer(q, ["A large yellow circle."]) == ("0", "The Observer named a large yellow circle (not a star).")
    blue_circle = Question("Is there a blue circle?", "no", "existence")
    assert implied_answer(blue_circle, [described]) == (
        "no", "The Observer named a large blue star (not a circle), a small red circle (not blue) and a small blue star "
              "(not a circle)."), "a thing that shares one attribute with what was asked is checked on the other"
    everything = next(q for i in range(400) if (q := ask(stars, random.Random(i), ("count",))).answer == "3")
    assert implied_answer(everything, [described]) == (
        "3", "The Observer named a large blue star, a small red circle and a small blue star."), "nothing to check"


def test_a_relation_reason_compares_the_places_columns_or_rows_and_a_conditional_count_checks_each_place():
    relation = Question("Is the circle left of the square?", "yes", "relation",
                        (("Where is the circle?", "left"), ("Where is the square?", "centre")), "left")
    assert implied_answer(relation, ["On the left.", "In the centre."]) == (
        "yes", "the circle is on the left and the square is in the centre: columns 1 and 2, so the circle is to the left "
               "of the square.")
    assert implied_answer(relation, ["On the right.", "In the centre."]) == (
        "no", "the circle is on the right and the square is in the centre: columns 3 and 2, so the circle is to the "
              "right of the square, not to the left of it."), "the direction the columns give, then the one asked"
    assert implied_answer(relation, ["At the top.", "In the centre."]) == (
        "no", "the circle is at the top and the square is in the centre: columns 2 and 2, so the circle is in the same "
              "column as the square, not to the left of it.")
    above = Question("Is the circle higher than the square?", "no", "relation",
                     (("Where is the circle?", "bottom"), ("Where is the square?", "left")), "above")
    assert implied_answer(above, ["At the bottom.", "On the left."]) == (
        "no", "the circle is at the bottom and the square is on the left: rows 3 and 2, so the circle is below the "
              "square, not above it.")
    counted = Question("How many red things are below the square?", "1", "count_where",
                       (("Where is the square?", "centre"), ("Where are the red things?", "left and bottom")), "count:below")
    assert implied_answer(counted, ["In the centre.", "On the left and at the bottom."]) == (
        "1", "the square is in the centre (row 2); the red things are on the left (row 2: not below it) and at the bottom "
             "(row 3: below it).")


def test_a_comparison_reason_names_both_values_and_says_whether_they_are_the_same():
    same = Question("Are the star and the circle the same colour?", "no", "compare",
                    (("What colour is the star?", "blue"), ("What colour is the circle?", "red")), "same")
    assert implied_answer(same, ["Blue.", "Red."]) == (
        "no", "the star is blue and the circle is red, so the star and the circle are not the same colour.")
    assert implied_answer(same, ["Red.", "A small red circle on the left."]) == (
        "yes", "the star is red and the circle is red, so the star and the circle are the same colour."), \
        "the conclusion is in the reason, which the answer is read off"


def test_an_attribute_or_location_reason_says_the_answer_it_read():
    star = SceneObject("star", "blue", "large", "top")
    scene = Scene((star, RED_CIRCLE))
    described = "A large blue star at the top and a small red circle on the left."
    said = {}
    for i in range(400):
        q = ask(scene, random.Random(i), ("attribute", "location"))
        said[q.text] = implied_answer(q, [described])
    assert said["What colour is the shape at the top?"] == ("blue", "The Observer said the shape at the top is blue.")
    assert said["Which shape do you see on the left?"] == ("circle",
                                                           "The Observer said the shape on the left is a circle.")
    assert said["How big is the object at the top?"] == ("large", "The Observer said the shape at the top is large.")
    assert said["In which part of the image is the star?"] == ("top", "The Observer said the star is at the top.")
    asked = next(q for i in range(400) if (q := ask(scene, random.Random(i), ("location",))).text == "Where is the circle?")
    assert implied_answer(asked, ["On the left."]) == ("left", "The Observer said the circle is on the left."), \
        "a direct answer is read the same way"


def test_the_evaluation_asks_only_questions_of_the_kind_it_scores():
    for kind in ("binding", "compare"):
        asked = first_questions("test", kind, 30, 32)
        assert len(asked) == 30 and {q.kind for _, q in asked} == {kind}, "a scene that cannot support it is skipped"
