"""The bundled demo (assets/demo) on its shipped weights: it loads offline from any working directory,
describes pictures through the decoding the app uses (`stream_reply`), and its `[RET]` queries find the
described picture. SmolLM2 in 4 bits on the CPU."""
import pytest
from safetensors import safe_open

from model import shapes
from model.checkpoint import ASSETS
from model.config import WEIGHTS_NAME
from model.generate import GenerationSettings, Retrieved, Text, stream_reply
from model.grounded import GroundedLM
from model.evaluate import ret_queries
from model.prompt import Turn
from model.train import request_phrase, retrieval_reply

DEMO = ASSETS / "demo"
pytestmark = pytest.mark.skipif(
    not (DEMO / WEIGHTS_NAME).is_file(),
    reason=f"{DEMO / WEIGHTS_NAME} does not exist yet: train it with `python -m model.train --out assets/demo`")


@pytest.fixture(scope="module")
def demo():
    return GroundedLM.from_pretrained("demo", quantize="4bit", device="cpu")


@pytest.fixture(scope="module")
def gallery(demo):
    """The first 100 test scenes, indexed with the demo's image mapping."""
    items = [shapes.sample("test", i, demo.visual.image_size[0]) for i in range(100)]
    return items, demo.embed_images([s.image for s in items])


def reply(model, turns, search):
    """The reply's text up to its first retrieval (where decoding stops), and that retrieval if any."""
    text = ""
    for event in stream_reply(model, turns, GenerationSettings(max_new_tokens=40), search=search):
        if isinstance(event, Retrieved):
            return text, event
        text += event.delta if isinstance(event, Text) else ""
    return text, None


def test_the_demo_is_the_offline_bundle(demo):
    assert demo.config.lm == "smollm2-135m-instruct" and demo.visual.source == f"local-dir:{(DEMO / 'clip').resolve()}"
    with safe_open(DEMO / WEIGHTS_NAME, "pt") as f:
        assert f.metadata()["fingerprint"] == demo.fingerprint, "the shipped weights are the ones loaded"


def test_the_demo_describes_test_images_exactly(demo, gallery):
    items, _ = gallery
    one_object = [s for s in items if len(s.scene.objects) == 1][:5]
    outcomes = []
    for s in one_object:  # a retrieval while describing counts as a wrong answer
        text, retrieved = reply(demo, [Turn("user", [s.image, "Describe the image."])], lambda query, exclude: [])
        parsed = shapes.parse_caption(text)
        outcomes.append((s.caption, text, retrieved is None and parsed is not None and
                         parsed.objects == s.scene.objects))
    assert sum(right for *_, right in outcomes) >= 4, outcomes


def test_the_demo_retrieves_the_described_picture(demo, gallery):
    """FROMAGe's protocol: the [RET] hidden state after "<caption>" in the reply queries the gallery.

    (Whether the shipped demo *emits* [RET] on its own at the default scale is weaker; see the README.)
    """
    items, vectors = gallery
    requests = items[:20]
    conversations = [[Turn("user", [f"Show me a picture of {request_phrase(s.caption)}."]),
                      Turn("assistant", [retrieval_reply(s.caption)])] for s in requests]
    best = (ret_queries(demo, conversations) @ vectors.T).argmax(1)                    # (20,)
    right = [items[int(b)].scene.objects == s.scene.objects for b, s in zip(best, requests)]
    assert sum(right) >= 16, list(zip([s.caption for s in requests], right))
