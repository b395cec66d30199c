"""Streaming decoding with a KV cache that retrieves images when the LM emits `[RET]`.

`stream_reply` yields events as they happen: `Looked(image, attention)` (where a model with a request
module looked before answering, LMEye), `Text(delta)`, `Retrieved(hits)`, `Notice(message)` (the context
was cut; a new image is unlike the training images) and finally `Done(stats)`. When `[RET]` is sampled
it is fed back as the next input; the hidden state of that step is the retrieval query, and the same
step's logits continue the text (FROMAGe recomputed the whole sequence each step and dropped text after
the last `[RET]`).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Union

import torch
from transformers import (DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from model.grounded import GroundedLM, Looked
from model.prompt import Turn, count_tokens, fit_context, images_in, render

SearchFn = Callable[[torch.Tensor, set], list]
"""(query (emb_dim,), ids to exclude) -> hits, best first; each hit has an `id`."""


class Cancel(Protocol):
    """Asked before each token whether the reply should stop: a `threading.Event`, or anything that answers."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Text:
    delta: str


@dataclass(frozen=True)
class Retrieved:
    hits: list


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass(frozen=True)
class Thought:
    """Part of IMMO's inner monologue as it is written (`model/monologue.py`): `delta` adds to line `line`, which
    `role` ("Reasoner" or "Observer") writes."""
    role: str
    line: int
    delta: str


@dataclass(frozen=True)
class Done:
    stats: dict[str, Any]


Event = Union[Looked, Text, Retrieved, Notice, Thought, Done]


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 decodes greedily (FROMAGe's demo default)."""
    top_p: float = 1.0
    top_k: int = 0
    ret_scale_factor: float = 1.0
    """Scales how readily `[RET]` is chosen: 0 never, below 1 multiplies its odds, above 1 is GILL's
    `|logit| * factor` (FROMAGe's raw multiply made negative logits *less* likely as it grew)."""
    max_images: int = 2
    min_words_before_ret: int = 0
    images_per_ret: int = 1
    seed: int | None = None
    context_tokens: int | None = None
    """Prompt budget; defaults to the LM's window minus `max_new_tokens` (at least half the window)."""
    exclude: set = field(default_factory=set)
    """Index ids already shown in this conversation: never retrieved again."""
    look: bool = True
    """Interactive perception (LMEye): a model with a request module looks at the images asked about before
    answering. Off: the images enter as their mapped tokens only, as in a model without one."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if self.ret_scale_factor < 0 or self.max_images < 0 or self.images_per_ret < 1:
            raise ValueError("need ret_scale_factor >= 0, max_images >= 0, images_per_ret >= 1")


def scale_ret_logit(logit: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 0:
        return torch.full_like(logit, float("-inf"))
    if factor > 1:
        return logit.abs() * factor
    return logit + math.log(factor)


def logits_warpers(settings: GenerationSettings) -> LogitsProcessorList:
    """transformers' own temperature, top-k and top-p, in `generate`'s order."""
    warpers = LogitsProcessorList()
    if settings.temperature not in (0, 1):
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return warpers


def sample(logits: torch.Tensor, temperature: float, warpers: LogitsProcessorList,
           generator: torch.Generator | None) -> int:
    """logits (V',) float32 -> one token id: the most likely at temperature 0, else drawn after the warpers."""
    if temperature == 0:
        return int(logits.argmax())
    probs = warpers(None, logits.unsqueeze(0))[0].softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


class Decoding(Protocol):
    """One sequence being decoded, as its driver sees it: every choice made per token, without running the LM.

    A driver yields `opening`, runs `prefill()`, then alternates `next_token(logits)`, which samples from the
    logits of the last hidden state (None: the sequence has ended), and `fed(token, hidden)`, after the LM has
    read that token, which returns the events it makes; at the end it hands back the cache (`release`) and
    yields `done()`. `decode_alone` drives one; the batched engine (`model/serving.py`) drives many through one
    forward per step. A `Reply` answers a conversation; IMMO's Reasoner writes its lines as another kind
    (`model/monologue.py`).
    """
    reasoner: bool
    """Whether the LM reads this sequence with the Reasoner's adapter on."""
    opening: list[Event]

    def prefill(self) -> tuple[torch.Tensor, DynamicCache, list[Event]]:
        """Read what comes before the first token -> the last hidden state (lm_dim,), the cache, events."""

    def next_token(self, logits: torch.Tensor) -> int | None: ...

    def fed(self, token: int, hidden: torch.Tensor) -> list[Event]: ...

    def release(self, cache: DynamicCache, last: torch.Tensor) -> None:
        """The sequence has ended: its own cache (batch of one) and last hidden state (lm_dim,)."""

    def done(self) -> Done: ...


class Reply:
    """One reply being decoded (a `Decoding`): every choice `stream_reply` makes per token, without running the
    LM. Its prompt is `segments`, read by `GroundedLM.prefill`."""

    reasoner = False

    def __init__(self, model: GroundedLM, turns: list[Turn], settings: GenerationSettings | None = None,
                 search: SearchFn | None = None, cancel: Cancel | None = None):
        self.model, self.settings, self.search, self.cancel = model, settings or GenerationSettings(), search, cancel
        settings = self.settings
        self.start = time.perf_counter()
        tokenizer, fmt = model.tokenizer, model.config.prompt_format
        window = getattr(model.lm.config, "max_position_embeddings", 2048)
        budget = settings.context_tokens or max(window - settings.max_new_tokens, window // 2)
        look = settings.look and model.perception is not None
        tokens_per_look = model.config.request_tokens if look else 0
        turns, notice = fit_context(turns, tokenizer, fmt, model.config.tokens_per_image, budget, tokens_per_look)
        self.opening: list[Event] = [Notice(notice)] if notice else []
        """What the reply says before its first token: the context was cut, an image is unfamiliar."""
        new_images = turns[-1].images if turns and turns[-1].role == "user" else []
        for number, unfamiliar in enumerate(model.unfamiliar(new_images), 1):
            if unfamiliar:
                which = f"Image {number} of {len(new_images)}" if len(new_images) > 1 else "This image"
                self.opening.append(Notice(f"{which} looks unlike the images this model was trained on "
                                           f"({model.familiarity.trained_on}): what it says about it will not be "
                                           f"reliable."))
        self.segments = render(turns, tokenizer, fmt, look)
        self.images = images_in(turns)
        """The images the LM reads, in order: a query may point at one."""
        self.state: torch.Tensor | None = None
        """The last hidden state read (lm_dim,): where the next token is predicted."""
        self.prompt_tokens = count_tokens(self.segments, model.config.tokens_per_image, tokens_per_look)
        self.generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        self.warpers = logits_warpers(settings)
        self.text_ids: list[int] = []
        self.emitted, self.shown = "", set(settings.exclude)
        self.n_images, self.n_tokens, self.first_token_s, self.stop = 0, 0, None, None
        self.decode_start = time.perf_counter()

    def prefill(self) -> tuple[torch.Tensor, DynamicCache, list[Event]]:
        """Read the prompt -> the last hidden state (lm_dim,), the cache and where the model looked."""
        last, cache, looked = self.model.prefill(self.segments)
        self.state = last
        if not looked:  # the look gate may decline: its request tokens were never read
            self.prompt_tokens = count_tokens(self.segments, self.model.config.tokens_per_image)
        return last, cache, list(looked)

    def next_token(self, logits: torch.Tensor) -> int | None:
        """logits (V',) of the last hidden state -> the token the LM reads next, or None: the reply has ended
        (its `stop` says why)."""
        settings, model = self.settings, self.model
        if self.stop is None and self.n_tokens >= settings.max_new_tokens:
            self.stop = "length"
        if self.stop is None and self.cancel is not None and self.cancel.is_set():
            self.stop = "cancelled"
        if self.stop is not None:
            return None
        ret_allowed = (model.config.retrieves and self.search is not None and self.n_images < settings.max_images
                       and len(self.emitted.split()) >= settings.min_words_before_ret
                       and (self.n_tokens == 0 or not model.config.ret_opens_reply))
        logits[model.ret_id] = scale_ret_logit(logits[model.ret_id], settings.ret_scale_factor) \
            if ret_allowed else float("-inf")
        token = sample(logits, settings.temperature, self.warpers, self.generator)
        self.n_tokens += 1
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
            self.decode_start = time.perf_counter()
        if token in model.eos_ids:
            self.stop = "eos"
            return None
        return token

    def fed(self, token: int, hidden: torch.Tensor) -> list[Event]:
        """The LM has read `token`; hidden (lm_dim,) is its last-layer state there. Returns the events."""
        before, self.state = self.state, hidden
        if token == self.model.ret_id:
            query = self.model.ret_query(hidden, before, self.model.earlier(self.images))   # (emb_dim,)
            hits = self.search(query, self.shown)[:self.settings.images_per_ret]
            self.shown.update(hit.id for hit in hits)
            self.n_images += 1
            return [Retrieved(hits)]
        self.text_ids.append(token)
        text = self.model.tokenizer.decode(self.text_ids, skip_special_tokens=True)
        newline = self.model.config.prompt_format == "qa" and "\n" in text[len(self.emitted):]
        if newline:  # FROMAGe's dialogue ends a reply at a newline
            text, self.stop = text[:text.index("\n", len(self.emitted))], "newline"
        if (text.endswith("\ufffd") and not newline) or len(text) <= len(self.emitted):
            return []  # nothing new to show, or half of a multi-byte character: wait for the rest
        delta, self.emitted = text[len(self.emitted):], text
        return [Text(delta)]

    def release(self, cache: DynamicCache, last: torch.Tensor) -> None:
        """Nothing to keep: the next turn's prompt is remembered by `GroundedLM.prefill`."""

    def done(self) -> Done:
        seconds = time.perf_counter() - self.start
        decode_s = time.perf_counter() - self.decode_start
        n = self.n_tokens
        return Done({
            "stop": self.stop or "length", "prompt_tokens": self.prompt_tokens, "new_tokens": n,
            "images": self.n_images, "first_token_s": self.first_token_s, "seconds": seconds,
            "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        })


@torch.no_grad()
def decode_alone(model: GroundedLM, decoding: Decoding) -> Iterator[Event]:
    """Drive one `Decoding` by itself, one token per forward."""
    yield from decoding.opening
    last, cache, events = decoding.prefill()                                            # (lm_dim,), ...
    yield from events
    while (token := decoding.next_token(model.logits(last))) is not None:
        hidden, cache = model.hidden_states(model.embed_ids(torch.tensor([[token]], device=model.device)),
                                            past_key_values=cache, reasoner=decoding.reasoner)  # (1, 1, lm_dim)
        last = hidden[0, -1]
        yield from decoding.fed(token, last)
    decoding.release(cache, last)
    yield decoding.done()


def stream_reply(model: GroundedLM, turns: list[Turn], settings: GenerationSettings | None = None,
                 search: SearchFn | None = None, cancel: threading.Event | None = None) -> Iterator[Event]:
    """Generate the assistant's reply to `turns` (the last one is the user's), as a stream of events."""
    yield from decode_alone(model, Reply(model, turns, settings, search, cancel))
