"""Turn a conversation of text and images into the segments the grounded LM embeds.

A conversation is a list of `Turn`s whose parts are strings or images, in any order and any turn.
Rendering yields `Segment`s — runs of token ids, images to be spliced in as visual tokens, and (for a model
with LMEye's request module) `Look`s where its request tokens go — using the LM's chat template (`chat`) or
FROMAGe's `Q: ...\\nA:` dialogue (`qa`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from PIL import Image
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True, eq=False)
class Look:
    """Where the request tokens that look at `image` go (LMEye): after the user's text, before the reply.
    `earlier`: the turn has no image of its own and the image is the conversation's latest, which a checkpoint
    with a look gate looks at only if the turn asks about it (`GroundedLM.prefill`)."""
    image: Image.Image
    earlier: bool = False


Part = Union[str, Image.Image]
Segment = Union[list[int], Image.Image, Look]
ROLES = ("user", "assistant")
_IMAGE = "\uE000"  # private-use characters: mark where an image and a look go in rendered text
_LOOK = "\uE001"
_ASK = "\uE002"  # and where the text of a turn that looks starts: its last token run is the question. Splitting
# there changes no token of a text that opens with a non-space (the app strips messages); one that opens with
# spaces has them tokenized apart from the template's newline.
REQUESTS = ("Show me a picture of {}.", "Find an image of {}.", "Can you show me {}?", "Show me {}.",
            "I would like to see {}.", "Do you have a picture of {}?")
"""How a user asks for a picture; training rotates them, text search uses the first."""
_LEADING = re.compile(r"^(there (is|are)|this (image|picture) shows|a (picture|photo|image) of|an image (of|with))\s+",
                      re.IGNORECASE)


@dataclass
class Turn:
    role: str
    parts: list[Part] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


def images_in(turns: list[Turn]) -> list[Image.Image]:
    """Every image of a conversation, in order."""
    return [im for t in turns for im in t.images]


def looked_at(turns: list[Turn]) -> list[Image.Image]:
    """The images the last user turn asks about: its own, else the conversation's latest (none without one)."""
    if not turns or turns[-1].role != "user":
        return []
    if turns[-1].images:
        return turns[-1].images
    earlier = [im for t in turns[:-1] for im in t.images]
    return earlier[-1:]


def _content(turn: Turn, looks: int = 0) -> str:
    text = "".join(_IMAGE if isinstance(p, Image.Image) else p for p in turn.parts)
    return _ASK + text + _LOOK * looks if looks else text


def _qa_line(role: str, content: str) -> str:
    """FROMAGe's dialogue line; `_ASK` goes before "Q: ", where splitting the text changes no token (after it,
    the question's first word would lose the space it is tokenized with)."""
    marker = _ASK if content.startswith(_ASK) else ""
    return marker + ("Q: " if role == "user" else "A: ") + content.removeprefix(_ASK) + "\n"


def _render_text(turns: list[Turn], tokenizer: PreTrainedTokenizerBase, prompt_format: str,
                 generation_prompt: bool, looks: int = 0) -> str:
    """The conversation as one string, with `_IMAGE` where each image goes (in order); with `looks`, `_ASK` where
    the last turn's text starts and `looks` times `_LOOK` at the end of its content."""
    contents = [_content(t, looks if i == len(turns) - 1 else 0) for i, t in enumerate(turns)]
    if prompt_format == "chat" and tokenizer.chat_template:
        messages = [{"role": t.role, "content": content} for t, content in zip(turns, contents)]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    lines = [_qa_line(t.role, content) for t, content in zip(turns, contents)]
    return (tokenizer.bos_token or "") + "".join(lines) + ("A:" if generation_prompt else "")


def _segments(text: str, images: list[Image.Image], tokenizer: PreTrainedTokenizerBase,
              looked: list[Image.Image] = (), earlier: bool = False) -> list[Segment]:
    """Split rendered text at the markers: token runs, then each `_IMAGE` as its image and each `_LOOK` as a
    `Look` at the next of `looked` (at an earlier turn's image: `earlier`); `_ASK` splits a run in two."""
    pieces = re.split(f"([{_IMAGE}{_LOOK}{_ASK}])", text)
    if (pieces.count(_IMAGE) != len(images) or pieces.count(_LOOK) != len(looked)
            or pieces.count(_ASK) != (1 if looked else 0)):
        raise ValueError("the text of a turn contains a reserved character (U+E000 to U+E002)")
    images_left, looks_left = iter(images), iter(looked)
    segments: list[Segment] = []
    for piece in pieces:
        if piece == _IMAGE:
            segments.append(next(images_left))
        elif piece == _LOOK:
            segments.append(Look(next(looks_left), earlier))
        elif piece and piece != _ASK:
            segments.append(tokenizer(piece, add_special_tokens=False).input_ids)
    return segments


def render(turns: list[Turn], tokenizer: PreTrainedTokenizerBase, prompt_format: str,
           look: bool = False) -> list[Segment]:
    """The prompt for the assistant's next reply; with `look`, a `Look` at each image the question is about
    (`looked_at`) ends the user's turn."""
    looked = looked_at(turns) if look else []
    text = _render_text(turns, tokenizer, prompt_format, generation_prompt=True, looks=len(looked))
    return _segments(text, images_in(turns), tokenizer, looked, earlier=bool(looked) and not turns[-1].images)


def render_with_target(turns: list[Turn], tokenizer: PreTrainedTokenizerBase, prompt_format: str,
                       look: bool = False) -> tuple[list[Segment], list[Segment]]:
    """Split a conversation ending in an assistant turn into (prompt, target) for training; `look` as `render`.

    The target is the last turn's text as the template closes it (e.g. with `<|im_end|>`), so the
    LM learns to stop; for `qa` it ends with the tokenizer's EOS token.
    """
    if not turns or turns[-1].role != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    looked = looked_at(turns[:-1]) if look else []
    prompt = _render_text(turns[:-1], tokenizer, prompt_format, generation_prompt=True, looks=len(looked))
    if prompt_format == "chat" and tokenizer.chat_template:
        full = _render_text(turns, tokenizer, prompt_format, generation_prompt=False)
        unlooked = _render_text(turns[:-1], tokenizer, prompt_format, generation_prompt=True)
        if not full.startswith(unlooked):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        target = full[len(unlooked):]
    else:
        target = " " + _content(turns[-1]) + (tokenizer.eos_token or "\n")
    history_images = [im for t in turns[:-1] for im in t.images]
    return (_segments(prompt, history_images, tokenizer, looked, earlier=bool(looked) and not turns[-2].images),
            _segments(target, turns[-1].images, tokenizer))


def count_tokens(segments: list[Segment], tokens_per_image: int, tokens_per_look: int = 0) -> int:
    return sum(tokens_per_image if isinstance(s, Image.Image) else tokens_per_look if isinstance(s, Look)
               else len(s) for s in segments)


def fit_context(turns: list[Turn], tokenizer: PreTrainedTokenizerBase, prompt_format: str,
                tokens_per_image: int, max_tokens: int, tokens_per_look: int = 0) -> tuple[list[Turn], str | None]:
    """Drop the oldest turns until the prompt fits `max_tokens`; never the current (last) turn. With
    `tokens_per_look`, the request tokens of `render(..., look=True)` count too.

    If the current turn alone is too long its text is cut at the end. Returns the turns that fit
    and a notice saying what was left out (None when nothing was).
    """
    look = tokens_per_look > 0

    def length(kept: list[Turn]) -> int:
        return count_tokens(render(kept, tokenizer, prompt_format, look), tokens_per_image, tokens_per_look)

    kept = list(turns)
    dropped = 0
    while len(kept) > 1 and length(kept) > max_tokens:
        kept.pop(0)
        dropped += 1
    notice = f"Left out the {dropped} oldest turn(s) to fit the context window." if dropped else None
    excess = length(kept) - max_tokens
    if excess > 0:
        current = kept[-1]
        text_ids = tokenizer(current.text, add_special_tokens=False).input_ids
        keep = len(text_ids) - excess
        if keep <= 0:
            what = "the images in this message" if current.images else "the conversation's template"
            raise ValueError(f"{what} alone do not fit the context window of {max_tokens} tokens")
        cut_text = tokenizer.decode(text_ids[:keep])
        kept[-1] = Turn(current.role, current.images + [cut_text])
        cut = f"Your message was cut to its first {keep} tokens to fit the context window."
        notice = f"{notice} {cut}" if notice else cut
    return kept, notice


def request_phrase(caption: str) -> str:
    """What a user would ask for: 'There is a red circle.' -> 'a red circle'."""
    text = " ".join(caption.split()).rstrip(".!? ")
    text = _LEADING.sub("", text)
    if not text:
        raise ValueError(f"caption {caption!r} names nothing to ask for")
    return text if text[1:2].isupper() else text[0].lower() + text[1:]  # keep acronyms: 'NASA ...'


def retrieval_request(description: str, ret_token: str, template: str = REQUESTS[0]) -> list[Turn]:
    """A request for a picture and the reply the model learns for it: `[RET]` alone, first. The query is
    the hidden state where that `[RET]` is the input, so it has read the whole request."""
    return [Turn("user", [template.format(request_phrase(description))]), Turn("assistant", [ret_token])]
