"""LMEye's interactive perception: the LM asks the image for what the question needs.

A turn that asks about an image ends with k request tokens (`Look` in the rendered prompt). Decoding runs in
two passes over the same prefix:

    pass 1   the LM reads the conversation up to the request tokens, then the first request token (its own
             trainable row); the last-layer hidden state there is the *request* (lm_dim,)
    look     the request, as k queries, attends over the image's patch features (one cross-attention block);
             the result, mapped to the LM's width, is added to the k request rows     -> (k, lm_dim)
    pass 2   the KV cache of the prefix is kept; only the request tokens and what follows are computed

    request (B, lm_dim) --query--> (B, k, D)           patches (B, P, D) + a learnt position per patch
        -> x = q + attention(LN(q), patches)            (B, k, D), weights (B, P): where it looked
        -> x = x + MLP(LN(x))                           (B, k, D)
        -> output (zero at the start)                   (B, k, lm_dim), added to the request rows

D is the encoder's width (visual_dim). Patch features come from any CLS-token ViT, so a FROMAGe checkpoint,
which feeds the LM only the CLS token, gets patch-level detail this way too. The output layer starts at
zero: a new module changes nothing but the inserted rows until it has learnt to look.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

REQUEST_HEADS = 4
"""Attention heads over the patches; divides the widths of the encoders we use (192, 768, 1024)."""


class Perception(nn.Module):
    def __init__(self, n_tokens: int, lm_dim: int, visual_dim: int, n_patches: int, row_init: torch.Tensor):
        """`row_init` (lm_dim,): where the request rows start (the LM's mean embedding, as `[RET]`'s)."""
        super().__init__()
        self.n_tokens = n_tokens
        self.request_rows = nn.Parameter(row_init.detach().float().expand(n_tokens, -1).clone())  # (k, lm_dim)
        self.query = nn.Linear(lm_dim, n_tokens * visual_dim)
        self.patch_position = nn.Parameter(torch.zeros(n_patches, visual_dim))
        self.query_norm = nn.LayerNorm(visual_dim)
        self.attention = nn.MultiheadAttention(visual_dim, REQUEST_HEADS, batch_first=True)
        self.mlp_norm = nn.LayerNorm(visual_dim)
        self.mlp = nn.Sequential(nn.Linear(visual_dim, 4 * visual_dim), nn.GELU(),
                                 nn.Linear(4 * visual_dim, visual_dim))
        self.output = nn.Linear(visual_dim, lm_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, request: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """request (B, lm_dim), patches (B, P, visual_dim) -> the request tokens' embeddings (B, k, lm_dim) and
        the attention over the patches (B, P), averaged over heads and tokens (each row sums to 1)."""
        batch = request.shape[0]
        queries = self.query(request.float()).view(batch, self.n_tokens, -1)                 # (B, k, D)
        keys = patches.float() + self.patch_position                                          # (B, P, D)
        looked, weights = self.attention(self.query_norm(queries), keys, keys)               # (B, k, D), (B, k, P)
        x = queries + looked
        x = x + self.mlp(self.mlp_norm(x))
        return self.request_rows + self.output(x), weights.mean(1)                          # (B, k, lm_dim), (B, P)


def heat_map(image: Image.Image, attention: torch.Tensor, size: int = 256) -> Image.Image:
    """Where a request looked, as a picture: the square the encoder sees (the image's centre, as its
    preprocessing crops it) with the attention (grid_h, grid_w) laid over it, brighter where it looked more."""
    from matplotlib import colormaps

    seen = ImageOps.fit(image.convert("RGB"), (size, size))
    scaled = (attention / attention.max().clamp(min=1e-12)).float().cpu().numpy()
    colours = (colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)           # (grid_h, grid_w, 3)
    heat = Image.fromarray(colours).resize(seen.size, Image.Resampling.BILINEAR)
    return Image.blend(seen, heat, 0.6)
