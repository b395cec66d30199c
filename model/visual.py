"""The frozen CLIP visual encoder (open_clip): preprocessing, pooled and patch features.

FROMAGe feeds the LM the *pre-projection* image feature: for a ViT, the CLS token after the final
layernorm (`ln_post`), 1024-d for ViT-L/14, not the 768-d contrastive embedding. open_clip's
`forward_intermediates` with `normalize_intermediates=True` returns exactly `ln_post` applied to the
last block's tokens, split into the CLS token and the patch tokens, so no hooks are needed. Only the
visual tower is kept; the text tower is dropped as soon as the weights are loaded.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import is_offline_mode
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
LOCAL_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def pre_projection_features(visual: VisionTransformer, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ViT tower's last-layer tokens after ln_post, before the projection, through open_clip's public API:
    pixels (B, 3, H, W) -> pooled CLS (B, width), patches (B, n_patches, width)."""
    out = visual.forward_intermediates(pixels, indices=1, intermediates_only=True, normalize_intermediates=True,
                                       output_fmt="NLC", output_extra_tokens=True)
    pooled = out["image_intermediates_prefix"][0][:, 0]  # (B, 1, D) -> (B, D): ln_post(CLS)
    patches = out["image_intermediates"][0]  # (B, P, D): ln_post(patch tokens)
    return pooled, patches


class VisualEncoder(nn.Module):
    """A frozen open_clip ViT tower. Always in eval mode: `.train()` on a parent leaves it alone."""

    def __init__(self, visual: VisionTransformer, transform: Callable[[Image.Image], torch.Tensor], source: str):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(f"only open_clip ViT towers are supported, {source!r} has a "
                                      f"{type(visual).__name__}")
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise NotImplementedError(f"{source!r} pools with {visual.pool_type!r}/attention pooling; "
                                      "only CLS-token ViTs are supported")
        self.visual = visual.requires_grad_(False)
        self.transform = transform
        self.source = source
        self.visual_dim: int = visual.transformer.width
        self.grid_size: tuple[int, int] = tuple(visual.grid_size)
        self.n_patches: int = self.grid_size[0] * self.grid_size[1]
        self.image_size: tuple[int, int] = tuple(visual.image_size)
        self.train(False)

    @classmethod
    def from_source(cls, name: str, pretrained: str | None = None,
                    device: torch.device | str | None = None) -> "VisualEncoder":
        """Load from an open_clip name + pretrained tag, `local-dir:/path` or `hf-hub:org/repo`."""
        if name.startswith((LOCAL_DIR, HF_HUB)):
            if pretrained is not None:
                raise ValueError(f"pretrained={pretrained!r} only applies to named open_clip models, not {name!r}")
            if name.startswith(LOCAL_DIR):
                _check_local(Path(name.removeprefix(LOCAL_DIR)))
            else:
                _fetch(name, None)
        else:
            _check_named(name, pretrained)
            _fetch(name, pretrained)

        model, transform = open_clip.create_model_from_pretrained(name, pretrained, device="cpu")
        source = name if pretrained is None else f"{name}@{pretrained}"
        encoder = cls(model.visual, transform, source)  # the text tower goes with `model`
        return encoder.to(device or "cpu")

    def train(self, mode: bool = True) -> "VisualEncoder":
        """Frozen means eval: patch dropout and dropout stay off while the grounded model trains."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """open_clip's own eval transform (resize, centre crop, normalise) -> (B, 3, H, W) on the CPU."""
        return torch.stack([self.transform(image) for image in images])

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, 3, H, W) -> pooled (B, visual_dim), patches (B, n_patches, visual_dim), pre-projection."""
        return pre_projection_features(self.visual, pixels.to(self.visual.conv1.weight.dtype))

    def regions(self, patches: torch.Tensor, grid: int, per_cell: int = 1) -> torch.Tensor:
        """Patch features (B, n_patches, D) -> (B, grid * grid * per_cell^2, D): the cells of a grid x grid split
        of the image, row by row from the top left, each as the means of a per_cell x per_cell split of it (1:
        the cell's mean), row by row."""
        rows, cols = self.grid_size
        n, c = grid, per_cell
        maps = patches.transpose(1, 2).reshape(patches.shape[0], -1, rows, cols)      # (B, D, rows, cols)
        pooled = F.adaptive_avg_pool2d(maps, n * c).unflatten(2, (n, c)).unflatten(4, (n, c))  # (B, D, n, c, n, c)
        return pooled.permute(0, 2, 4, 3, 5, 1).reshape(patches.shape[0], n * n * c * c, -1)  # (B, n^2 c^2, D)

    @torch.no_grad()
    def encode(self, images: list[Image.Image], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (pooled (N, D), patches (N, P, D)), float32 on the encoder's device, in batches."""
        if not images:
            return (torch.zeros(0, self.visual_dim, device=self.device),
                    torch.zeros(0, self.n_patches, self.visual_dim, device=self.device))
        pooled, patches = [], []
        for start in range(0, len(images), batch_size):
            batch_pooled, batch_patches = self(self.preprocess(images[start:start + batch_size]).to(self.device))
            pooled.append(batch_pooled.float())
            patches.append(batch_patches.float())
        return torch.cat(pooled), torch.cat(patches)


def _check_local(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"visual encoder folder not found: {folder}")
    for file_name in LOCAL_FILES:
        if not (folder / file_name).is_file():
            raise FileNotFoundError(f"{folder / file_name} is missing: a local-dir visual encoder needs "
                                    f"{' and '.join(LOCAL_FILES)}")


def _check_named(name: str, pretrained: str | None) -> None:
    """Refuse unknown names and tags with the choices, before open_clip's long lists or random weights."""
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r} (see open_clip.list_models()); "
                         f"for a folder use 'local-dir:/path', for a hub repo 'hf-hub:org/repo'")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained is None or (pretrained not in tags and not Path(pretrained).is_file()):
        raise ValueError(f"open_clip model {name!r} needs pretrained weights: one of {tags} or a weights file, "
                         f"got {pretrained!r}")


def _fetch(name: str, pretrained: str | None) -> None:
    """Bring hub weights into the local cache first, so that failing there is reported as a download failure.

    With HF_HUB_OFFLINE=1 this fails at once unless the files are cached (open_clip 3.3 prefers the HF hub
    over its legacy URLs whenever huggingface_hub is installed, so no plain URL download is tried).
    """
    try:
        if name.startswith(HF_HUB):
            repo = name.removeprefix(HF_HUB)
            download_pretrained_from_hf(repo, filename=LOCAL_FILES[0])
            download_pretrained_from_hf(repo)
        else:
            open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, pretrained))
    except Exception as e:
        why = ("HF_HUB_OFFLINE is set (no model hub here) and they are not in the local cache"
               if is_offline_mode() else f"{type(e).__name__}: {e}")
        described = repr(name) if pretrained is None else f"{name!r} (pretrained={pretrained!r})"
        raise RuntimeError(
            f"could not download the weights of open_clip model {described}: {why}. Either run once on a "
            f"machine that can reach the Hugging Face hub (the weights are then cached), or use a local folder "
            f"holding {' and '.join(LOCAL_FILES)} (open_clip's hub layout) and pass 'local-dir:/path/to/folder'."
        ) from e
