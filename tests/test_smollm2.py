"""End-to-end checks on the real SmolLM2-135M-Instruct, loaded 4-bit on the CPU from its PyPI package."""
import bitsandbytes as bnb
import pytest
import torch

from conftest import tiny_config
from model.generate import GenerationSettings, Retrieved, Text, stream_reply
from model.grounded import GroundedLM
from model.lm import SMOLLM2, smollm2_folder
from model.prompt import Turn


@pytest.fixture(scope="module")
def smol(tiny_clip_dir):
    config = tiny_config(SMOLLM2, tiny_clip_dir)
    return GroundedLM(config, quantize="4bit", device="cpu")


def reply(model, turns, search=None, **settings):
    events = list(stream_reply(model, turns, GenerationSettings(**settings), search=search))
    return "".join(e.delta for e in events if isinstance(e, Text)), events


def test_loads_from_the_package_into_a_cached_folder_in_4bit(smol):
    assert (smollm2_folder() / "config.json").is_file()
    assert isinstance(smol.lm.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert smol.config.lm_dim == 576 and smol.tied


def test_chat_reply_is_sensible_and_stops_at_eos(smol):
    text, events = reply(smol, [Turn("user", ["What is the capital of France?"])], max_new_tokens=24)
    assert "Paris" in text
    text, events = reply(smol, [Turn("user", ["What is 2+2?"])], max_new_tokens=24)
    assert "4" in text and events[-1].stats["stop"] == "eos"


def test_spliced_image_embeddings_steer_generation(smol, colour_images):
    red, green, _ = colour_images
    question = "Describe the image."
    assert smol.embed_conversation([Turn("user", [red, question])]).shape[1] == \
        smol.embed_conversation([Turn("user", [question])]).shape[1] + smol.config.n_visual_tokens
    weight = smol.input_mapping.weight
    shared = weight.detach().clone()  # the module's model is shared: put its weights back as they were
    torch.manual_seed(0)
    with torch.no_grad():  # an untrained map, scaled so the images matter to the LM
        weight.normal_(std=0.5)
    try:
        red_text, _ = reply(smol, [Turn("user", [red, question])], max_new_tokens=12)
        green_text, _ = reply(smol, [Turn("user", [green, question])], max_new_tokens=12)
    finally:
        with torch.no_grad():
            weight.copy_(shared)
    assert red_text and green_text and red_text != green_text


def test_forced_ret_round_trip(smol):
    queries = []

    class Hit:
        id = 42

    def search(query, exclude):
        queries.append(query)
        return [Hit()]

    text, events = reply(smol, [Turn("user", ["Show me a picture of a cat."])], max_new_tokens=12,
                         ret_scale_factor=1e6, max_images=1, search=search)
    assert isinstance(events[0], Retrieved) and events[0].hits[0].id == 42
    assert queries[0].shape == (8,) and torch.isclose(queries[0].norm(), torch.tensor(1.0))
    assert text and events[-1].stats["new_tokens"] > 1, "decoding goes on after [RET]"
