"""A conversation's next turn reads only what is new (`model/prefix_cache.py`), and gets what a fresh read gets."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from model.grounded import GroundedLM
from model.prefix_cache import PrefixCache
from model.prompt import Look, Turn, render


@pytest.fixture
def model(tiny_lm_dir, tiny_clip_dir):
    torch.manual_seed(2)
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, region_grid=2, request_tokens=2), quantize="none",
                       device="cpu")
    with torch.no_grad():
        for p in model.perception.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def prompt(model, turns, look=False):
    return render(turns, model.tokenizer, model.config.prompt_format, look)


def before_look(segments):
    """What `prefill` remembers of a prompt: all of it, or what comes before its request."""
    return segments[:next((i for i, s in enumerate(segments) if isinstance(s, Look)), None)]


def fresh_prefill(model, segments):
    """The same prefill with nothing remembered."""
    kept, model.prefixes = model.prefixes, PrefixCache(model.prefixes.max_bytes)
    try:
        return model.prefill(segments)
    finally:
        model.prefixes = kept


def assert_same_read(got, expected):
    (last, cache, looked), (last_ref, cache_ref, looked_ref) = got, expected
    torch.testing.assert_close(last, last_ref, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == cache_ref.get_seq_length()
    for layer, ref in zip(cache.layers, cache_ref.layers):
        torch.testing.assert_close(layer.keys, ref.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values, ref.values, rtol=1e-4, atol=1e-5)
    for a, b in zip(looked, looked_ref, strict=True):
        torch.testing.assert_close(a.attention, b.attention, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("look", [False, True], ids=["plain", "looking"])
def test_the_next_turn_reads_only_what_is_new_and_gets_what_a_fresh_read_gets(model, colour_images, look):
    red = colour_images[0]
    first = [Turn("user", [red, "what colour is this?"])]
    second = first + [Turn("assistant", ["It is red."]), Turn("user", ["and what shape?"])]
    with torch.no_grad():
        model.prefill(prompt(model, first, look))
        remembered = len(model.embed_segments(before_look(prompt(model, first, look))))
        segments = prompt(model, second, look)
        known, _ = model.prefixes.reuse(model.embed_segments(before_look(segments)), limit=10 ** 6)
        got = model.prefill(segments)
        expected = fresh_prefill(model, segments)
    assert known == remembered, "the first turn, up to its request if any, is not read again"
    assert_same_read(got, expected)


def test_new_mappings_are_never_served_keys_and_values_made_with_the_old(model, colour_images):
    turns = [Turn("user", ["look:", colour_images[1], "what is this?"])]
    segments = prompt(model, turns)
    with torch.no_grad():
        model.prefill(segments)
        model.input_mapping.weight.mul_(1.5)  # a training step, or another checkpoint's mappings
        embeds = model.embed_segments(segments)
        known, _ = model.prefixes.reuse(embeds, limit=len(embeds))
        got = model.prefill(segments)
        expected = fresh_prefill(model, segments)
    assert known == len(segments[0]), "reused up to the image, not into it"
    assert_same_read(got, expected)


def test_a_growing_conversation_keeps_one_entry_and_nothing_beyond_the_bound_is_kept(model):
    turns = [Turn("user", ["hello"])]
    with torch.no_grad():
        for reply in ("hi there", "how can I help?", "goodbye"):
            model.prefill(prompt(model, turns))
            turns += [Turn("assistant", [reply]), Turn("user", ["tell me more"])]
        assert len(model.prefixes) == 1, "each turn's entry replaces the one it extends"
        model.prefixes.max_bytes = 1  # smaller than any prompt
        model.prefill(prompt(model, [Turn("user", ["something else"])]))
    assert len(model.prefixes) == 1, "a prompt larger than the bound is not kept"
