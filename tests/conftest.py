"""Shared fixtures: tiny random models built on the spot, so tests run offline in seconds.

The tiny LM is a 2-layer Llama with a small BPE tokenizer trained here; the tiny CLIP is a 2-layer
ViT saved in open_clip's `local-dir:` format. Both go through the same loading code as real models.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch
from PIL import Image

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


def make_sensitive_lm(tiny_lm_dir: Path, folder: Path, std: float) -> Path:
    """The tiny LM with its matrices redrawn ~N(0, std): with the usual 0.02 a random LM's output hardly depends
    on earlier tokens, so nothing an image prefix does could change what it says, and nothing could be learnt."""
    import shutil
    from transformers import LlamaForCausalLM

    shutil.copytree(tiny_lm_dir, folder, dirs_exist_ok=True)
    lm = LlamaForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    lm.save_pretrained(folder)
    return folder


TINY_CLIP_CFG = {  # open_clip's CLIP(**cfg): a 2-layer ViT, and a text tower for stage 1's tests
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(folder: Path) -> Path:
    """Write a random tiny CLIP in open_clip's local-dir format, as stage 1 saves its encoder."""
    from model.training.train_clip import build_model, save
    torch.manual_seed(0)
    save(build_model(TINY_CLIP_CFG), TINY_CLIP_CFG, folder)
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
    """FROMAGe's layout (CLS tokens, linear mappings) at tiny sizes, unless `overrides` say otherwise; fp32 compute
    on every CPU, bf16-native or not, so that equalities checked on it hold the same everywhere."""
    from model.config import GroundedConfig
    layout = {"n_visual_tokens": 2, "region_grid": 0, "projector": "linear", "emb_dim": 8, "compute_dtype": "float32"}
    return GroundedConfig(lm=str(lm_dir), visual=f"local-dir:{clip_dir}", visual_pretrained=None, **layout | overrides)


@pytest.fixture(scope="session")
def tiny_model(tiny_lm_dir, tiny_clip_dir):
    """A tiny GroundedLM shared by read-only tests (build your own to train or modify it)."""
    from model.grounded import GroundedLM
    return GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")


@pytest.fixture
def colour_images():
    """Three plain images that differ in colour."""
    return [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]


# ---- the app on a tiny model: shared by the handler, API and browser tests ----------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's, driven through Playwright
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
REPLY_DONE = "!document.querySelector('#chatbot .pending') && !document.querySelector('#message .generating')"


def make_tiny_app(lm_dir: Path, clip_dir: Path, folder: Path, gallery_size: int = 12, request_tokens: int = 0,
                  retrieves: bool = True):
    """A ChatApp over a tiny model (with a request module of `request_tokens`) and `gallery_size` shapes-world
    images indexed in `folder`. The model retrieves on demand: its `[RET]` row is scaled so that its logit is
    large in magnitude, and a `[RET]` scale factor above 1 (GILL's `|logit| * factor`) then always picks it
    while images are allowed; unless `retrieves` is False (a checkpoint ESPER made)."""
    import app
    from model.grounded import GroundedLM
    from retrieval_index.index import ImageIndex

    model = GroundedLM(tiny_config(lm_dir, clip_dir, request_tokens=request_tokens, retrieves=retrieves),
                       quantize="none", device="cpu")
    model.ret_embedding.data *= 1e4
    index_dir = app.demo_gallery(model, folder, size=gallery_size)
    return app.ChatApp(model, ImageIndex.load(index_dir, model.fingerprint), title="tiny")


class DecodeGate:
    """Holds a model's decoding steps while closed: a reply stays mid-way for exactly as long as a test needs, on
    a fast machine or a slow one. A step is known by what it embeds, the token just chosen for each row (ids
    (B, 1)); prompts, searches and the request pass (token runs, embedded as (T,)) go through, however few of
    their positions are not known yet (`GroundedLM.prefixes`)."""

    def __init__(self, model) -> None:
        self.open, self.held = threading.Event(), threading.Event()
        self.open.set()
        embed_ids = model.embed_ids

        def held_embed_ids(ids: torch.Tensor) -> torch.Tensor:
            if ids.dim() == 2 and ids.shape[1] == 1 and not self.open.is_set():
                self.held.set()
                self.open.wait()
            return embed_ids(ids)

        model.embed_ids = held_embed_ids

    @contextlib.contextmanager
    def closed(self):
        """Decoding waits inside this block; `held` is set once a reply is waiting."""
        self.held.clear()
        self.open.clear()
        try:
            yield self
        finally:
            self.open.set()


def serve(chat_app, max_concurrency: int | None = 2):
    """Launch `chat_app` in this process on a free port, as `python app.py` does; returns (demo, url)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = chat_app.build(max_concurrency)
    chat_app.launch(demo, port=port, prevent_thread_lock=True)
    return demo, f"http://127.0.0.1:{port}/"


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def teach_reasoner(model, image: Image.Image, question: str, answer: str, reason: str, steps: int = 400) -> str:
    """Give `model` a Reasoner that has learnt one monologue by heart: for `question` about `image`, ask the question
    itself (Q1), hear what this model's Observer really answers (returned), then say `answer` and `reason`. The
    training rows are the trainer's own (`monologue_row`); the adapter starts from a fixed seed, whatever ran
    before, and trains until each of its tokens is the likeliest (a tiny LM's logits stay near uniform: greedy
    decoding needs only the order)."""
    from model.monologue import observe
    from model.reasoner import reasoner_parameters, reasoning
    from model.training.monologue import batch_loss, monologue_row

    heard = "".join(t.delta for t in observe(model, [image], question))
    torch.manual_seed(0)
    model.add_reasoner(rank=8)
    row = monologue_row(model, question, [(question, heard)], answer, reason)
    ids, labels = torch.tensor([row[0]]), torch.tensor(row[1][1:])
    learnt = labels != -100

    def by_heart() -> bool:
        with torch.no_grad(), reasoning():
            likeliest = model.lm(input_ids=ids).logits[0, :-1].argmax(-1)
        return bool((likeliest[learnt] == labels[learnt]).all())

    optimizer = torch.optim.Adam(reasoner_parameters(model.lm), lr=1e-2)
    for _ in range(steps):
        if by_heart():
            break
        loss = batch_loss(model, [row])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert by_heart(), "the Reasoner did not learn its monologue by heart"
    return heard
