"""The optimiser's settings both training stages share: which weights decay, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def schedule_step(optimizer: torch.optim.Optimizer, step: int, steps: int, warmup: int, lr: float) -> float:
    """Set every parameter group's learning rate to `lr_at` this step; returns it (for the curves)."""
    rate = lr_at(step, steps, warmup, lr)
    for group in optimizer.param_groups:
        group["lr"] = rate
    return rate


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable weights in two groups: weight matrices decay, as CLIP's do; gains, biases, embeddings
    (token, class, position, [RET]) and the logit scale do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not any(word in name for word in ("embedding", "position")) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
