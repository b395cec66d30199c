"""IMMO's Reasoner: a LoRA adapter (peft) on the grounded model's own frozen LM, on for one call at a time.

The Reasoner and the Observer are one LM: the adapter on, it reasons in text; off, it is the LM the image
mappings were trained for. Sessions share the model, so the switch cannot be a global flag (peft's
`disable_adapter` is one): each LoRA layer reads, per call, whether the call is the Reasoner's from a context
variable (`reasoning`), which is local to the thread making the call, and passes peft's per-row
`adapter_names`. A checkpoint keeps the adapter as peft writes it, in `<checkpoint>/reasoner/`.
"""
from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype
from safetensors.torch import load_file, save_file

ADAPTER = "reasoner"
FOLDER = "reasoner"
WEIGHTS = "adapter_model.safetensors"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`
_active: contextvars.ContextVar[bool | list[bool]] = contextvars.ContextVar("reasoning", default=False)


@contextlib.contextmanager
def reasoning(on: bool | list[bool] = True) -> Iterator[None]:
    """LM calls made inside run with the Reasoner's adapter (`on`) or without it, or (a list) with it for the
    batch rows that are True; other threads are unaffected. Keep the block synchronous: never yield from inside
    it."""
    token = _active.set(on)
    try:
        yield
    finally:
        _active.reset(token)


def _per_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The Reasoner's calls take the layer's plain path (its one adapter is the active one); every other call
    names, per row, the adapter or none (peft's per-row route, which runs the base layer alone for rows that name
    none)."""
    on = _active.get()
    if on is True or (isinstance(on, list) and all(on)):
        return args, kwargs
    rows = on if isinstance(on, list) else [False] * (args[0].shape[0] if args[0].dim() > 1 else 1)
    kwargs["adapter_names"] = [ADAPTER if row else _BASE for row in rows]
    return args, kwargs


def add_reasoner(lm: torch.nn.Module, rank: int = 16, alpha: int = 32, dropout: float = 0.0,
                 config: LoraConfig | None = None) -> LoraConfig:
    """Inject a new LoRA adapter (B = 0: the Reasoner starts as the LM) into `lm`'s projections, off unless
    `reasoning()`. Only the adapter's weights require grad. No dropout by default: on a CPU it costs 1.8x a training
    step (a copy of the input at each of the 210 projections), and the Reasoner sees each monologue about once."""
    config = config or LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGETS),
                                  bias="none")
    training = lm.training
    inject_adapter_in_model(config, lm, adapter_name=ADAPTER)
    cast_adapter_dtype(lm, ADAPTER)  # fp32 on a bf16 LM, as get_peft_model keeps it: trained and saved unrounded
    lm.train(training)  # the new layers start in training mode: their dropout would be on in an eval-mode LM
    for module in lm.modules():
        if isinstance(module, LoraLayer):
            module.register_forward_pre_hook(_per_call, with_kwargs=True)
    lm.requires_grad_(False)
    for parameter in reasoner_parameters(lm):
        parameter.requires_grad_(True)
    return config


def reasoner_parameters(lm: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in lm.named_parameters() if "lora_" in name and f".{ADAPTER}." in name]


def save_reasoner(lm: torch.nn.Module, config: LoraConfig, folder: Path) -> None:
    """The adapter as peft stores one: `adapter_config.json` and `adapter_model.safetensors` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    weights = get_peft_model_state_dict(lm, adapter_name=ADAPTER)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, folder / WEIGHTS)


def load_reasoner(lm: torch.nn.Module, folder: Path) -> LoraConfig:
    """Inject the adapter saved in `folder` into `lm`; a missing file or a weight that does not fit is an error
    that says which."""
    if not (folder / "adapter_config.json").is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} should hold the Reasoner's adapter (adapter_config.json and {WEIGHTS}); "
                                f"it does not")
    config = LoraConfig.from_pretrained(str(folder))
    add_reasoner(lm, config=config)
    set_peft_model_state_dict(lm, reasoner_weights(lm, folder), adapter_name=ADAPTER)
    lm.requires_grad_(False)  # the app's model is frozen; a trainer unfreezes `reasoner_parameters`
    return config


def reasoner_weights(lm: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """The adapter weights saved in `folder`, checked against the adapter `lm` carries."""
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} holds no Reasoner's adapter weights ({WEIGHTS})")
    weights = load_file(folder / WEIGHTS)
    expected = get_peft_model_state_dict(lm, adapter_name=ADAPTER)
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [f"{k}: saved {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise ValueError(f"the Reasoner's adapter in {folder} does not fit this LM: " + "; ".join(problems[:5]))
    return weights


@contextlib.contextmanager
def adapter_weights(lm: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The Reasoner's adapter holds `weights` inside the block (another Reasoner on the same LM, for a trainer's
    reference or an evaluation's comparison: nothing else may decode meanwhile)."""
    current = {k: v.detach().clone() for k, v in get_peft_model_state_dict(lm, adapter_name=ADAPTER).items()}
    set_peft_model_state_dict(lm, weights, adapter_name=ADAPTER)
    try:
        yield
    finally:
        set_peft_model_state_dict(lm, current, adapter_name=ADAPTER)
