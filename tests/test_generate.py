"""Streaming generation: KV-cached decoding, [RET] retrieval events, stopping, sampling, the context guard."""
import threading
from dataclasses import dataclass

import pytest
import torch

from conftest import tiny_config
from model.generate import Done, GenerationSettings, Notice, Retrieved, Text, scale_ret_logit, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn, render


@dataclass(frozen=True)
class Hit:
    id: int


class RecordingSearch:
    """A collection of ids 0..9: returns the lowest id not excluded, and records every query."""

    def __init__(self):
        self.queries, self.excluded = [], []

    def __call__(self, query, exclude):
        self.queries.append(query)
        self.excluded.append(set(exclude))
        return [Hit(i) for i in range(10) if i not in exclude][:3]


def reply_text(events):
    return "".join(e.delta for e in events if isinstance(e, Text))


def test_cached_greedy_decoding_matches_transformers_generate(tiny_model):
    turns = [Turn("user", ["what colour is the sky?"])]
    events = list(stream_reply(tiny_model, turns, GenerationSettings(max_new_tokens=12)))
    ids = torch.tensor([[t for s in render(turns, tiny_model.tokenizer, "chat") for t in s]])
    reference = tiny_model.lm.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert reply_text(events) == tiny_model.tokenizer.decode(reference, skip_special_tokens=True)
    done = events[-1]
    assert isinstance(done, Done) and done.stats["new_tokens"] == len(reference)


def test_ret_retrieves_with_the_hidden_state_where_ret_is_the_input_then_text_continues(tiny_model):
    search = RecordingSearch()
    turns = [Turn("user", ["show me a picture of a red circle"])]
    events = list(stream_reply(tiny_model, turns, GenerationSettings(max_new_tokens=8, ret_scale_factor=1e6,
                                                                     max_images=1, exclude={0}), search))
    assert isinstance(events[0], Retrieved) and [h.id for h in events[0].hits] == [1]
    assert search.excluded == [{0}]
    assert events[-1].stats["images"] == 1
    assert events[-1].stats["new_tokens"] > 1, "decoding goes on after [RET]"
    # Recompute without a cache: the prompt then [RET] as input; its last hidden state is the query.
    prompt = tiny_model.embed_conversation(turns)
    ret = tiny_model.embed_ids(torch.tensor([[tiny_model.ret_id]]))
    hidden, _ = tiny_model.hidden_states(torch.cat([prompt, ret], 1))
    assert torch.allclose(search.queries[0], tiny_model.ret_query(hidden[0, -1]), atol=1e-5)


def test_images_already_shown_are_excluded_and_the_count_is_bounded(tiny_model):
    search = RecordingSearch()
    events = list(stream_reply(tiny_model, [Turn("user", ["pictures please"])],
                               GenerationSettings(max_new_tokens=10, ret_scale_factor=1e6, max_images=2,
                                                  exclude={3}), search))
    retrieved = [e for e in events if isinstance(e, Retrieved)]
    assert len(retrieved) == 2 and len(search.queries) == 2
    assert search.excluded == [{3}, {3, 0}]
    assert [h.id for e in retrieved for h in e.hits] == [0, 1]


def test_no_search_function_means_no_retrieval(tiny_model):
    events = list(stream_reply(tiny_model, [Turn("user", ["hi"])], GenerationSettings(max_new_tokens=5,
                                                                                        ret_scale_factor=1e6)))
    assert not any(isinstance(e, Retrieved) for e in events)


def test_min_words_before_ret_delays_retrieval(tiny_model):
    search = RecordingSearch()
    events = list(stream_reply(tiny_model, [Turn("user", ["hi"])],
                               GenerationSettings(max_new_tokens=6, ret_scale_factor=1e6, min_words_before_ret=1000),
                               search))
    assert not any(isinstance(e, Retrieved) for e in events) and search.queries == []


def test_a_checkpoint_whose_ret_opens_replies_retrieves_first_or_not_at_all(tiny_lm_dir, tiny_clip_dir):
    model = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir, ret_opens_reply=True), quantize="none", device="cpu")
    eager = GenerationSettings(max_new_tokens=6, ret_scale_factor=1e6, max_images=2)
    events = list(stream_reply(model, [Turn("user", ["pictures please"])], eager, RecordingSearch()))
    assert isinstance(events[0], Retrieved) and sum(isinstance(e, Retrieved) for e in events) == 1
    late = GenerationSettings(max_new_tokens=6, ret_scale_factor=1e6, min_words_before_ret=1)
    assert not any(isinstance(e, Retrieved) for e in stream_reply(model, [Turn("user", ["hi"])], late,
                                                                  RecordingSearch()))


def test_ret_scale_factor():
    logit = torch.tensor(-2.0)
    assert scale_ret_logit(logit, 0) == float("-inf")
    assert scale_ret_logit(logit, 1) == logit
    assert scale_ret_logit(logit, 3) == 6.0, "above 1, a negative logit becomes more likely (GILL)"
    assert scale_ret_logit(logit, 0.5) < logit


def test_cancel_stops_the_stream(tiny_model):
    cancel = threading.Event()
    stream = stream_reply(tiny_model, [Turn("user", ["hello there"])], GenerationSettings(max_new_tokens=50),
                          cancel=cancel)
    cancel.set()
    events = list(stream)
    assert events[-1].stats["stop"] == "cancelled" and events[-1].stats["new_tokens"] == 0


def test_token_limit_and_stats(tiny_model, colour_images):
    def stats(parts: list) -> dict:
        return list(stream_reply(tiny_model, [Turn("user", parts)], GenerationSettings(max_new_tokens=3)))[-1].stats

    text_only, with_image = stats(["hello"]), stats([colour_images[0], "hello"])
    assert text_only["stop"] == "length" and text_only["new_tokens"] == 3, "the tiny model says no EOS this soon"
    assert with_image["prompt_tokens"] - text_only["prompt_tokens"] == tiny_model.config.tokens_per_image


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(tiny_model):
    turns = [Turn("user", ["tell me a story"])]
    sampled = dict(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    a = reply_text(stream_reply(tiny_model, turns, GenerationSettings(**sampled)))
    b = reply_text(stream_reply(tiny_model, turns, GenerationSettings(**sampled)))
    assert a == b
    greedy = reply_text(stream_reply(tiny_model, turns, GenerationSettings(max_new_tokens=10)))
    top1 = reply_text(stream_reply(tiny_model, turns, GenerationSettings(max_new_tokens=10, temperature=1.0, top_k=1, seed=1)))
    assert top1 == greedy


def test_context_guard_trims_old_turns_and_says_so(tiny_model, colour_images):
    history = [Turn("user", [colour_images[0], "the quick brown fox " * 20]), Turn("assistant", ["ok"])]
    events = list(stream_reply(tiny_model, history + [Turn("user", ["and now?"])],
                               GenerationSettings(max_new_tokens=2, context_tokens=30)))
    assert isinstance(events[0], Notice) and "oldest" in events[0].message
    assert events[-1].stats["prompt_tokens"] <= 30


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        GenerationSettings(top_p=0)
    with pytest.raises(ValueError):
        GenerationSettings(max_new_tokens=0)
