"""The judge the next ESPER stage trains under, as shipped (assets/esper-judge: judge11 of the README's "To continue
it" commands, the judge `demo-esper` was trained under; its figures in docs/esper.md): the demo's CLIP with its text
tower taught to rank a description of one object above the same with a thing the scene does not hold added, colour
and shape in order above the reverse, a fuller description above one that names less (in ESPER's sentences too),
above itself with the background's word standing in for its shape or colour, and above itself with another shape
beside its shape. Held on every one-object scene to the figures its `train_metrics.json` recorded when it was made,
less a margin for another CPU's arithmetic."""
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
    return model, tokenizer, "cpu", one.scenes, train_judge.image_embeddings(model, one.pixels, "cpu")


@pytest.fixture(scope="module")
def recorded():
    metrics = json.loads((JUDGE / "train_metrics.json").read_text())
    assert all(metrics[option] > 0 for option, _ in train_judge.FIGURES), "trained for every reading it is held to"
    return metrics


def test_a_thing_that_is_not_there_costs(judged, recorded):
    assert recorded["alone_first"] == 1.0
    assert train_judge.alone_first(*judged) >= recorded["alone_first"] - 0.01


def test_naming_colour_and_shape_in_order_is_worth_more_than_either_or_the_reverse(judged, recorded):
    assert train_judge.in_order_first(*judged) >= recorded["in_order_first"] - 0.01
    assert train_judge.fuller_first(*judged) >= recorded["fuller_first"] - 0.03
    assert train_judge.fuller_sentence_first(*judged) >= recorded["fuller_sentence_first"] - 0.03


def test_the_backgrounds_word_does_not_stand_in_for_the_shape_or_the_colour(judged, recorded):
    assert recorded["object_first"] == 1.0
    assert train_judge.object_first(*judged) >= recorded["object_first"] - 0.01


def test_a_description_reads_the_shape_in_its_place_and_not_two_shapes_side_by_side(judged, recorded):
    assert train_judge.shape_first(*judged) >= recorded["shape_first"] - 0.03
    assert train_judge.single_shape_first(*judged) >= recorded["single_shape_first"] - 0.03
