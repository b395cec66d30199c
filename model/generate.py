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
from typing import Any, Callable, Iterator, Union

import torch
from transformers import DynamicCache

from model.grounded import GroundedLM, Looked
from model.prompt import Turn, fit_context, render, count_tokens

SearchFn = Callable[[torch.Tensor, set], list]
"""(query (emb_dim,), ids to exclude) -> hits, best first; each hit has an `id`."""


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
class Done:
    stats: dict[str, Any]


Event = Union[Looked, Text, Retrieved, Notice, Done]


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


def sample(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    """logits (V',) float32 -> one token id."""
    if settings.temperature == 0:
        return int(logits.argmax())
    logits = logits / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > settings.top_p  # keep the token that crosses top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def stream_reply(model: GroundedLM, turns: list[Turn], settings: GenerationSettings | None = None,
                 search: SearchFn | None = None, cancel: threading.Event | None = None) -> Iterator[Event]:
    """Generate the assistant's reply to `turns` (the last one is the user's), as a stream of events."""
    settings = settings or GenerationSettings()
    start = time.perf_counter()
    tokenizer, fmt = model.tokenizer, model.config.prompt_format
    window = getattr(model.lm.config, "max_position_embeddings", 2048)
    budget = settings.context_tokens or max(window - settings.max_new_tokens, window // 2)
    look = settings.look and model.perception is not None
    tokens_per_look = model.config.request_tokens if look else 0
    turns, notice = fit_context(turns, tokenizer, fmt, model.config.tokens_per_image, budget, tokens_per_look)
    if notice:
        yield Notice(notice)
    new_images = turns[-1].images if turns and turns[-1].role == "user" else []
    for number, unfamiliar in enumerate(model.unfamiliar(new_images), 1):
        if unfamiliar:
            which = f"Image {number} of {len(new_images)}" if len(new_images) > 1 else "This image"
            yield Notice(f"{which} looks unlike the images this model was trained on "
                         f"({model.familiarity.trained_on}): what it says about it will not be reliable.")
    segments = render(turns, tokenizer, fmt, look)
    prompt_tokens = count_tokens(segments, model.config.tokens_per_image, tokens_per_look)
    generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None

    last, cache, looked = model.prefill(segments, DynamicCache())                       # (lm_dim,), ...
    yield from looked
    text_ids: list[int] = []
    emitted, shown = "", set(settings.exclude)
    n_images, n_tokens, first_token_s, stop = 0, 0, None, "length"
    decode_start = time.perf_counter()
    while n_tokens < settings.max_new_tokens:
        if cancel is not None and cancel.is_set():
            stop = "cancelled"
            break
        logits = model.logits(last)                                                      # (V',)
        ret_allowed = (search is not None and n_images < settings.max_images
                       and len(emitted.split()) >= settings.min_words_before_ret)
        logits[model.ret_id] = scale_ret_logit(logits[model.ret_id], settings.ret_scale_factor) \
            if ret_allowed else float("-inf")
        token = sample(logits, settings, generator)
        n_tokens += 1
        if first_token_s is None:
            first_token_s = time.perf_counter() - start
            decode_start = time.perf_counter()
        if token in model.eos_ids:
            stop = "eos"
            break
        hidden, cache = model.hidden_states(model.embed_ids(torch.tensor([[token]], device=model.device)),
                                            past_key_values=cache)                       # (1, 1, lm_dim)
        last = hidden[0, -1]
        if token == model.ret_id:
            query = model.ret_query(last)                                                # (emb_dim,)
            hits = search(query, shown)[:settings.images_per_ret]
            shown.update(hit.id for hit in hits)
            n_images += 1
            yield Retrieved(hits)
            continue
        text_ids.append(token)
        text = tokenizer.decode(text_ids, skip_special_tokens=True)
        if fmt == "qa" and "\n" in text[len(emitted):]:  # FROMAGe's dialogue ends a reply at a newline
            text, stop = text[:text.index("\n", len(emitted))], "newline"
        if text.endswith("\ufffd") and stop != "newline":  # half of a multi-byte character: wait
            continue
        if len(text) > len(emitted):
            yield Text(text[len(emitted):])
            emitted = text
        if stop == "newline":
            break
    seconds = time.perf_counter() - start
    decode_s = time.perf_counter() - decode_start
    yield Done({
        "stop": stop, "prompt_tokens": prompt_tokens, "new_tokens": n_tokens, "images": n_images,
        "first_token_s": first_token_s, "seconds": seconds,
        "tokens_per_s": (n_tokens - 1) / decode_s if n_tokens > 1 and decode_s > 0 else None,
    })
