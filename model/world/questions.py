"""Questions about shapes-world scenes with exact answers: what LMEye's request module and IMMO's Reasoner
train on and are scored by.

Simple kinds, one look answers them:
    attribute    "What colour is the shape on the left?"               -> "red"    (or its shape, or its size)
    existence    "Is there a blue square?"                             -> "yes" / "no"
    count        "How many shapes are there?", "How many red things are there?", "How many circles ...?"
    location     "Where is the green triangle?"                        -> "left"
Compound kinds, whose decomposition into simple questions is known (`Question.steps`), for IMMO:
    compare      "Are the star and the square the same colour?"        -> "yes" / "no"
    count_where  "How many red things are to the left of the circle?"  -> "1"
    relation     "Is the circle to the left of the square?"            -> "yes" / "no"

Every answer is canonical (a colour, shape, size or position word, "yes"/"no", or a digit), and a free reply
is read back with `reply_answer` (synonyms, number words, text around the answer), so scoring is exact.
A question is a pure function of (split, index): the scene is `shapes.sample(split, index)`'s, the kind and
wording come from their own seeded stream. With `holdout`, a question never names a hold-out pair.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from model.world import shapes
from model.world.shapes import Scene, SceneObject

SIMPLE_KINDS = ("attribute", "existence", "count", "location")
COMPOUND_KINDS = ("compare", "count_where", "relation")
KINDS = SIMPLE_KINDS + COMPOUND_KINDS
ATTRIBUTES = ("colour", "shape", "size")
NUMBER_WORDS = {"no": "0", "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5"}
YES = {"yes", "yeah", "yep", "correct", "true"}
NO = {"no", "nope", "not", "false", "isn", "aren"}
_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                     "centre": "in the centre"}
_RELATIONS = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
              "above": ("above", "higher than"), "below": ("below", "lower than")}


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    """Canonical: a colour, shape, size or position word, "yes" / "no", or a digit."""
    kind: str
    steps: tuple[tuple[str, str], ...] = ()
    """For compound kinds: the simple questions that answer it, in order, with their answers."""

    @property
    def answer_type(self) -> str:
        """"yes/no", "number", or the attribute the answer names ("colour", "shape", "size", "position")."""
        if self.answer in ("yes", "no"):
            return "yes/no"
        if self.answer.isdigit():
            return "number"
        return shapes.word_meaning(self.answer)[0]


def reply_answer(reply: str, answer_type: str) -> str | None:
    """The canonical answer a free reply gives, of the type asked for: its first word of that type."""
    for word in re.findall(r"[a-z0-9]+", reply.lower().replace("gray", "grey")):
        if answer_type == "yes/no" and (word in YES or word in NO):
            return "yes" if word in YES else "no"
        if answer_type == "number" and (word.isdigit() or word in NUMBER_WORDS):
            return str(int(word)) if word.isdigit() else NUMBER_WORDS[word]
        meaning = shapes.word_meaning(word)
        if meaning is not None and meaning[0] == answer_type:
            return meaning[1]
    return None


def is_right(reply: str, question: Question) -> bool:
    return reply_answer(reply, question.answer_type) == question.answer


def reply_text(answer: str) -> str:
    """How the model says an answer: "Red.", "Yes.", "2.", "On the left." (positions as the captions say them;
    `reply_answer` reads each back)."""
    text = _POSITION_PHRASES.get(answer, answer)
    return text[0].upper() + text[1:] + "."


# --- the scene, as questions see it ---------------------------------------------------------------

def relation_holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether `a` is `relation` ("left", "right", "above", "below") of `b`, by their positions' centres."""
    (ax, ay), (bx, by) = shapes.centre_of(a.position), shapes.centre_of(b.position)
    return {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[relation]


def reference(scene: Scene, obj: SceneObject) -> str | None:
    """The shortest name that picks `obj` out of the scene ("the star", "the red star", "the small red star"),
    or None when only its position would."""
    for fields in (("shape",), ("colour", "shape"), ("size", "colour", "shape")):
        matches = [o for o in scene.objects if all(getattr(o, f) == getattr(obj, f) for f in fields)]
        if matches == [obj]:
            return "the " + " ".join(getattr(obj, f) for f in fields)
    return None


def _plural(shape: str) -> str:
    return shape + ("es" if shape == "cross" else "s")


# --- simple questions -----------------------------------------------------------------------------

def attribute(scene: Scene, rng: random.Random, holdout: bool) -> Question:
    obj = rng.choice(scene.objects)
    field = rng.choice(ATTRIBUTES)
    where = _POSITION_PHRASES[obj.position]
    text = rng.choice({
        "colour": (f"What colour is the shape {where}?", f"What is the colour of the object {where}?",
                   f"Which colour does the shape {where} have?"),
        "shape": (f"What shape is {where}?", f"What kind of shape is {where}?", f"Which shape do you see {where}?"),
        "size": (f"Is the shape {where} small or large?", f"How big is the object {where}?",
                 f"What size is the shape {where}?"),
    }[field])
    return Question(text, getattr(obj, field), "attribute")


def existence(scene: Scene, rng: random.Random, holdout: bool) -> Question:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:  # absent; half the time one attribute matches an object, so a look at one word is not enough
        colour, shape = rng.choice(sorted(present))
        while (colour, shape) in present or (holdout and (shape, colour) in shapes.HOLDOUT_PAIRS):
            colour = rng.choice(tuple(shapes.COLOURS)) if rng.random() < 0.5 else colour
            shape = rng.choice(shapes.SHAPES) if rng.random() < 0.5 else shape
    text = rng.choice((f"Is there a {colour} {shape}?", f"Do you see a {colour} {shape}?",
                       f"Is there a {colour} {shape} in the picture?", f"Does the image contain a {colour} {shape}?"))
    return Question(text, "yes" if (colour, shape) in present else "no", "existence")


def count(scene: Scene, rng: random.Random, holdout: bool) -> Question:
    which = rng.choice(("all", "colour", "shape"))
    if which == "all":
        text = rng.choice(("How many shapes are there?", "How many objects are in the picture?",
                           "How many things do you see?"))
        return Question(text, str(len(scene.objects)), "count")
    if which == "colour":
        colour = rng.choice([o.colour for o in scene.objects] + list(shapes.COLOURS))
        text = rng.choice((f"How many {colour} things are there?", f"How many {colour} shapes do you see?",
                           f"Count the {colour} objects."))
        return Question(text, str(sum(o.colour == colour for o in scene.objects)), "count")
    shape = rng.choice([o.shape for o in scene.objects] + list(shapes.SHAPES))
    text = rng.choice((f"How many {_plural(shape)} are there?", f"How many {_plural(shape)} do you see?",
                       f"Count the {_plural(shape)}."))
    return Question(text, str(sum(o.shape == shape for o in scene.objects)), "count")


def location(scene: Scene, rng: random.Random, holdout: bool) -> Question | None:
    named = [(o, reference(scene, o)) for o in scene.objects]
    named = [(o, name) for o, name in named if name is not None]
    if not named:
        return None
    obj, name = rng.choice(named)
    text = rng.choice((f"Where is {name}?", f"Where in the picture is {name}?", f"In which part of the image is {name}?"))
    return Question(text, obj.position, "location")


# --- compound questions ---------------------------------------------------------------------------

def _where(name: str) -> str:
    return f"Where is {name}?"


def compare(scene: Scene, rng: random.Random, holdout: bool) -> Question | None:
    named = [(o, reference(scene, o)) for o in scene.objects if reference(scene, o) is not None]
    if len(named) < 2:
        return None
    (a, name_a), (b, name_b) = rng.sample(named, 2)
    field = rng.choice(("colour", "size"))  # objects are named by their shapes: "same shape?" would be read off
    text = rng.choice((f"Are {name_a} and {name_b} the same {field}?", f"Do {name_a} and {name_b} have the same {field}?",
                       f"Is {name_a} the same {field} as {name_b}?"))
    ask = {"colour": "What colour is {}?", "size": "Is {} small or large?"}[field]
    steps = ((ask.format(name_a), getattr(a, field)), (ask.format(name_b), getattr(b, field)))
    return Question(text, "yes" if getattr(a, field) == getattr(b, field) else "no", "compare", steps)


def count_where(scene: Scene, rng: random.Random, holdout: bool) -> Question | None:
    named = [(o, reference(scene, o)) for o in scene.objects if reference(scene, o) is not None]
    if not named or len(scene.objects) < 2:
        return None
    anchor, name = rng.choice(named)
    others = [o for o in scene.objects if o is not anchor]
    colour = rng.choice([o.colour for o in others] + list(shapes.COLOURS))
    relation = rng.choice(tuple(_RELATIONS))
    phrase = rng.choice(_RELATIONS[relation])
    matching = [o for o in others if o.colour == colour]
    n = sum(relation_holds(relation, o, anchor) for o in matching)
    text = rng.choice((f"How many {colour} things are {phrase} {name}?", f"How many {colour} shapes are {phrase} {name}?"))
    where_colour = " and ".join(_POSITION_PHRASES[o.position] for o in matching) or "nowhere"
    steps = ((_where(name), anchor.position), (f"Where are the {colour} things?", where_colour))
    return Question(text, str(n), "count_where", steps)


def relation(scene: Scene, rng: random.Random, holdout: bool) -> Question | None:
    named = [(o, reference(scene, o)) for o in scene.objects if reference(scene, o) is not None]
    if len(named) < 2:
        return None
    (a, name_a), (b, name_b) = rng.sample(named, 2)
    relation_name = rng.choice(tuple(_RELATIONS))
    text = f"Is {name_a} {rng.choice(_RELATIONS[relation_name])} {name_b}?"
    steps = ((_where(name_a), a.position), (_where(name_b), b.position))
    return Question(text, "yes" if relation_holds(relation_name, a, b) else "no", "relation", steps)


ASKERS = {"attribute": attribute, "existence": existence, "count": count, "location": location,
          "compare": compare, "count_where": count_where, "relation": relation}


def ask(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = KINDS, holdout: bool = False) -> Question:
    """A question of one of `kinds` about `scene` (kinds the scene cannot support are skipped: a comparison
    needs two objects that can be named apart)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be some of {KINDS}, got {kinds}")
    order = list(kinds)
    rng.shuffle(order)
    for kind in order:
        question = ASKERS[kind](scene, rng, holdout)
        if question is not None:
            return question
    return attribute(scene, rng, holdout)  # any scene supports it


def question(split: str, index: int, image_size: int = 128, holdout: bool = False,
             kinds: tuple[str, ...] = KINDS) -> tuple[shapes.Sample, Question]:
    """Item `index` of a split and a question about it: a pure function of its arguments."""
    sample = shapes.sample(split, index, image_size, holdout)
    rng = random.Random(f"question:{split}:{index}:{','.join(kinds)}")
    # the hold-out split's scenes are made of hold-out pairs: asking about them there is the point
    return sample, ask(sample.scene, rng, kinds, holdout and split != "holdout")
