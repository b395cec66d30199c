"""The batched decoder (`model/serving.py`): many replies in one forward per step, each as if decoded alone."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import DecodeGate, tiny_config
from model.generate import Done, GenerationSettings, Retrieved, Text, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn
from model.serving import Busy, DecodeEngine, Waiting

PROMPTS = ("hello", "describe the image. show me a picture of a green triangle at the top",
           "what colour is the sky?", "the quick brown fox")


def said(events) -> str:
    return "".join(e.delta for e in events if isinstance(e, Text))


def solo(model, turns, settings, search=None):
    return list(stream_reply(model, turns, settings, search))


@pytest.fixture(scope="module")
def model(tiny_lm_dir, tiny_clip_dir):
    """A tiny model of this module's own (the gate's hook stays on it), its LM's matrices redrawn larger: the
    shared tiny LM answers greedily with newlines only, and equal newlines would prove nothing."""
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.lm.parameters():
            if weight.ndim >= 2:
                weight.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def gate(model):
    return DecodeGate(model)


@pytest.fixture
def engine(model):
    engine = DecodeEngine(model, max_batch=8)
    yield engine
    engine.close()


def test_greedy_replies_in_one_batch_are_the_solo_replies_token_for_token(model, engine, colour_images):
    conversations = [[Turn("user", [p])] for p in PROMPTS] + [[Turn("user", [colour_images[0], "what is this?"])]]
    lengths = [5, 17, 9, 30, 12]  # rows leave at different steps
    streams = []
    for turns, n in zip(conversations, lengths):
        stream = engine.submit(turns, GenerationSettings(max_new_tokens=n))
        streams.append((stream, [next(stream)]))  # the next reply joins while the earlier ones are mid-way
    replies = set()
    for turns, n, (stream, first) in zip(conversations, lengths, streams):
        expected, got = solo(model, turns, GenerationSettings(max_new_tokens=n)), first + [*stream]
        assert said(got) == said(expected), turns
        assert got[-1].stats["new_tokens"] == expected[-1].stats["new_tokens"]
        replies.add(said(expected).strip())
    assert len(replies) == len(conversations), "every prompt gets a reply of its own"


def test_each_reply_keeps_its_own_settings_in_a_shared_batch(model, engine):
    turns = [Turn("user", ["tell me a story"])]
    greedy, sampled = GenerationSettings(max_new_tokens=12), GenerationSettings(max_new_tokens=12, temperature=1.5,
                                                                               top_p=0.9, seed=7)
    streams = [engine.submit(turns, greedy), engine.submit(turns, sampled)]
    assert [said(s) for s in streams] == [said(solo(model, turns, greedy)), said(solo(model, turns, sampled))]


def test_ret_retrieves_for_its_own_row_only(tiny_lm_dir, tiny_clip_dir):
    eager = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    eager.ret_embedding.data *= 1e4  # [RET] wins wherever it is allowed
    queries = []

    def search(query, exclude):
        queries.append(query)
        return [type("Hit", (), {"id": 7})()]

    engine = DecodeEngine(eager)
    try:
        turns = [Turn("user", ["show me a green triangle"])]
        settings = GenerationSettings(max_new_tokens=6, ret_scale_factor=3.0, max_images=1)
        with_search, without = engine.submit(turns, settings, search), engine.submit(turns, settings)
        retrieving, plain = [*with_search], [*without]
    finally:
        engine.close()
    assert [type(e) for e in retrieving if isinstance(e, Retrieved)] == [Retrieved] and len(queries) == 1
    assert not any(isinstance(e, Retrieved) for e in plain)
    expected = solo(eager, turns, settings, search)
    assert said(retrieving) == said(expected)
    torch.testing.assert_close(queries[0], queries[1])  # the batched row's query is the solo one


def test_stop_ends_one_reply_and_leaves_the_others_intact(model, engine, gate):
    turns_a, turns_b = [Turn("user", ["a long story please"])], [Turn("user", ["the quick brown fox"])]
    settings = GenerationSettings(max_new_tokens=40)
    stop = threading.Event()
    with gate.closed():
        mine = engine.submit(turns_a, settings, cancel=stop)
        theirs = engine.submit(turns_b, settings)
        assert gate.held.wait(30), "both replies are decoding"
        stop.set()
    stopped, finished = [*mine], [*theirs]
    assert stopped[-1].stats["stop"] == "cancelled" and stopped[-1].stats["new_tokens"] <= 2
    assert said(finished) == said(solo(model, turns_b, settings))


def test_a_reply_waits_for_a_row_and_sees_its_place_in_line(model, gate):
    engine = DecodeEngine(model, max_batch=1, max_waiting=2)
    try:
        with gate.closed():
            first = engine.submit([Turn("user", ["hello"])], GenerationSettings(max_new_tokens=8))
            assert gate.held.wait(30)
            second = engine.submit([Turn("user", ["hello again"])], GenerationSettings(max_new_tokens=3))
            assert next(second) == Waiting(ahead=0)
        assert isinstance([*first][-1], Done) and isinstance([*second][-1], Done)
    finally:
        engine.close()


def test_beyond_the_waiting_line_and_past_the_wait_limit_a_reply_is_told_the_server_is_busy(model, gate):
    engine = DecodeEngine(model, max_batch=1, max_waiting=1, max_wait_s=0.4)
    try:
        with gate.closed():
            first = engine.submit([Turn("user", ["hello"])], GenerationSettings(max_new_tokens=4))
            assert gate.held.wait(30)
            second = engine.submit([Turn("user", ["hello"])], GenerationSettings(max_new_tokens=4))
            with pytest.raises(Busy, match="busy"):
                engine.submit([Turn("user", ["hello"])], GenerationSettings(max_new_tokens=4))
            assert next(second) == Waiting(ahead=0)  # told after half a second in line: past the limit
        assert isinstance([*first][-1], Done)
        with pytest.raises(Busy, match="within 0.4 s"):
            [*second]
    finally:
        engine.close()


def test_a_reader_that_goes_away_frees_its_row(engine):
    stream = engine.submit([Turn("user", ["a long story please"])], GenerationSettings(max_new_tokens=400))
    next(stream)
    stream.close()  # the tab was closed mid-reply
    follow = engine.submit([Turn("user", ["hello"])], GenerationSettings(max_new_tokens=2))
    assert isinstance([*follow][-1], Done)
    assert engine.running == 0, "the abandoned reply left before the next one was done"


def test_a_failing_search_ends_only_its_own_reply(tiny_lm_dir, tiny_clip_dir):
    eager = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    eager.ret_embedding.data *= 1e4

    def broken(query, exclude):
        raise OSError("the index is gone")

    engine = DecodeEngine(eager)
    try:
        settings = GenerationSettings(max_new_tokens=6, ret_scale_factor=3.0, max_images=1)
        failing = engine.submit([Turn("user", ["show me"])], settings, broken)
        fine = engine.submit([Turn("user", ["hello"])], GenerationSettings(max_new_tokens=6))
        with pytest.raises(OSError, match="index is gone"):
            [*failing]
        assert isinstance([*fine][-1], Done)
    finally:
        engine.close()
