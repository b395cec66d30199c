"""A whole CLIP model (image and text towers) as a judge of how well a text describes an image.

ESPER's reward and the evaluation's CLIP score: the cosine similarity of CLIP's image and text embeddings. The
grounded model keeps only CLIP's visual tower (`model/visual.py`); the judge loads the same source again with
its text tower, by default the checkpoint's own encoder.
"""
from __future__ import annotations

import itertools
from typing import Protocol

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from model.visual import HF_HUB, LOCAL_DIR

CACHED_TEXTS = 200_000
"""Text embeddings kept (128 floats each for the demo's CLIP: 100 MB at most)."""


class ClipJudge:
    def __init__(self, name: str, pretrained: str | None = None, device: torch.device | str = "cpu"):
        """`name`/`pretrained` as in `GroundedConfig.visual`/`visual_pretrained` (a `local-dir:` folder from
        `train_clip`, or an open_clip name and tag)."""
        self.model, self.transform = open_clip.create_model_from_pretrained(name, pretrained, device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = torch.device(device)
        self._cache: dict[str, torch.Tensor] = {}
        self.source = name if name.startswith((LOCAL_DIR, HF_HUB)) or pretrained is None else f"{name}@{pretrained}"

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """Images -> (N, embed_dim), L2-normalised."""
        pixels = torch.stack([self.transform(im) for im in images]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (N, embed_dim), L2-normalised (truncated to the text tower's context, as CLIP does). Texts
        met before come from a cache: ESPER's candidates repeat ("The shape is a" + the same likely words)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            embedded = F.normalize(self.model.encode_text(self.tokenizer(new).to(self.device)).float(), dim=-1)
            self._cache.update(zip(new, embedded))
            for old in list(itertools.islice(self._cache, max(len(self._cache) - CACHED_TEXTS, 0))):
                del self._cache[old]  # the oldest first
        return torch.stack([self._cache[t] for t in texts])

    def similarity(self, image_embeddings: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(N, embed_dim) image embeddings and N texts -> (N,) cosine similarity of each pair."""
        return (image_embeddings * self.text_embeddings(texts)).sum(-1)


class Judge(Protocol):
    """What scores a reply against its image: `ClipJudge`, or anything with the same methods (a toy judge in
    tests)."""
    source: str

    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor: ...

    def text_embeddings(self, texts: list[str]) -> torch.Tensor: ...

    def similarity(self, image_embeddings: torch.Tensor, texts: list[str]) -> torch.Tensor: ...
