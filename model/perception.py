"""LMEye's interactive perception: the LM asks the image for what the question needs.

A turn that asks about an image ends with k request tokens (`Look` in the rendered prompt). Decoding runs in
two passes over the same prefix:

    pass 1   the LM reads the conversation up to the request tokens, then the first request token (its own
             trainable row); the last-layer hidden states of the question (the turn's text after its image, all
             of it in a text-only turn; at most QUESTION_POSITIONS, the request row's last) are the *request*
             (Q, lm_dim)
    look     the request row's state, as k queries, reads the question, attends over the image's patch
             features, then reads the image's own tokens (those the LM reads where the image sits); the result
             is added to the k request rows -> (k, lm_dim)
    pass 2   the KV cache of the prefix is kept; only the request tokens and what follows are computed

A turn without an image of its own asks about the conversation's latest image, or for something else (a picture);
a checkpoint with a look gate reads which from the request row's pass-1 state (`Perception.asks_about_image`) and,
for something else, runs pass 2 without the request tokens: the prompt a model without the module reads.

    request (B, Q, lm_dim), its mask (B, Q) -> LN -> s
        -> x = q(s[:, -1])                              (B, k, D): the request row's state
        -> x = x + attention(LN(x), s)                  (B, k, D): the question's words
    patches (B, P, D) + a learnt position per patch
        -> x = x + attention(LN(x), patches)            (B, k, D), weights (B, k, P): where it looked
    image tokens (B, T, lm_dim): keys from each token, the mean of its group (the tokens of one region cell, or
        the CLS tokens) and a learnt position per token; a learnt sink beside them, where a query finds nothing
        -> read = softmax(q(LN(x)) . keys) @ tokens     (B, k, lm_dim), weights (B, k, T + 1)
        -> x = x + in(read)                             (B, k, D)
    with word decisions (`WordDecisions`): the region tokens by cell (B, C, S, lm_dim) against the question's
        input rows (B, Q, lm_dim) -> held (B, C), whether each cell holds what is asked
        -> x = x + gain * tally(how many hold it, whether any does)      (B, k, D)
        -> x = x + MLP(LN(x))                           (B, k, D)
        -> output (zero at the start) + read            (B, k, lm_dim), added to the k request rows

D is the encoder's width (visual_dim). The question is read from its own positions because the request row's
state alone says it poorly: a linear probe finds the colour an existence question asks in it for 76% of
validation questions, the shape for 86% (docs/lmeye.md), and "is there a blue square?" cannot be answered
without both. The read copies the image's tokens themselves: where a checkpoint's
region tokens sit on its own words (the demo's cells say size, colour, shape and place), the request token
that finds "the object on the left"'s colour token *is* that word to the frozen LM; what is computed rather
than read (yes or no, a count) comes from the sink's share and the MLP, and, with word decisions, from
comparing each cell's tokens with the question's words where both are the LM's input rows: the read's one
softmax blend of a red circle and a blue square holds red and square, so it cannot say whether a red square is
there; a decision per cell can. Patch features come from any CLS-token
ViT, so a FROMAGe checkpoint, whose image tokens are its CLS tokens alone, gets patch-level detail this way.
The output layer starts at zero, so a new module's tokens are its rows plus what the read takes: at first a
near-even blend of the image's own tokens, input the LM already reads.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

REQUEST_HEADS = 4
"""Attention heads over the question and the patches; divides the widths of the encoders we use (192, 768, 1024)."""
QUESTION_POSITIONS = 32
"""The most of pass 1's last positions a request holds: a shapes-world question after its image takes about 9 with
the chat template's and the request row's (at most 11 of 1,500 existence questions, docs/lmeye.md)."""


TALLY_GAIN = 50.0
"""The tally's output scaled, so that it moves as if its learning rate were this many times the module's: Adam moves
each weight by about the rate a step whatever its gradient, and unscaled, the tally (a new part, from zero) reached
a norm of 0.40 in 600 question steps and the LM answered the binding drill 65%; scaled, 98% (docs/lmeye.md)."""


class WordDecisions(nn.Module):
    """Per region cell, whether it holds what the question asks, decided where the cells' tokens were made: in the
    LM's input word space (cell tokens that sit on their object's words, `train --cell-words`). Each of a cell's S
    tokens (its slots: size, colour, shape, place) is compared with the question's own input rows (and the means of
    neighbouring pairs, for a word of two tokens) by cosine, its best match kept; how strongly the question names each
    slot (a learnt row per slot) and how much each slot looks empty (a learnt row per slot) come beside them; a small
    MLP decides per cell. Whether any cell holds it and how many do are what existence and counts ask
    (`fit_word_decisions.py` fits them on those answers); the tally carries them into the request tokens' state."""

    def __init__(self, lm_dim: int, width: int, slots: int):
        super().__init__()
        self.slots = slots
        self.asked = nn.Parameter(torch.randn(slots, lm_dim) * 0.02)
        self.empty = nn.Parameter(torch.randn(slots, lm_dim) * 0.02)
        self.decide = nn.Sequential(nn.Linear(3 * slots, 32), nn.GELU(), nn.Linear(32, 1))
        self.tally = nn.Linear(2, width)
        nn.init.zeros_(self.tally.weight)
        nn.init.zeros_(self.tally.bias)

    def held(self, cells: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """cells (B, C, S, lm_dim): the region tokens by cell; words (B, Q, lm_dim): the question's input rows with
        mask (B, Q) -> the chance that each cell holds what is asked (B, C)."""
        pairs = (words[:, :-1] + words[:, 1:]) / 2
        words = F.normalize(torch.cat([words, pairs], 1).float(), dim=-1)                       # (B, W, lm_dim)
        mask = torch.cat([mask, mask[:, :-1] & mask[:, 1:]], 1)                                 # (B, W)
        cells = F.normalize(cells.float(), dim=-1)
        similar = torch.einsum("bcsd,bwd->bcsw", cells, words).masked_fill(~mask[:, None, None], -1.0)
        matched = similar.max(-1).values                                                        # (B, C, S)
        asked = (torch.einsum("sd,bwd->bsw", F.normalize(self.asked, dim=-1), words)
                 .masked_fill(~mask[:, None], -1.0).max(-1).values)                             # (B, S)
        empty = (cells * F.normalize(self.empty, dim=-1)).sum(-1)                               # (B, C, S)
        features = torch.cat([matched, asked[:, None].expand_as(matched), empty], -1)          # (B, C, 3S)
        return self.decide(features).squeeze(-1).sigmoid()

    def forward(self, held: torch.Tensor) -> torch.Tensor:
        """held (B, C) -> the change to each request token's state (B, 1, D): how many cells hold it, whether any
        does. The tally starts at zero: a module that gains decisions answers as before until it trains."""
        counted = torch.stack([held.sum(-1), 1 - (1 - held).prod(-1)], -1)                      # (B, 2)
        return TALLY_GAIN * self.tally(counted)[:, None]


class Perception(nn.Module):
    def __init__(self, n_tokens: int, lm_dim: int, visual_dim: int, n_patches: int, token_groups: list[int],
                 row_init: torch.Tensor, gate: bool = False, word_slots: int = 0):
        """`token_groups` (T,): which group each of the image's LM tokens belongs to (its region cell, or the CLS
        tokens'); `row_init` (lm_dim,): where the request rows start (the LM's mean embedding, as `[RET]`'s);
        `gate`: a look gate (`asks_about_image`); `word_slots`: decide per region cell of this many tokens in the
        LM's word space (`WordDecisions`), 0: no decisions."""
        super().__init__()
        self.n_tokens = n_tokens
        self.request_rows = nn.Parameter(row_init.detach().float().expand(n_tokens, -1).clone())  # (k, lm_dim)
        self.request_norm = nn.LayerNorm(lm_dim)
        self.query = nn.Linear(lm_dim, n_tokens * visual_dim)
        self.question_norm = nn.LayerNorm(visual_dim)
        self.question = nn.MultiheadAttention(visual_dim, REQUEST_HEADS, batch_first=True, kdim=lm_dim, vdim=lm_dim)
        self.patch_position = nn.Parameter(torch.zeros(n_patches, visual_dim))
        self.query_norm = nn.LayerNorm(visual_dim)
        self.attention = nn.MultiheadAttention(visual_dim, REQUEST_HEADS, batch_first=True)
        self.token_norm = nn.LayerNorm(lm_dim)
        self.token_key = nn.Linear(lm_dim, visual_dim)
        self.group_key = nn.Linear(lm_dim, visual_dim)
        self.token_position = nn.Parameter(torch.zeros(len(token_groups), visual_dim))
        self.sink_key = nn.Parameter(torch.zeros(visual_dim))
        self.sink_value = nn.Parameter(torch.zeros(lm_dim))
        self.read_norm = nn.LayerNorm(visual_dim)
        self.read_query = nn.Linear(visual_dim, visual_dim)
        self.read_in = nn.Linear(lm_dim, visual_dim)
        self.mlp_norm = nn.LayerNorm(visual_dim)
        self.mlp = nn.Sequential(nn.Linear(visual_dim, 4 * visual_dim), nn.GELU(),
                                 nn.Linear(4 * visual_dim, visual_dim))
        self.output = nn.Linear(visual_dim, lm_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.token_groups = token_groups
        self.words = WordDecisions(lm_dim, visual_dim, word_slots) if word_slots else None
        self.gate = nn.Sequential(nn.LayerNorm(lm_dim), nn.Linear(lm_dim, 1)) if gate else None

    def asks_about_image(self, row_state: torch.Tensor) -> torch.Tensor:
        """The request row's pass-1 state (B, lm_dim) of turns without an image of their own -> the gate's logit
        (B,) that the turn asks about the conversation's latest image (> 0: look at it) rather than for something
        else, such as a picture. A linear probe, fitted after the module on pass 1's states (`train_look_gate.py`):
        the row has read the whole turn, and a request for a picture reads differently from a question."""
        return self.gate(row_state.float()).squeeze(-1)

    def cells_of(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """image_tokens (B, T, lm_dim) -> the region tokens by cell (B, C, S, lm_dim) (the CLS tokens, group 0, left
        out)."""
        region = image_tokens[:, self.token_groups.count(0):]
        return region.unflatten(1, (-1, self.words.slots))

    def forward(self, request: torch.Tensor, request_mask: torch.Tensor, patches: torch.Tensor,
                image_tokens: torch.Tensor, question_rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """request (B, Q, lm_dim) with request_mask (B, Q) (True where a position is the question's; the request
        row's last, always there), patches (B, P, visual_dim), image_tokens (B, T, lm_dim) -> the request tokens'
        embeddings (B, k, lm_dim), the attention over the patches (B, P) and over the image tokens (B, T), each
        averaged over the k tokens (and the patches' over heads); the patches' rows sum to 1, the tokens' to
        1 less the sink's share. `question_rows` (B, Q, lm_dim): the LM's input rows at the request's positions (the
        last, the request row's, is not a word), which word decisions compare the cells with."""
        batch, width = request.shape[0], self.query_norm.normalized_shape[0]
        states = self.request_norm(request.float())                                          # (B, Q, lm_dim)
        x = self.query(states[:, -1]).view(batch, self.n_tokens, width)                      # (B, k, D)
        asked, _ = self.question(self.question_norm(x), states, states, key_padding_mask=~request_mask,
                                 need_weights=False)
        x = x + asked
        keys = patches.float() + self.patch_position                                          # (B, P, D)
        looked, patch_weights = self.attention(self.query_norm(x), keys, keys)               # (B, k, D), (B, k, P)
        x = x + looked
        tokens = image_tokens.float()
        normed = self.token_norm(tokens)
        groups = torch.tensor(self.token_groups, device=tokens.device)
        same = (groups[:, None] == groups[None, :]).float()                                  # (T, T)
        group_means = same / same.sum(1, keepdim=True) @ normed                               # (B, T, lm_dim)
        keys = self.token_key(normed) + self.group_key(group_means) + self.token_position
        keys = torch.cat([keys, self.sink_key.expand(batch, 1, -1)], 1)                       # (B, T + 1, D)
        values = torch.cat([tokens, self.sink_value.expand(batch, 1, -1)], 1)                 # (B, T + 1, lm_dim)
        scores = self.read_query(self.read_norm(x)) @ keys.transpose(1, 2) / math.sqrt(width)
        token_weights = scores.softmax(-1)                                                    # (B, k, T + 1)
        read = token_weights @ values                                                         # (B, k, lm_dim)
        x = x + self.read_in(read)
        if self.words is not None:
            if question_rows is None:
                raise ValueError("this request module decides in word space: give the question's input rows")
            words_mask = request_mask.clone()
            words_mask[:, -1] = False
            x = x + self.words(self.words.held(self.cells_of(tokens), question_rows, words_mask))
        x = x + self.mlp(self.mlp_norm(x))
        return (self.request_rows + self.output(x) + read, patch_weights.mean(1),
                token_weights[..., :-1].mean(1))


def heat_map(image: Image.Image, attention: torch.Tensor, size: int = 256) -> Image.Image:
    """Where a request looked, as a picture: the square the encoder sees (the image's centre, as its
    preprocessing crops it) with the attention (grid_h, grid_w) laid over it, brighter where it looked more."""
    from matplotlib import colormaps

    seen = ImageOps.fit(image.convert("RGB"), (size, size))
    scaled = (attention / attention.max().clamp(min=1e-12)).float().cpu().numpy()
    colours = (colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)           # (grid_h, grid_w, 3)
    heat = Image.fromarray(colours).resize(seen.size, Image.Resampling.BILINEAR)
    return Image.blend(seen, heat, 0.6)
