"""IMMO's inner monologue: a text-only Reasoner asks the Observer about the image, then answers.

The Reasoner is the LM with its LoRA adapter on (`model/reasoner.py`); it never sees pixels. It reads the
question (and the conversation's text) and writes one line at a time into its transcript:

    Q1: What colour is the star?          <- Reasoner (adapter on)
    A1: Red.                              <- Observer: the grounded LM, adapter off, on the image
    Q2: What colour is the square?
    A2: Blue.
    Reason: the star is red and the square is blue, so the star and the square are not the same colour.
    Final answer: No.

The reason comes before the answer, so that the answer is read off what the Reasoner has just written (a small
LM that answers first and explains after often explains right and answers wrong). After `max_rounds` questions
the loop writes `Reason:` itself, and after the reason `Final answer:`. A Reasoner may also answer at once (a line
opening "F"; one trained to answer before its reason then gives the reason on the next line). A monologue that
goes wrong (a line that is neither a question nor the reason, a question asked twice, an empty answer, a line
that never ends) falls back to the Observer answering the user's question directly, and says so:
`Monologue.fallback` names why. `think` streams it all as events: `Thought`s for the lines as they are written,
then the final answer and its reason as `Text` ("No. The star is red and the square is blue, so ...", with
`[RET]` retrieving as in any reply). Training writes the same transcripts (`transcript_pieces`), so what the Reasoner
learns is exactly what it is asked to continue here.
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from PIL import Image
from transformers import DynamicCache

from model.generate import (Cancel, Done, Event, GenerationSettings, Retrieved, SearchFn, Text, Thought,
                            decode_alone, logits_warpers, sample, scale_ret_logit, stream_reply)
from model.grounded import GroundedLM
from model.prompt import Turn, looked_at
from model.serving import DecodeEngine, Waiting

SYSTEM = "Ask the Observer, who sees the image, then answer."
"""Short: every token of it is in every training row."""
FINAL = "Final answer:"
REASON = "Reason:"
OBSERVER_TOKENS = 40
"""Where an Observer's answer is cut. IMMO's Observer stops at 25 tokens; at 24, 19 of 60 of the demo's answers
in its evaluation lost their end (a three-object scene described whole runs past it), and with it the third
object."""
OBSERVER_LOOKS = False
"""Whether the Observer looks first (LMEye) where its model has a request module. The Reasoner reads the answers it
was trained on: the demo's was trained on an Observer without one, which describes what it sees; asked through the
module, the same Observer answers in a word ("Red.", 97% of simple questions right against 30%), and the Reasoner
misread its answers in 25-32% of compound questions against 2-3%, and got 67% of them right against 95% (README:
IMMO). Training (`training/monologue.py`) and evaluation ask through this too: a Reasoner trained on the looking
Observer's answers would turn it on."""
LINE_TOKENS = 96
"""A Reasoner's line that has not ended by then never will: the monologue has gone wrong. The longest reason of
6,000 training monologues, a conditional count that checks three places, is 62 tokens."""
CONTEXT_TURNS = 4
"""Earlier turns whose text the Reasoner reads (the conversation's images it never sees)."""
_QUESTION = re.compile(r"^Q(\d+):\s*(.+)$")


@dataclass
class Monologue:
    """A monologue's lines as (role, text), how many questions it asked, and why it fell back (None: it did not)."""
    lines: list[tuple[str, str]] = field(default_factory=list)
    rounds: int = 0
    answer: str = ""
    fallback: str | None = None

    @property
    def asked(self) -> list[str]:
        """The Reasoner's questions to the Observer, in order, without their "Q1: " marks."""
        return [text.split(": ", 1)[1] for role, text in self.lines if role == "Reasoner" and _QUESTION.match(text)]

    @property
    def answers(self) -> list[str]:
        """The Observer's answers, in order, without their "A1: " marks."""
        return [text.split(": ", 1)[1] for role, text in self.lines if role == "Observer"]


def reasoner_prompt(model: GroundedLM, question: str, earlier: list[Turn] = ()) -> list[int]:
    """The Reasoner's prompt as token ids: the instruction, the text of up to CONTEXT_TURNS earlier turns (an image
    shows as "(an image)") and the question, up to the opening of its own turn, where the transcript goes."""
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in list(earlier)[-CONTEXT_TURNS:]:
        text = "".join("(an image) " if isinstance(p, Image.Image) else p for p in turn.parts).strip()
        messages.append({"role": turn.role, "content": text})
    messages.append({"role": "user", "content": f"Question: {question}"})
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return model.tokenizer(text, add_special_tokens=False).input_ids


def heard(observed: str) -> str:
    """An Observer's reply as the transcript holds it: one line, or a mark that it said nothing."""
    return " ".join(observed.split()) or "(no answer)"


def question_line(n: int, question: str) -> str:
    return f"Q{n}: {question}\n"


def answer_line(n: int, answer: str) -> str:
    return f"A{n}: {answer}\n"


def reason_line(reason: str) -> str:
    return f"{REASON} {reason}\n"


def transcript_pieces(steps: list[tuple[str, str]], answer: str, reason: str, end: str) -> list[tuple[str, bool]]:
    """A whole monologue as (text, written by the Reasoner) pieces, tokenised one by one in training as `think`
    feeds them: the Reasoner's questions, its reason and its answer (closed by `end`, the LM's end of turn), the
    Observer's answers between them and the `Final answer:` cue the loop writes (not learnt)."""
    pieces = []
    for n, (question, observed) in enumerate(steps, 1):
        pieces += [(question_line(n, question), True), (answer_line(n, heard(observed)), False)]
    return pieces + [(reason_line(reason), True), (FINAL, False), (f" {answer}{end}", True)]


def observe(model: GroundedLM, images: list[Image.Image], question: str, cancel: Cancel | None = None,
            engine: DecodeEngine | None = None) -> Iterator[Text]:
    """The Observer's answer to one sub-question about `images`, streamed (adapter off, greedy, no retrieval,
    looking as OBSERVER_LOOKS says), decoded alone or (`engine`) in the batched decoder's batch."""
    settings = GenerationSettings(max_new_tokens=OBSERVER_TOKENS, look=OBSERVER_LOOKS)
    for event in _observer_reply(model, [Turn("user", [*images, question])], settings, None, cancel, engine):
        if isinstance(event, Text):
            yield event


def _observer_reply(model: GroundedLM, turns: list[Turn], settings: GenerationSettings, search: SearchFn | None,
                    cancel: Cancel | None, engine: DecodeEngine | None) -> Iterator[Event]:
    """An ordinary reply of the Observer, decoded alone or in the engine's batch (its places in line left out)."""
    if engine is None:
        yield from stream_reply(model, turns, settings, search, cancel)
        return
    yield from (e for e in engine.submit(turns, settings, search, cancel) if not isinstance(e, Waiting))


class Reasoner:
    """The Reasoner's side of one monologue: its KV cache, the text it has yet to read, and its lines, each
    decoded alone or (`engine`) in the batched decoder's batch beside other sessions' replies."""

    def __init__(self, model: GroundedLM, prompt: list[int], settings: GenerationSettings,
                 engine: DecodeEngine | None = None):
        self.model, self.settings, self.engine = model, settings, engine
        self.cache = DynamicCache()
        self.last: torch.Tensor | None = None
        """(lm_dim,): the hidden state after the last token read."""
        self.unread = list(prompt)
        """Token ids written into the transcript and not read yet: the next line reads them first."""
        self.warpers = logits_warpers(settings)
        self.generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        self.search: SearchFn | None = None
        """Set once the Reasoner is answering: `[RET]` may retrieve there, never in a question."""
        self.shown = set(settings.exclude)
        self.n_images = 0
        self.tokens = 0
        self.ended = ""
        """How the last line ended: "newline", "eos", "limit" or "cancelled"."""

    def feed(self, text: str) -> None:
        """Text the loop writes into the transcript (an Observer's answer, the `Final answer:` cue)."""
        self.unread += self.model.tokenizer(text, add_special_tokens=False).input_ids

    def line(self, cancel: Cancel | None) -> Iterator[str | Retrieved]:
        """Decode one line as text deltas (and `Retrieved` where `[RET]` searched); `ended` says how it stopped
        (a line stopped before it could start, waiting for a row, is "cancelled")."""
        self.ended = "cancelled"
        events = (self.engine.submit_decoding(lambda request: ReasonerLine(self, request), cancel)
                  if self.engine is not None else decode_alone(self.model, ReasonerLine(self, cancel)))
        for event in events:
            if isinstance(event, Text):
                yield event.delta
            elif isinstance(event, Retrieved):
                yield event


class ReasonerLine:
    """One line of the Reasoner, as a `Decoding`: it reads what the transcript holds unread, then writes with the
    adapter on until the line ends."""

    reasoner = True

    def __init__(self, reasoner: Reasoner, cancel: Cancel | None):
        self.r, self.cancel = reasoner, cancel
        self.opening: list[Event] = []
        self.ids: list[int] = []
        self.emitted = ""
        self.written = 0  # tokens chosen in this line, [RET] included
        reasoner.ended = "limit"

    def prefill(self) -> tuple[torch.Tensor, DynamicCache, list[Event]]:
        r = self.r
        if r.unread:
            embeds = r.model.embed_ids(torch.tensor([r.unread], device=r.model.device))   # (1, T, lm_dim)
            hidden, r.cache = r.model.hidden_states(embeds, past_key_values=r.cache, reasoner=True)
            r.last, r.tokens, r.unread = hidden[0, -1], r.tokens + len(r.unread), []
        return r.last, r.cache, []

    def next_token(self, logits: torch.Tensor) -> int | None:
        r, model = self.r, self.r.model
        if r.ended == "newline":
            return None
        if self.cancel is not None and self.cancel.is_set():
            r.ended = "cancelled"
            return None
        if self.written == LINE_TOKENS:  # a line not ended by then never will be
            return None
        ret_allowed = r.search is not None and r.n_images < r.settings.max_images
        logits[model.ret_id] = (scale_ret_logit(logits[model.ret_id], r.settings.ret_scale_factor)
                                if ret_allowed else float("-inf"))
        token = sample(logits, r.settings.temperature, r.warpers, r.generator)
        if token in model.eos_ids:
            r.ended = "eos"
            return None
        self.written += 1
        return token

    def fed(self, token: int, hidden: torch.Tensor) -> list[Event]:
        r, model = self.r, self.r.model
        r.tokens += 1
        if token == model.ret_id:
            hits = r.search(model.ret_query(hidden), r.shown)[:r.settings.images_per_ret]
            r.shown.update(hit.id for hit in hits)
            r.n_images += 1
            return [Retrieved(hits)]
        self.ids.append(token)
        text = model.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return []  # half of a multi-byte character
        if "\n" in text:
            r.ended = "newline"
            end = text.index("\n")
            return [Text(text[len(self.emitted):end])] if end > len(self.emitted) else []
        delta, self.emitted = text[len(self.emitted):], text
        return [Text(delta)] if delta else []

    def release(self, cache: DynamicCache, last: torch.Tensor) -> None:
        self.r.cache, self.r.last = cache, last

    def done(self) -> Done:
        return Done({"stop": self.r.ended})


def _after_label(pieces: Iterator[str | Retrieved], label: str) -> Iterator[str | Retrieved]:
    """A line's deltas without its `label` ("Final answer:") and the spaces after it, held back only while the
    text so far could still be the label."""
    held, passed = "", False
    for piece in pieces:
        if not isinstance(piece, str) or passed:
            yield piece
            continue
        held += piece
        text = held.lstrip()
        if label.startswith(text):
            continue
        text = text[len(label):] if text.startswith(label) else text
        if text.strip():
            passed = True
            yield text.lstrip()


def think(model: GroundedLM, turns: list[Turn], settings: GenerationSettings | None = None,
          search: SearchFn | None = None, cancel: Cancel | None = None, max_rounds: int = 2,
          record: Monologue | None = None, engine: DecodeEngine | None = None) -> Iterator[Event]:
    """Answer the last user turn after an inner monologue about the conversation's image: `Thought`s, then the
    answer as `Text` (and `Retrieved`), then `Done` (its stats add `rounds` and `fallback`). Needs a model with a
    Reasoner and an image in the conversation. `record`, if given, is filled with the monologue. With `engine`,
    every line of the Reasoner and every answer of the Observer decodes in the batched decoder's batch."""
    if model.reasoner is None:
        raise ValueError("this checkpoint has no Reasoner: it cannot think before answering")
    images = looked_at(turns)
    if not images or not turns[-1].text.strip():
        raise ValueError("there is no question about an image in the conversation to think about")
    settings = settings or GenerationSettings()
    record = record if record is not None else Monologue()
    start = time.perf_counter()
    reasoner = Reasoner(model, reasoner_prompt(model, turns[-1].text, turns[:-1]), settings, engine)
    asked: set[str] = set()
    answering = None  # the deltas of the final answer's line, once it starts
    reason: str | None = None  # the Reasoner's reason, once written
    while answering is None and record.fallback is None:
        line = len(record.lines)
        head = ""
        if record.rounds == max_rounds:  # enough questions: the loop cues the reason
            reasoner.feed(REASON)
            head = REASON
        pieces = reasoner.line(cancel)
        for piece in pieces:  # a line opening "F" is the final answer, which the user sees as the reply
            head += piece
            if head.strip():
                break
        if head.strip().startswith("F"):
            answering = itertools.chain([head], pieces)
            break
        said = head
        if head:
            yield Thought("Reasoner", line, head.lstrip())
        for piece in pieces:
            said += piece
            yield Thought("Reasoner", line, piece)
        said = said.strip()
        record.lines.append(("Reasoner", said))
        if reasoner.ended == "cancelled":
            return
        match = _QUESTION.match(said)
        if reasoner.ended != "newline":
            record.fallback = "a line of the monologue did not end"
        elif said.startswith(REASON):
            reason = said[len(REASON):].strip()
            reasoner.feed(FINAL)
            answering = reasoner.line(cancel)
        elif match is None or int(match.group(1)) != record.rounds + 1:
            record.fallback = f"expected Q{record.rounds + 1}: or {REASON} and the Reasoner wrote {said[:60]!r}"
        elif match.group(2).strip().lower() in asked:
            record.fallback = f"the Reasoner asked {match.group(2).strip()!r} twice"
        else:
            question = match.group(2).strip()
            asked.add(question.lower())
            record.rounds += 1
            observed = ""
            yield Thought("Observer", line + 1, f"A{record.rounds}: ")
            for event in observe(model, images, question, cancel, engine):
                observed += event.delta
                yield Thought("Observer", line + 1, event.delta)
            if cancel is not None and cancel.is_set():
                return
            observed = heard(observed)
            record.lines.append(("Observer", f"A{record.rounds}: {observed}"))
            reasoner.feed(answer_line(record.rounds, observed))

    stats: dict = {}
    if answering is not None:
        reasoner.search = search
        yield from _final_answer(reasoner, answering, record, cancel, reason)
    if reasoner.ended == "cancelled":
        return
    if record.fallback is not None:
        yield Thought("Reasoner", len(record.lines), f"(The monologue went wrong: {record.fallback}. The Observer "
                                                     f"answers the question directly.)")
        for event in _observer_reply(model, turns, settings, search, cancel, engine):
            if isinstance(event, Done):
                stats = dict(event.stats)
                continue
            if isinstance(event, Text):
                record.answer += event.delta
            yield event
    yield Done({"stop": reasoner.ended, "images": reasoner.n_images, **stats, "reasoner_tokens": reasoner.tokens,
                "seconds": time.perf_counter() - start, "rounds": record.rounds, "fallback": record.fallback})


def _final_answer(reasoner: Reasoner, answering: Iterator[str | Retrieved], record: Monologue,
                  cancel: Cancel | None, reason: str | None) -> Iterator[Event]:
    """The final answer and its `reason` (written before it; or, from a Reasoner that answers first, on the line
    after it), streamed to the user as one `Text` without labels ("No. The star is red and the square is blue, so ...");
    `[RET]` may retrieve here, as in any reply."""
    for piece in _after_label(answering, FINAL):
        if isinstance(piece, str):
            record.answer += piece
            yield Text(piece)
        else:
            yield piece
    record.answer = record.answer.strip()
    record.lines.append(("Reasoner", f"{FINAL} {record.answer}"))
    if not record.answer:
        record.fallback = "the final answer was empty"
        return
    if reason is not None:
        if reason:
            yield Text(" " + reason)
            record.answer += " " + reason
        return
    if reasoner.ended != "newline":
        return  # the answer alone, without a reason
    reason = ""
    for piece in _after_label(reasoner.line(cancel), REASON):
        if isinstance(piece, str):
            yield Text(piece if reason else " " + piece)
            reason += piece
        else:
            yield piece
    record.lines.append(("Reasoner", f"{REASON} {reason.strip()}"))
    record.answer += " " + reason.strip() if reason.strip() else ""
