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
A drill, trained on (`train --ask-more binding`) and measured, but not among KINDS, so that the kinds' questions stay
as they were:
    binding      "Is there a red square?" with a red circle and a blue square -> "no"; or one object's own pair

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
DRILLS = ("binding",)
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
    combine: str = ""
    """For compound kinds, how the steps' answers make the answer (`implied_answer`): "same" (compare), a relation
    ("left", "right", "above", "below": is the first step's position so from the second's?), or "count:" and a
    relation (how many of the second step's positions are so from the first's)."""

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

def positions_relate(relation: str, a: str, b: str) -> bool:
    """Whether position `a` is `relation` ("left", "right", "above", "below") of position `b`, by their centres."""
    (ax, ay), (bx, by) = shapes.centre_of(a), shapes.centre_of(b)
    return {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[relation]


def relation_holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether `a` is `relation` of `b` (`positions_relate`)."""
    return positions_relate(relation, a.position, b.position)


_AXES = {"left": "column", "right": "column", "above": "row", "below": "row"}


def _grid_index(relation: str, position: str) -> int:
    """The column (1-3, left to right) or the row (1-3, top to bottom) of a position, whichever a relation
    compares: ("left", "centre") -> 2, the centre's column. A reason says it before the comparison, so that a
    Reasoner compares two digits rather than recalls which of 25 pairs of places is left of which (without it, 5
    of 20 relation questions of the test split gave both places right and the comparison wrong)."""
    axis = 0 if _AXES[relation] == "column" else 1
    lines = sorted({shapes.centre_of(p)[axis] for p in shapes.POSITIONS})
    return 1 + lines.index(shapes.centre_of(position)[axis])


def _order_phrase(axis: str, i: int, j: int) -> str:
    """How column (or row) i lies from column (row) j: "to the left of" (1, 2), "below" (3, 2), "in the same column
    as" (2, 2). A relation's reason says it before whether it is the relation asked, so that a Reasoner turns two
    digits into a direction the same way whatever was asked, then matches it against the question's words: told
    the true places of 200 test relations, a Reasoner trained so concluded all of them right, where one whose reason
    made one choice of both ("so the circle is not to the left of the square") was wrong on 35."""
    if i == j:
        return f"in the same {axis} as"
    first, second = ("left", "right") if axis == "column" else ("above", "below")
    return _RELATIONS[first if i < j else second][0]


def reply_positions(reply: str) -> list[str]:
    """Every position a free reply names, in order ("On the left and at the top." -> ["left", "top"])."""
    words = re.findall(r"[a-z]+", reply.lower())
    return [m[1] for m in map(shapes.word_meaning, words) if m is not None and m[0] == "position"]


def _named(step: str) -> str:
    """The thing a step or a location question asks about, its last "the ...": "What colour is the star?" -> "the
    star", "Where are the red things?" -> "the red things", "In which part of the image is the red star?" -> "the
    red star"."""
    return re.search(r".*\b(the [a-z ]+?)(?: small or large)?\?$", step).group(1)


def _targets(text: str) -> dict[str, str]:
    """The attributes a question's words name: "How many red things are left of the circle?" ->
    {"colour": "red", "position": "left", "shape": "circle"} (later words of one attribute win)."""
    return dict(m for m in map(shapes.word_meaning, re.findall(r"[a-z]+", text.lower())) if m is not None)


def _matching(scene: Scene, targets: dict[str, str]) -> list[SceneObject]:
    """The objects of a (parsed) scene that are what `targets` name; a lone object that leaves a target unsaid
    ("Circle." for "Which shape is at the top?") is taken to be it."""
    found = [o for o in scene.objects if all(getattr(o, field) == value for field, value in targets.items())]
    if not found and len(scene.objects) == 1:
        found = [o for o in scene.objects if all(getattr(o, f) in (v, None) for f, v in targets.items())]
    return found


def read_step(step: str, reply: str, answer_type: str) -> list[str] | None:
    """What a free reply to a step says of the thing the step names, of `answer_type` ("colour", "size",
    "position"): its value, or every position of "the red things" ([] for none); None where the reply does not
    say. A reply that describes the scene ("a red cross at the top and a green star ...") is read object by
    object, so the star's colour is the star's, not the first colour named."""
    many = step.rstrip("?").endswith("things")
    scene = shapes.parse_caption(reply)
    if scene is not None:
        found = [getattr(o, answer_type) for o in _matching(scene, _targets(_named(step)))]
        if many:
            return [value for value in found if value]
        return found[:1] if found and found[0] else None
    if many:
        named = reply_positions(reply)
        return named if named or re.search(r"\b(nowhere|none|no)\b", reply.lower()) else None
    value = reply_answer(reply, answer_type)
    return None if value is None else [value]


def read_heard(step: str, replies: list[str], n: int, answer_type: str) -> list[str] | None:
    """`read_step` of step `n`'s own reply, or, where it does not say, of a description heard in answer to another
    step: asked "Is the star small or large?" the Observer may echo the question, having described the scene,
    star and all, when asked about the cross. A direct answer ("Small.") belongs to its own step only."""
    own = read_step(step, replies[n], answer_type)
    if own is not None:
        return own
    descriptions = [reply for other, reply in enumerate(replies) if other != n and shapes.parse_caption(reply)]
    return next((found for reply in descriptions if (found := read_step(step, reply, answer_type)) is not None), None)


def implied_answer(question: Question, replies: list[str]) -> tuple[str, str] | None:
    """What free replies imply, with a one-line reason from them, or None where they do not say what was asked:
    for a compound question, the replies to its steps, in order (`read_heard`); for a simple one, the reply to the
    question itself (a description of the scene is read for it: the things it names counted, found, or their
    attribute told). True replies imply the true answer; an Observer's imply what a Reasoner that trusts it
    should conclude."""
    if not question.steps:
        return _read_simple(question, *replies)
    if len(replies) != len(question.steps):
        raise ValueError(f"{len(question.steps)} steps, {len(replies)} replies")
    (step_a, _), (step_b, _) = question.steps
    name_a, name_b = _named(step_a), _named(step_b)
    if question.combine == "same":
        field = "colour" if "colour" in step_a else "size"
        a, b = read_heard(step_a, replies, 0, field), read_heard(step_b, replies, 1, field)
        if a is None or b is None:
            return None
        same = a == b
        return ("yes" if same else "no", f"{name_a} is {a[0]} and {name_b} is {b[0]}, so {name_a} and {name_b} are "
                f"{'' if same else 'not '}the same {field}.")
    if question.combine.startswith("count:"):
        relation = question.combine.removeprefix("count:")
        anchor, others = read_heard(step_a, replies, 0, "position"), read_heard(step_b, replies, 1, "position")
        if anchor is None or others is None:
            return None
        holds = [positions_relate(relation, p, anchor[0]) for p in others]
        axis = _AXES[relation]
        where = " and ".join(f"{_POSITION_PHRASES[p]} ({axis} {_grid_index(relation, p)}: {'' if ok else 'not '}"
                             f"{_RELATIONS[relation][0]} it)" for p, ok in zip(others, holds)) or "nowhere"
        return (str(sum(holds)), f"{name_a} is {_POSITION_PHRASES[anchor[0]]} ({axis} {_grid_index(relation, anchor[0])}); "
                                 f"{name_b} are {where}.")
    if question.combine in _RELATIONS:
        a, b = read_heard(step_a, replies, 0, "position"), read_heard(step_b, replies, 1, "position")
        if a is None or b is None:
            return None
        relation = question.combine
        holds = positions_relate(relation, a[0], b[0])
        axis, i, j = _AXES[relation], _grid_index(relation, a[0]), _grid_index(relation, b[0])
        not_asked = "" if holds else f", not {_RELATIONS[relation][0]} it"
        return ("yes" if holds else "no", f"{name_a} is {_POSITION_PHRASES[a[0]]} and {name_b} is "
                f"{_POSITION_PHRASES[b[0]]}: {axis}s {i} and {j}, so {name_a} is {_order_phrase(axis, i, j)} {name_b}"
                f"{not_asked}.")
    raise ValueError(f"a {question.kind} question has no steps to combine")


def _read_simple(question: Question, reply: str) -> tuple[str, str] | None:
    scene = shapes.parse_caption(reply)
    if scene is None or question.answer_type == "yes/no" and reply_answer(reply, "yes/no") is not None:
        answer = reply_answer(reply, question.answer_type)  # a direct answer ("Yes.", "2.", "Red.")
        return None if answer is None else (answer, _said(question, answer))
    answer = answer_on(question.text, question.kind, question.answer_type, scene)
    if question.kind in ("count", "existence"):
        return answer, _things_checked(shapes.described_objects(reply), _targets(question.text))
    return None if answer is None else (answer, _said(question, answer))


def _said(question: Question, answer: str) -> str:
    """The reason of an attribute or a location answer, the answer in it ("The Observer said the shape on the left
    is red.", "... the green triangle is at the top."): a Reasoner then answers by copying the word it has just
    written, where "The Observer said so." left it to find that word again in a description it read (the
    simple questions the demo's Reasoner got wrong with a right reason). A count or an existence question answered
    directly ("2.", "Yes.") keeps "The Observer said so."."""
    if question.kind == "location":
        return f"The Observer said {_named(question.text)} is {_POSITION_PHRASES[answer]}."
    if question.kind == "attribute":
        where = _POSITION_PHRASES[_targets(question.text)["position"]]
        return f"The Observer said the shape {where} is {'a ' + answer if question.answer_type == 'shape' else answer}."
    return "The Observer said so."


def _things_checked(described: list[SceneObject], targets: dict[str, str]) -> str:
    """The reason of a count or an existence answer: every thing a description names, in its order, each checked
    against what was asked ("The Observer named a large blue star (yes), a small red circle (not a star) and a
    small blue star (yes)."; without a condition, "How many shapes are there?", the things alone). A Reasoner then
    answers by counting the "yes" it has just written, each decided next to the thing it checks, having copied
    the things in the order it read them; when it listed only the things that are what was asked, it listed some
    that share a colour or a shape with it (5 of 20 existence questions of the test split)."""
    matches = _matching(Scene(tuple(described)), targets)

    def checked(o: SceneObject) -> str:
        if o in matches:
            return "yes"
        field = next(f for f in ("colour", "shape", "size") if f in targets and getattr(o, f) != targets[f])
        return f"not {'a ' if field == 'shape' else ''}{targets[field]}"

    phrases = ["a " + " ".join(v for v in (o.size, o.colour, o.shape) if v)
               + (f" ({checked(o)})" if targets else "") for o in described]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"The Observer named {listed}."


def answer_on(text: str, kind: str, answer_type: str, scene: Scene) -> str | None:
    """The answer a simple question (of `kind`, answering an `answer_type`) has on a scene, which may be a parsed
    description (fields None where it leaves them unsaid): None where an attribute or a place is asked of
    nothing there, of two things, or of something whose answer it does not say."""
    targets = _targets(text)
    if kind == "attribute":
        targets.pop(answer_type, None)
    matches = _matching(scene, targets)
    if kind == "count":
        return str(len(matches))
    if kind == "existence":
        return "yes" if matches else "no"
    return getattr(matches[0], answer_type) if len(matches) == 1 else None


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
    return Question(_is_there(colour, shape, rng), "yes" if (colour, shape) in present else "no", "existence")


def _is_there(colour: str, shape: str, rng: random.Random) -> str:
    return rng.choice((f"Is there a {colour} {shape}?", f"Do you see a {colour} {shape}?",
                       f"Is there a {colour} {shape} in the picture?", f"Does the image contain a {colour} {shape}?"))


def binding(scene: Scene, rng: random.Random, holdout: bool) -> Question | None:
    """An existence question answered only by reading a colour and a shape off the same object: half the time the
    colour of one object with the shape of another (absent), half one object's own pair. `existence` asks this way
    for about 1 in 13 of its absent objects, and the request module before word decisions said "Yes." to all 11 of
    300 test questions that did (docs/lmeye.md, "Binding")."""
    present = {(o.colour, o.shape) for o in scene.objects}
    held = {(colour, shape) for shape, colour in shapes.HOLDOUT_PAIRS} if holdout else set()
    crossed = sorted({(a.colour, b.shape) for a in scene.objects for b in scene.objects} - present - held)
    if not crossed:  # one object, or objects that share their colour or their shape
        return None
    colour, shape = rng.choice(crossed) if rng.random() < 0.5 else rng.choice(sorted(present))
    return Question(_is_there(colour, shape, rng), "yes" if (colour, shape) in present else "no", "binding")


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
    return Question(text, "yes" if getattr(a, field) == getattr(b, field) else "no", "compare", steps, "same")


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
    return Question(text, str(n), "count_where", steps, f"count:{relation}")


def relation(scene: Scene, rng: random.Random, holdout: bool) -> Question | None:
    named = [(o, reference(scene, o)) for o in scene.objects if reference(scene, o) is not None]
    if len(named) < 2:
        return None
    (a, name_a), (b, name_b) = rng.sample(named, 2)
    relation_name = rng.choice(tuple(_RELATIONS))
    text = f"Is {name_a} {rng.choice(_RELATIONS[relation_name])} {name_b}?"
    steps = ((_where(name_a), a.position), (_where(name_b), b.position))
    return Question(text, "yes" if relation_holds(relation_name, a, b) else "no", "relation", steps, relation_name)


ASKERS = {"attribute": attribute, "existence": existence, "count": count, "location": location,
          "compare": compare, "count_where": count_where, "relation": relation, "binding": binding}


def ask(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = KINDS, holdout: bool = False) -> Question:
    """A question of one of `kinds` (or drills) about `scene`, each as likely as the times it is listed (kinds the
    scene cannot support are skipped: a comparison needs two objects that can be named apart)."""
    unknown = set(kinds) - set(ASKERS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be some of {tuple(ASKERS)}, got {kinds}")
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
