"""The bundled ESPER checkpoint (assets/demo-esper) on its shipped weights: the demo's encoder with input mappings
aligned by reinforcement learning from a CLIP judge alone, no caption seen. It loads offline by its preset from any
working directory, never retrieves, even when asked for a picture, and names the shape and colour of one-object test
scenes. SmolLM2 in 4 bits on the CPU.

The threshold is the count the shipped weights get on these fixed scenes, less a margin, in line with the rate
`python -m model.training.evaluate --compare` measured on 300 test images (README: Aligning without captions)."""
import json

import pytest

from model.checkpoint import ASSETS
from model.generate import GenerationSettings, Retrieved, Text, stream_reply
from model.grounded import GroundedLM
from model.prompt import Turn
from model.training.evaluate import greedy_replies
from model.training.train import SUMMARY_NAME
from model.world import shapes

ESPER = ASSETS / "demo-esper"
ONE_OBJECT_SCENES = 20  # the first one-object scenes of the test split
# On these scenes the shipped weights name the shape and colour, and nothing more, for 18 of 20.
ONE_OBJECT_RIGHT = 17


@pytest.fixture(scope="module")
def esper():
    return GroundedLM.from_pretrained("demo-esper", device="cpu")


def test_it_is_the_demos_encoder_aligned_without_captions(esper):
    summary = json.loads((ESPER / SUMMARY_NAME).read_text())
    assert summary["captions_seen"] == 0 and summary["holdout_kept_out"]
    assert esper.visual.source == f"local-dir:{(ASSETS / 'demo' / 'clip').resolve()}"
    assert esper.config.quantize == "4bit" and not esper.config.retrieves


def test_it_names_the_shape_and_colour_of_one_object(esper):
    scenes = [s for s in (shapes.sample("test", i, esper.visual.image_size[0]) for i in range(100))
              if len(s.scene.objects) == 1][:ONE_OBJECT_SCENES]
    replies = greedy_replies(esper, [[Turn("user", [s.image, "Describe the image."])] for s in scenes], 32)
    outcomes = []
    for s, reply in zip(scenes, replies):
        truth, named = s.scene.objects[0], shapes.described_objects(reply.text)
        outcomes.append((s.caption, reply.text, len(named) == 1 and (named[0].shape, named[0].colour) ==
                         (truth.shape, truth.colour)))
    assert sum(right for *_, right in outcomes) >= ONE_OBJECT_RIGHT, outcomes


def test_asked_for_a_picture_it_answers_in_words_and_never_retrieves(esper):
    searched = []
    turns = [Turn("user", ["Show me a picture of a big red circle."])]
    events = list(stream_reply(esper, turns, GenerationSettings(max_new_tokens=16, ret_scale_factor=3.0),
                               search=lambda query, exclude: searched.append(query) or []))
    assert not searched and not any(isinstance(e, Retrieved) for e in events)
    assert "".join(e.delta for e in events if isinstance(e, Text)).strip()
