"""Whether an image is like the ones a checkpoint was trained on, so the chat can say when it is not.

A model trained on the shapes world describes a photograph of a cat as confidently as a scene ("a large green
triangle ..."). The encoder's pooled feature cannot tell: an encoder trained on one world maps everything
into it (the demo's pooled features of scikit-image's photographs lie as close to the training scenes as
other scenes do). Its patch features can: each patch of a photograph is textured in ways no patch of a scene
is. An image's distance is the mean over its patches of their Mahalanobis distance from the training
images' patches (mean and slightly shrunk covariance), and the threshold is set on other images of the
same kind.

Stored in a checkpoint folder as `familiarity.safetensors` (mean, whitening matrix, threshold, and in its
metadata what the images were); a checkpoint without one checks nothing. Made by
`python -m model.training.familiarity`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

FAMILIARITY_NAME = "familiarity.safetensors"
SHRINKAGE = 1e-2
"""Covariance shrinkage towards its mean variance: directions training images never vary in still get a finite,
large distance, and a few hundred images suffice for the estimate."""


@dataclass
class Familiarity:
    mean: torch.Tensor
    """(visual_dim,) the training features' mean."""
    whiten: torch.Tensor
    """(visual_dim, visual_dim) W with W^T W the inverse shrunk covariance: distance = |W (x - mean)|."""
    threshold: float
    """Distances above it are unfamiliar."""
    trained_on: str
    """What the training images were, in words, for the message."""

    @classmethod
    def fit(cls, features: torch.Tensor, calibration: torch.Tensor, trained_on: str,
            quantile: float = 0.999, margin: float = 1.05) -> "Familiarity":
        """Mean and covariance from the patch features (N, P, D) of training images; the threshold from
        `calibration` (M, P, D), other images of the same kind: its `quantile` distance times `margin`."""
        features = features.reshape(-1, features.shape[-1]).double()                        # (N * P, D)
        mean = features.mean(0)
        centred = features - mean
        covariance = centred.T @ centred / max(1, len(features) - 1)                        # (D, D)
        average = covariance.diagonal().mean()
        shrunk = (1 - SHRINKAGE) * covariance + SHRINKAGE * average * torch.eye(len(mean), dtype=torch.float64)
        whiten = torch.linalg.inv(torch.linalg.cholesky(shrunk))                            # L^-1: |L^-1 x|^2 = x^T S^-1 x
        familiarity = cls(mean.float(), whiten.float(), 0.0, trained_on)
        familiarity.threshold = float(torch.quantile(familiarity.distance(calibration), quantile)) * margin
        return familiarity

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """(N, P, D) patch features -> (N,) the mean Mahalanobis distance of each image's patches."""
        centred = features.float().to(self.mean.device) - self.mean
        return (centred @ self.whiten.T).norm(dim=-1).mean(-1)

    def unfamiliar(self, features: torch.Tensor) -> torch.Tensor:
        """(N, P, D) patch features -> (N,) bool: unlike the training images."""
        return self.distance(features) > self.threshold

    def save(self, folder: str | Path, measured: dict | None = None) -> None:
        """Into a checkpoint folder; `measured`: how it flags images of known kinds, kept in the metadata."""
        metadata = {"threshold": repr(self.threshold), "trained_on": self.trained_on}
        if measured is not None:
            metadata["measured"] = json.dumps(measured)
        save_file({"mean": self.mean.contiguous(), "whiten": self.whiten.contiguous()}, Path(folder) / FAMILIARITY_NAME,
                  metadata=metadata)

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> "Familiarity | None":
        """The checkpoint's familiarity, or None when it has none."""
        path = Path(folder) / FAMILIARITY_NAME
        if not path.is_file():
            return None
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        if "threshold" not in metadata:
            raise ValueError(f"{path} has no threshold: remake it with `python -m model.training.familiarity`")
        tensors = load_file(path, device=str(device))
        return cls(tensors["mean"], tensors["whiten"], float(metadata["threshold"]),
                   metadata.get("trained_on", "other images"))
