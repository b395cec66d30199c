"""Rendering conversations into token runs and images, and the context-window guard."""
from PIL import Image

from model.lm import load_lm
from model.prompt import Turn, count_tokens, fit_context, render, render_with_target
import pytest


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return load_lm(str(tiny_lm_dir), quantize="none", device="cpu")[1]


def test_images_land_where_they_were_in_any_turn(tokenizer):
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    turns = [Turn("user", [red, "describe the image."]), Turn("assistant", ["a red square"]),
             Turn("user", ["and this one?", blue])]
    segments = render(turns, tokenizer, "chat")
    assert [s for s in segments if isinstance(s, Image.Image)] == [red, blue]
    text = tokenizer.decode([t for s in segments if isinstance(s, list) for t in s])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "describe the image." in text and "and this one?" in text


def test_qa_format_is_fromage_dialogue(tokenizer):
    segments = render([Turn("user", ["hello there"])], tokenizer, "qa")
    text = tokenizer.decode([t for s in segments for t in s])
    assert text.endswith("Q: hello there\nA:")


@pytest.mark.parametrize("fmt", ["chat", "qa"])
def test_training_target_is_the_last_reply_and_ends_the_turn(tokenizer, fmt):
    turns = [Turn("user", [Image.new("RGB", (8, 8)), "describe the image."]),
             Turn("assistant", ["a small red circle [RET]"])]
    prompt, target = render_with_target(turns, tokenizer, fmt)
    target_text = tokenizer.decode([t for s in target for t in s])
    assert "a small red circle" in target_text and "[RET]" in target_text
    assert target_text.rstrip().endswith("<|im_end|>")
    prompt_text = tokenizer.decode([t for s in prompt if isinstance(s, list) for t in s])
    assert "a small red circle" not in prompt_text


def test_context_guard_drops_oldest_turns_never_the_current_one(tokenizer):
    history = [Turn("user" if i % 2 == 0 else "assistant", [f"the quick brown fox number {i}"]) for i in range(10)]
    turns = history + [Turn("user", ["what colour is the sky?"])]
    budget = count_tokens(render(turns[-3:], tokenizer, "chat"), 2)
    kept, notice = fit_context(turns, tokenizer, "chat", 2, budget)
    assert kept[-1] is turns[-1] and len(kept) == 3
    assert "oldest" in notice
    assert fit_context(turns, tokenizer, "chat", 2, 10_000) == (turns, None)


def test_context_guard_cuts_a_current_message_that_alone_is_too_long(tokenizer):
    image = Image.new("RGB", (8, 8))
    turns = [Turn("user", [image, "the quick brown fox jumps over the lazy dog " * 50])]
    kept, notice = fit_context(turns, tokenizer, "chat", 2, 60)
    assert count_tokens(render(kept, tokenizer, "chat"), 2) <= 60
    assert kept[0].images == [image] and "cut" in notice
