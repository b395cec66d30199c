"""Turn a conversation of text and images into the segments the grounded LM embeds.

A conversation is a list of `Turn`s whose parts are strings or images, in any order and any turn.
Rendering yields `Segment`s — runs of token ids, and images to be spliced in as visual tokens —
using the LM's chat template (`chat`) or FROMAGe's `Q: ...\\nA:` dialogue (`qa`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from PIL import Image
from transformers import PreTrainedTokenizerBase

Part = Union[str, Image.Image]
Segment = Union[list[int], Image.Image]
ROLES = ("user", "assistant")
_IMAGE = "\uE000"  # private-use character: marks where an image goes in rendered text
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


def _content(turn: Turn) -> str:
    return "".join(_IMAGE if isinstance(p, Image.Image) else p for p in turn.parts)


def _render_text(turns: list[Turn], tokenizer: PreTrainedTokenizerBase, prompt_format: str,
                 generation_prompt: bool) -> str:
    """The conversation as one string, with `_IMAGE` where each image goes (in order)."""
    if prompt_format == "chat" and tokenizer.chat_template:
        messages = [{"role": t.role, "content": _content(t)} for t in turns]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    lines = [("Q: " if t.role == "user" else "A: ") + _content(t) + "\n" for t in turns]
    return (tokenizer.bos_token or "") + "".join(lines) + ("A:" if generation_prompt else "")


def _segments(text: str, images: list[Image.Image], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
    pieces = text.split(_IMAGE)
    if len(pieces) != len(images) + 1:
        raise ValueError("the text of a turn contains the reserved character U+E000")
    segments: list[Segment] = []
    for i, piece in enumerate(pieces):
        if piece:
            segments.append(tokenizer(piece, add_special_tokens=False).input_ids)
        if i < len(images):
            segments.append(images[i])
    return segments


def render(turns: list[Turn], tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> list[Segment]:
    """The prompt for the assistant's next reply."""
    text = _render_text(turns, tokenizer, prompt_format, generation_prompt=True)
    return _segments(text, [im for t in turns for im in t.images], tokenizer)


def render_with_target(turns: list[Turn], tokenizer: PreTrainedTokenizerBase,
                       prompt_format: str) -> tuple[list[Segment], list[Segment]]:
    """Split a conversation ending in an assistant turn into (prompt, target) for training.

    The target is the last turn's text as the template closes it (e.g. with `<|im_end|>`), so the
    LM learns to stop; for `qa` it ends with the tokenizer's EOS token.
    """
    if not turns or turns[-1].role != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    prompt = _render_text(turns[:-1], tokenizer, prompt_format, generation_prompt=True)
    if prompt_format == "chat" and tokenizer.chat_template:
        full = _render_text(turns, tokenizer, prompt_format, generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        target = full[len(prompt):]
    else:
        target = " " + _content(turns[-1]) + (tokenizer.eos_token or "\n")
    history_images = [im for t in turns[:-1] for im in t.images]
    return _segments(prompt, history_images, tokenizer), _segments(target, turns[-1].images, tokenizer)


def count_tokens(segments: list[Segment], tokens_per_image: int) -> int:
    return sum(tokens_per_image if isinstance(s, Image.Image) else len(s) for s in segments)


def fit_context(turns: list[Turn], tokenizer: PreTrainedTokenizerBase, prompt_format: str,
                tokens_per_image: int, max_tokens: int) -> tuple[list[Turn], str | None]:
    """Drop the oldest turns until the prompt fits `max_tokens`; never the current (last) turn.

    If the current turn alone is too long its text is cut at the end. Returns the turns that fit
    and a notice saying what was left out (None when nothing was).
    """
    kept = list(turns)
    dropped = 0
    while len(kept) > 1 and count_tokens(render(kept, tokenizer, prompt_format), tokens_per_image) > max_tokens:
        kept.pop(0)
        dropped += 1
    notice = f"Left out the {dropped} oldest turn(s) to fit the context window." if dropped else None
    excess = count_tokens(render(kept, tokenizer, prompt_format), tokens_per_image) - max_tokens
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
