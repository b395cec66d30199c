"""Degenerate text, the known failure of RL from a similarity reward: repetition, and text no LM would write.

ESPER's reward can be raised by text that only CLIP likes (the same phrase again and again, lists of keywords);
both measures here are reported in its curves and in the evaluation, and the repetition also costs reward.
"""
from __future__ import annotations

import re

REPEAT_N = 3
"""n-grams of words and marks that count as repetition: trigrams (a bigram such as "on the" recurs in good
captions)."""
MAX_REPETITION = 0.2
"""Share of repeated trigrams above which text is degenerate. A right caption of a scene with two alike objects
repeats some ("a large orange square ... a large orange square": 0.11); the loops of an untrained mapping's
descriptions ("with a cityscape with a cityscape ...") repeat 0.4-0.7 of theirs."""
UNLIKELY_NLL = 6.0
"""Mean negative log-likelihood per token (nats) under the text-only LM above which text counts as unlikely. The
LM's own descriptions sit at 1-2.2; the supervised demo's terse captions, which it cannot guess without the
image, at 2.4-4.8; keyword salad far above."""


def words_of(text: str) -> list[str]:
    """The text's words, lower-cased, punctuation left out: what the measures of things named compare."""
    return re.findall(r"[a-z0-9']+", text.lower())


def words_and_marks(text: str) -> list[str]:
    """The text's words, lower-cased, and each mark that is not a space: what repetition counts, so that a loop of
    lines that hold no word (a line holding only "*", again and again, as ESPER's descriptions went on after their
    first sentence) repeats as a loop of words does. The replacement character and control characters, which byte
    tokens decoded apart leave, are no marks a reader sees."""
    return re.findall(r"[a-z0-9']+|[^\sa-z0-9'\x00-\x1f\ufffd]", text.lower())


def repetition(text: str, n: int = REPEAT_N) -> float:
    """Share of the text's n-grams of words and marks that already occurred earlier in it (0: none repeats)."""
    tokens = words_and_marks(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams)


def each_word_once(text: str) -> str:
    """The text without the words it already said (case and punctuation aside): what ESPER's judge reads. A CLIP
    scores a loop above the sentence it repeats (ESPER's judge, over 40 one-object scenes: "The image is a red
    red red red" 0.094, "The image is a red star." 0.079), so a loop must gain nothing from the judge: read once,
    it says what it said the first time, and its repetition still costs reward."""
    seen: set[str] = set()
    kept = []
    for piece in re.findall(r"\s*\S+|\s+", text):  # each word with the space before it: the rest stays as it was
        key = re.sub(r"[^a-z0-9]", "", piece.lower())
        if not key or key not in seen:
            kept.append(piece)
        seen.add(key)
    return "".join(kept)


FUNCTION_WORDS = frozenset(
    "a an the this that these those it its is are was were be been has have there here of in on at to with and or "
    "but for from by as into onto over under near next than".split())
"""Words that name nothing: said again, they repeat no thing."""


def repeated_words(text: str) -> int:
    """How many of the text's words that name something (not FUNCTION_WORDS) it already said: "The image is a
    triangle with a white triangle" names the triangle twice (1). A CLIP scores that above "The image is a white
    triangle" (ESPER's judge over 60 one-object scenes: 0.095 against 0.087, and 0.091 each word read once), and
    the evaluation counts two objects; a description of one thing should name it once."""
    words = [w for w in words_of(text) if w not in FUNCTION_WORDS]
    return len(words) - len(set(words))


SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def first_sentence(text: str) -> str:
    """The text up to its first sentence's end, the mark left out ("The image is a red star. It is a red star." ->
    "The image is a red star"): what ESPER's judge reads with `--first-sentence`. A small LM decoding greedily
    goes on after a good sentence and loops; read this way, going on adds nothing the judge rewards and its loop
    still costs its repetition, so ending there is what pays."""
    end = SENTENCE_END.search(text)
    return text[:end.start()] if end else text


def named_after_first_sentence(text: str) -> int:
    """How many words that name something (not FUNCTION_WORDS) the text says after its first sentence ends. Read by
    its first sentence, a description gains nothing from going on, yet what it goes on to say ("It is a symbol of
    the light of the Bible.") names more things than the image holds, which the evaluation counts."""
    end = SENTENCE_END.search(text)
    return sum(w not in FUNCTION_WORDS for w in words_of(text[end.end():])) if end else 0


def is_degenerate(text: str, nll: float | None = None, unlikely_nll: float = UNLIKELY_NLL) -> bool:
    """Repeats itself, or (when its NLL under the text-only LM is known) is text that LM finds very unlikely."""
    return repetition(text) > MAX_REPETITION or (nll is not None and nll > unlikely_nll)
