"""What a `[RET]` query asks for once the conversation has images: an earlier one again, or a new scene.

FROMAGe's query is one linear map of the hidden state where `[RET]` is the input. After described images that
state carries the history too. "Another picture like the second one" must then say the second picture's content
through the frozen LM's last layer: the demo found it at R@5 28% of the time. A request for a new scene is pulled
towards the pictures before it. The module decides between the two, for a request that follows images:

    choice   the state where `[RET]` is predicted (lm_dim,), standardised by the statistics of the requests it was
             fitted on, scores "none" and each earlier image by its place, counted from the first and from the
             last:
                 score_none = w . state,   score_i = ask(state) . (order[i] + from_end[n - 1 - i])   (1 + N,)
             (a linear probe reads the place named there for 96% of held-out requests, against 90% where `[RET]`
             is the input)
    pointed  the query is that image's index vector: it finds the image's other renderings first
    none     the query is a linear map of the state where `[RET]` is the input, like `ret_mapping` and starting
             as a copy of it, fitted on requests for a new scene after described images

A request with no image before it is answered by `ret_mapping` as before. A new module chooses "none" and copies
`ret_mapping`: every query is the checkpoint's own until it has trained (`train_retrieval.py --ret-context`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

WIDTH = 64
PLACES = 8
"""Places told apart, from the first and from the last; an image further in shares the last place."""
NONE_START = 10.0
"""The "none" score of a new module: above every place's, so that it points nowhere until trained."""


class RetContext(nn.Module):
    def __init__(self, lm_dim: int, emb_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(lm_dim))
        self.register_buffer("scale", torch.ones(lm_dim))
        self.ask = nn.Linear(lm_dim, WIDTH)
        self.order = nn.Parameter(torch.randn(PLACES, WIDTH) * 0.1)
        self.from_end = nn.Parameter(torch.randn(PLACES, WIDTH) * 0.1)
        self.none = nn.Linear(lm_dim, 1)
        nn.init.zeros_(self.none.weight)
        nn.init.constant_(self.none.bias, NONE_START)
        self.query = nn.Linear(lm_dim, emb_dim)

    @torch.no_grad()
    def standardise(self, states: torch.Tensor) -> None:
        """Fix the statistics the choice reads its states (N, lm_dim) by: an LM's last layer has a few features
        hundreds of times larger than the rest, which a linear layer fitted on them raw overlooks the rest for."""
        self.mean.copy_(states.float().mean(0))
        self.scale.copy_(states.float().std(0) + 1e-6)

    def choices(self, before: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """before (B, lm_dim) where `[RET]` is predicted, present (B, N) where each row has an earlier image ->
        scores (B, 1 + N): none, then each earlier image (-inf where a row has none)."""
        state = (before.float() - self.mean) / self.scale
        b, n = present.shape
        place = torch.arange(n, device=present.device).expand(b, n)                          # (B, N)
        back = (present.sum(1, keepdim=True) - 1 - place).clamp(min=0)                      # (B, N)
        keys = self.order[place.clamp(max=PLACES - 1)] + self.from_end[back.clamp(max=PLACES - 1)]  # (B, N, d)
        scores = (keys @ self.ask(state).unsqueeze(-1)).squeeze(-1)                          # (B, N)
        return torch.cat([self.none(state), scores.masked_fill(~present, float("-inf"))], 1)

    def forward(self, hidden: torch.Tensor, before: torch.Tensor, earlier: torch.Tensor, present: torch.Tensor
                ) -> torch.Tensor:
        """hidden (B, lm_dim) where `[RET]` is the input, before (B, lm_dim) where it is predicted, earlier
        (B, N, emb_dim) the index vectors of each row's earlier images where present (B, N) -> queries (B, emb_dim),
        L2-normalised, for rows that have an earlier image."""
        chosen = self.choices(before, present).argmax(1)                                    # (B,) 0: none
        pointed = earlier[torch.arange(len(chosen), device=chosen.device), (chosen - 1).clamp(min=0)]
        return torch.where((chosen > 0)[:, None], F.normalize(pointed, dim=-1),
                           F.normalize(self.query(hidden.float()), dim=-1))


def padded_earlier(vectors: list[torch.Tensor], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's earlier images' vectors (N_b, dim) -> (B, N, dim) padded with zeros, and (B, N) bool:
    where a row has an image (N is 0 when no row has one)."""
    present = [torch.ones(len(v), dtype=torch.bool, device=device) for v in vectors]
    return (pad_sequence([v.to(device) for v in vectors], batch_first=True),
            pad_sequence(present, batch_first=True))
