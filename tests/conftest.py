"""Shared fixtures: tiny random models built on the spot, so tests run offline in seconds.

The tiny LM is a 2-layer Llama with a small BPE tokenizer trained here; the tiny CLIP is a 2-layer
ViT saved in open_clip's `local-dir:` format. Both go through the same loading code as real models.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "a small red circle on the left and a large blue square",
    "describe the image. show me a picture of a green triangle at the top",
    "the quick brown fox jumps over the lazy dog. what colour is the sky? it is blue.",
    "user assistant system hello there, here is an image of a yellow star in the centre",
]


def make_tiny_lm(folder: Path, tie_word_embeddings: bool = True) -> Path:
    """Write a random 2-layer Llama and a trained-here BPE tokenizer to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_clip(folder: Path) -> Path:
    """Write a random 2-layer ViT CLIP in open_clip's local-dir format (config + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }))
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_untied_lm_dir(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm_untied"), tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def tiny_config(lm_dir: Path, clip_dir: Path, **overrides):
    from model.config import GroundedConfig
    return GroundedConfig(lm=str(lm_dir), visual=f"local-dir:{clip_dir}", visual_pretrained=None,
                          n_visual_tokens=2, emb_dim=8, **overrides)


@pytest.fixture(scope="session")
def tiny_model(tiny_lm_dir, tiny_clip_dir):
    """A tiny GroundedLM shared by read-only tests (build your own to train or modify it)."""
    from model.grounded import GroundedLM
    return GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")


@pytest.fixture
def colour_images():
    """Three plain images that differ in colour."""
    from PIL import Image
    return [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
