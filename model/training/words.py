"""The LM's tokens as the words they begin, and the words a judge proposes for an image.

ESPER's candidates are the policy's K likeliest tokens, so a word the LM finds unlikely where it goes is never
one and never learnt, however much the judge prefers it: SmolLM2 after "The image is a dark orange" ranks " hex"
(hexagon) 99th to 740th, and its descriptions call a hexagon a circle. `WordProposals` offers such words:
every token of the LM that begins a word, completed to that word by the text-only LM (`whole_words`) and embedded
by the judge once; an image's proposals are the words the judge scores highest against it less their mean over
its batch's images: the words that tell it apart ("hexagon", "orange"), not those that fit any image
("the", "image").
"""
from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch
from tqdm import tqdm

from model.files import write_atomically
from model.grounded import GroundedLM
from model.lm import cache_dir
from model.training.clip_judge import Judge

WORD_TOKENS = 3
"""Tokens a candidate's word may go on for when it is judged whole."""
WORDS: weakref.WeakKeyDictionary[GroundedLM, dict[tuple[str, int], str]] = weakref.WeakKeyDictionary()
"""Each model's whole words, by opening and candidate token."""
PROPOSAL_OPENING = "The image is a"
"""Where a proposed word is completed and judged: "The image is a hexagon."."""
CHUNK = 512
"""Tokens completed, or words embedded, at once while the vocabulary is built."""


@torch.no_grad()
def whole_words(model: GroundedLM, opening: str, tokens: list[int]) -> list[str]:
    """Each candidate token after `opening` as the whole word it begins: with the text-only LM's greedy
    continuation of the opening and the token while that goes on with the same word (up to WORD_TOKENS more), so
    that " hex" after "The shape is a" is judged as " hexagon", which the judge knows, and not as " hex", which it
    does not. The policy would complete such a word alike: what follows " hex" is spelling, not the image. Cached
    for the model by opening and token, as both always complete alike."""
    cache, tokenizer = WORDS.setdefault(model, {}), model.tokenizer
    new = sorted({t for t in tokens if (opening, t) not in cache})
    if new:
        context = tokenizer.encode(opening, add_special_tokens=False)
        ids = torch.tensor([context + [t] for t in new], device=model.device)               # (N, C + 1)
        more = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=WORD_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)[:, ids.shape[1]:]
        for token, continuation in zip(new, more.tolist()):
            word = tokenizer.decode([token])
            for piece in map(tokenizer.decode, [[t] for t in continuation]):
                if not (word[-1:].isalpha() and piece[:1].isalpha()):
                    break
                word += piece
            cache[opening, token] = word
    return [cache[opening, t] for t in tokens]


def word_tokens(model: GroundedLM) -> list[int]:
    """The tokens that begin a lower-case word of three letters or more (" hex", " orange"; not " A", ",")."""
    decoded = model.tokenizer.batch_decode([[i] for i in range(model.tokenizer.vocab_size)])
    return [i for i, w in enumerate(decoded) if w[:1] == " " and w[1:].isalpha() and w[1:].islower() and len(w) > 3]


def saved_words_path(model: GroundedLM) -> Path:
    """Where the text-only LM's whole words are kept: named by a digest of its weights and of what else decides
    its greedy completions (compute dtype, device, opening), so a changed LM never reads another's words."""
    digest = hashlib.sha256(f"{model.lm.dtype} {model.device.type} {PROPOSAL_OPENING!r} {WORD_TOKENS}".encode())
    for name, tensor in model.lm.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return cache_dir() / "whole-words" / f"{digest.hexdigest()[:16]}.json"


def saved_whole_words(model: GroundedLM, tokens: list[int]) -> list[str]:
    """`whole_words` of `tokens` after PROPOSAL_OPENING, completed once for an LM and kept in the cache folder
    (`saved_words_path`): the LM is frozen, so every ESPER run and resume over it would complete the same words
    again (4-17 minutes for SmolLM2 on a 2-core CPU)."""
    path = saved_words_path(model)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["tokens"] == tokens:
            return saved["words"]
    chunks = range(0, len(tokens), CHUNK)
    words = [w for s in tqdm(chunks, desc="whole words", unit="chunk", dynamic_ncols=True)
             for w in whole_words(model, PROPOSAL_OPENING, tokens[s:s + CHUNK])]
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps({"tokens": tokens, "words": words})))
    return words


class WordProposals:
    """The LM's words as the judge embeds them, to propose for images. Built once for a model and a judge (4
    minutes for SmolLM2's 21,190 word tokens on a 2-core CPU, most of it completing the words, which are kept for
    the next run over the same LM: `saved_whole_words`)."""

    def __init__(self, model: GroundedLM, judge: Judge):
        tokens = word_tokens(model)
        chunks = range(0, len(tokens), CHUNK)
        self.words = saved_whole_words(model, tokens)
        self.tokens = torch.tensor(tokens, device=model.device)                                 # (N,)
        self.embeddings = torch.cat([judge.text_embeddings([f"{PROPOSAL_OPENING}{w}." for w in self.words[s:s + CHUNK]])
                                     for s in chunks]).to(model.device)                       # (N, D)

    def propose(self, image_embeddings: torch.Tensor, m: int) -> torch.Tensor:
        """(B, D) images' judge embeddings -> (B, m) the tokens that begin each image's m words the judge scores
        highest against it less their mean over the B images."""
        scores = image_embeddings.to(self.embeddings) @ self.embeddings.T                     # (B, N)
        return self.tokens[(scores - scores.mean(0)).topk(m, -1).indices]


def offer(top: torch.Tensor, proposed: torch.Tensor, last: int) -> torch.Tensor:
    """Candidates (B, P, K) with each image's proposed tokens (B, M) in the slots before `last` (the M least
    likely of the first `last`), at every position, wherever a proposal is not a candidate already."""
    top = top.clone()
    for i in range(proposed.shape[1]):
        token = proposed[:, None, i].expand(-1, top.shape[1])                                # (B, P)
        slot = last - proposed.shape[1] + i
        top[..., slot] = torch.where((top == token[..., None]).any(-1), top[..., slot], token)
    return top
