"""What an image index needs of a checkpoint: its visual encoder and image mapping, not its LM.

`python -m retrieval_index.build` embeds a folder with this alone; `GroundedLM` computes the same vectors
and the same fingerprint through the functions here, so an index built either way fits the chat model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.checkpoint import read_checkpoint
from model.lm import default_device
from model.visual import VisualEncoder


def image_keys(image_mapping: nn.Linear, pooled: torch.Tensor) -> torch.Tensor:
    """Pooled CLS features (N, visual_dim) -> index vectors (N, emb_dim), L2-normalised."""
    return F.normalize(image_mapping(pooled.float()), dim=-1)


def image_vectors(visual: VisualEncoder, image_mapping: nn.Linear, images: list[Image.Image]) -> torch.Tensor:
    """Index vectors (N, emb_dim), L2-normalised: the pooled CLS feature through the image mapping."""
    pooled, _ = visual.encode(images)
    return image_keys(image_mapping, pooled)


def fingerprint(visual: VisualEncoder, image_mapping: nn.Linear) -> str:
    """Identifies what makes index vectors: the visual encoder and the image mapping's weights.

    The encoder enters through its final layernorm (cheap, and differs between trained encoders), not its
    source string, so the same files give the same fingerprint wherever they live.
    """
    digest = hashlib.sha256()
    ln_post = visual.visual.ln_post
    for tensor in (ln_post.weight, ln_post.bias, image_mapping.weight, image_mapping.bias):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class ImageEmbedder(nn.Module):
    def __init__(self, visual: VisualEncoder, image_mapping: nn.Linear):
        super().__init__()
        self.visual, self.image_mapping = visual, image_mapping

    @classmethod
    def from_pretrained(cls, folder_or_preset: str | Path,
                        device: torch.device | str | None = None) -> "ImageEmbedder":
        config, weights = read_checkpoint(folder_or_preset)
        visual = VisualEncoder.from_source(config.visual, config.visual_pretrained, device or default_device())
        image_mapping = nn.Linear(visual.visual_dim, config.emb_dim).to(visual.device)
        image_mapping.load_state_dict({"weight": weights["image_mapping.weight"],
                                       "bias": weights["image_mapping.bias"]})
        return cls(visual, image_mapping.requires_grad_(False))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.visual, self.image_mapping)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        return image_vectors(self.visual, self.image_mapping, images)
