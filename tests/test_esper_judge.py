"""The judge the next ESPER stage trains under, as shipped (assets/esper-judge, judge4 of README's "Aligning
without captions"): the demo's CLIP with its text tower taught to rank a description of one object above the same
with a thing the scene does not hold added, and a fuller one above one that names less. Held to the figures of its
`train_metrics.json` on every one-object scene, less a margin."""
import json

import open_clip
import pytest

from model.checkpoint import ASSETS
from model.training import train_judge
from model.training.train_clip import one_object_cache, tokenizer_for

JUDGE = ASSETS / "esper-judge"


@pytest.fixture(scope="module")
def judged():
    model, _ = open_clip.create_model_from_pretrained(f"local-dir:{JUDGE}", device="cpu")
    model.eval()
    tokenizer = tokenizer_for(model.context_length)
    one = one_object_cache(tokenizer, model.visual.image_size[0], copies=1)
    return model, tokenizer, one.scenes, train_judge.image_embeddings(model, one.pixels, "cpu")


def test_it_is_what_its_metrics_say():
    metrics = json.loads((JUDGE / "train_metrics.json").read_text())
    assert metrics["absent"] > 0 and metrics["order"] > 0 and metrics["alone_first"] == 1.0


def test_a_thing_that_is_not_there_costs(judged):
    model, tokenizer, scenes, images = judged
    assert train_judge.alone_first(model, tokenizer, "cpu", scenes, images) >= 0.99


def test_naming_colour_and_shape_in_order_is_worth_more_than_either(judged):
    model, tokenizer, scenes, images = judged
    assert train_judge.in_order_first(model, tokenizer, "cpu", scenes, images) >= 0.99
    assert train_judge.fuller_first(model, tokenizer, "cpu", scenes, images) >= 0.75
