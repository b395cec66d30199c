"""Benchmarks, each a ratio against a baseline run in the same process: `python -m bench.<name>` from the
repository root."""
from __future__ import annotations

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a host clock times it (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
